"""Upcycled checkpoints: load one, describe one (``upcycle inspect``).

    model = load_upcycled("runs/smollm2-moe", experts_backend="grouped_mm")   # upcycle.load dispatches here

The format (DESIGN.md section 3) is a Hugging Face model directory whose config.json has an
``upcycle`` section; ``save_pretrained`` of a loaded model writes the same format back.
"""

from __future__ import annotations

import glob
import math
import os

import torch
from safetensors import safe_open

from upcycle.config import MoEConfig, from_dict
from upcycle.errors import UpcycleError
from upcycle.io import read_model_config, read_safetensors_header
from upcycle.modeling import register
from upcycle.moe.block import set_experts_backend
from upcycle.moe.schemes import ROUTING_FIELDS, routing_scheme


def load_upcycled(path: str, experts_backend: str = "auto", dtype: torch.dtype | str | None = None, device=None):
    """Load an upcycled checkpoint directory as a ready (eval-mode) transformers model.

    ``experts_backend``: ``auto`` (triton on CUDA, else grouped_mm where dtype and shapes
    allow, else loop), ``loop``, ``grouped_mm`` or ``triton``. ``upcycle.load`` (``models.loader``)
    also takes the checkpoints that are made from such a directory (ESFT).
    """
    from transformers import AutoModelForCausalLM

    raw = read_model_config(path)
    if "upcycle" not in raw:
        raise UpcycleError(f"{path} is not an upcycled checkpoint (config.json has no 'upcycle' section)")
    register(str(raw["upcycle"].get("base_model_type", raw.get("model_type", ""))))  # families beyond FAMILIES
    for f in _weight_files(path):  # truncated or garbled shards: one line now, not a traceback later
        read_safetensors_header(f)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", output_loading_info=True)
    # transformers leaves a missing expert tensor as uninitialised memory: refuse instead.
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    for kind, keys in bad.items():
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise UpcycleError(f"{path} does not match its config.json: {kind.replace('_', ' ')} {keys[0]}{more}")
    set_experts_backend(model, experts_backend)
    if device is not None:
        model.to(device)
    return model.eval()


def _weight_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UpcycleError(f"{path} has no .safetensors weights")
    return files


def describe(path: str) -> dict:
    """What ``upcycle inspect`` shows, read from config.json and the safetensors headers only."""
    raw = read_model_config(path)
    shapes: dict[str, tuple[list[int], str]] = {}
    for f in _weight_files(path):
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    shapes[k] = (sl.get_shape(), sl.get_dtype())
        except Exception as e:  # safetensors raises several types for damaged files
            raise UpcycleError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
    total = sum(math.prod(s) for s, _ in shapes.values())
    dtypes = sorted({d for _, d in shapes.values()})
    info = {
        "path": path,
        "architecture": (raw.get("architectures") or [raw.get("model_type")])[0],
        "model_type": raw.get("model_type"),
        "num_layers": raw.get("num_hidden_layers"),
        "hidden_size": raw.get("hidden_size"),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "total_params": total,
        "active_params_per_token": total,
        "size_on_disk_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                                  if os.path.isfile(os.path.join(path, f))),
        "upcycled": "upcycle" in raw,
    }
    up = raw.get("upcycle")
    if up:
        try:
            info.update(_describe_moe(up, shapes, total, raw))
        except (KeyError, TypeError, ValueError, UpcycleError) as e:
            raise UpcycleError(f"{path}/config.json has a malformed 'upcycle' section ({type(e).__name__}: {e})") from None
    else:
        info.update(_describe_stock_moe(raw, shapes, total))
    return info


# Where stock MoE configs keep the routed expert count (Qwen2/3-MoE, OLMoE: num_experts; Mixtral, GraniteMoE:
# num_local_experts; DeepSeek-V2/V3: n_routed_experts); every one of them names the top-K num_experts_per_tok.
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def _describe_stock_moe(raw: dict, shapes: dict, total: int) -> dict:
    """Active parameters per token of a stock MoE checkpoint (an export of ours, Qwen2-MoE, Mixtral...), from
    its routing config: of each routed expert tensor (``.experts.`` in its name, stacked [E, ...] or one per
    expert) K/E is active; everything else (attention, dense layers, shared experts, routers) always is."""
    text = raw.get("text_config")
    cfg = text if isinstance(text, dict) and "num_experts_per_tok" in text else raw  # a vision-language model's LM
    E = next((cfg[k] for k in _EXPERT_COUNT_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0), None)
    K = cfg.get("num_experts_per_tok")
    if E is None or not isinstance(K, int) or not 0 < K <= E:
        return {}
    routed = sum(math.prod(shape) for k, (shape, _) in shapes.items() if ".experts." in k)
    if not routed:  # experts stored under names we do not know: no number rather than a wrong one
        return {"active_params_per_token": None, "num_experts": E, "experts_per_token": K}
    return {"active_params_per_token": int(round(total - routed * (E - K) / E)), "num_experts": E,
            "experts_per_token": K}


# Input-embedding tables: a lookup per token, no multiply (a tied output head is counted apart).
_LOOKUP_TABLES = ("embed_tokens.weight", "wte.weight", "wpe.weight", "embed_in.weight", "embed_positions.weight")


def _describe_moe(up: dict, shapes: dict, total: int, raw: dict) -> dict:
    """The MoE lines of ``describe``: layers, experts, routing, active parameters and FLOPs per token,
    each also as a ratio to the dense source (its MLPs in place of the MoE layers)."""
    moe = from_dict(MoEConfig, up["moe"], "config.upcycle.moe")
    scheme = routing_scheme(moe)
    E, G = moe.num_experts, moe.granularity
    per_token = scheme.experts_per_token
    inactive = sum(math.prod(shape) * (E - per_token) / E for k, (shape, _) in shapes.items() if ".experts." in k)
    active = total - inactive
    # The dense model: each MoE layer's router, experts and shared expert give way to one MLP of F neurons.
    mlp = up["mlp"]
    D, F = mlp["hidden_size"], mlp.get("dense_ffn_size", mlp["ffn_size"])
    M = 2 * F if mlp["gated"] else F
    dense_mlp = M * D + D * F + ((M + D) if mlp["bias"] else 0)
    moe_prefixes = tuple(f"{up['layers']}.{i}.{up['mlp_name']}." for i in up["layer_ids"]) if "layers" in up else ()
    moe_params = sum(math.prod(s) for k, (s, _) in shapes.items() if k.startswith(moe_prefixes))
    n_moe = len(up["layer_ids"])
    dense_total = total - moe_params + n_moe * dense_mlp
    # FLOPs per token: 2 per weight a token is multiplied with (attention over the context, the same in
    # both models, left out); embedding lookups are free, a tied output head is a matmul.
    lookup = sum(math.prod(s) for k, (s, _) in shapes.items() if k.endswith(_LOOKUP_TABLES))
    head = 0
    if raw.get("tie_word_embeddings", True) and not any(k.endswith("lm_head.weight") for k in shapes):
        head = raw.get("vocab_size", 0) * raw.get("hidden_size", 0)
    flops = 2 * (active - lookup + head)
    dense_flops = 2 * (dense_total - lookup + head)
    settings = {f: None for f in ROUTING_FIELDS}  # the other schemes' settings do not apply
    settings.update(scheme.settings())
    fine = G > 1 or mlp.get("shared_ffn_size", 0) > 0
    out = dict(
        active_params_per_token=int(round(active)),
        moe_layer_ids=up["layer_ids"],
        num_experts=E,
        **({"num_copies": moe.num_copies, "granularity": G, "expert_ffn_size": mlp["ffn_size"],
            "shared_ffn_size": mlp.get("shared_ffn_size", 0), "dense_ffn_size": F,
            "padding_neurons": mlp.get("padding", 0)} if fine else {}),
        routing=scheme.name,
        **settings,
        dense_params=int(dense_total),
        params_vs_dense=round(total / dense_total, 4),
        active_vs_dense=round(active / dense_total, 4) if moe_prefixes else None,
        flops_per_token=int(round(flops)),
        dense_flops_per_token=int(round(dense_flops)),
        flops_vs_dense=round(flops / dense_flops, 4) if moe_prefixes and dense_flops else None,
        init=up["init"]["method"] + (", permuted copies" if up["init"].get("permute_copies") else ""),
        shared_selection=(up.get("shared") or {}).get("selection"),
        source=up["source"]["model"],
        source_fingerprint=up["source"]["fingerprint"],
        upcycle_version=up["version"],
    )
    if not moe_prefixes:  # a section written before it recorded where the layers are: no per-layer sums
        for k in ("dense_params", "params_vs_dense", "dense_flops_per_token"):
            out[k] = None
    return out
