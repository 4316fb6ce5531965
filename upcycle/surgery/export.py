"""``upcycle export``: an upcycled checkpoint as a stock transformers MoE checkpoint (Qwen2-MoE, Mixtral).

    upcycle export runs/cpt/checkpoints/step-000300 --format qwen2_moe --out runs/served
    vllm serve runs/served          # or transformers, SGLang: no `import upcycle` needed

Only what the stock class defines is written, and nothing is approximated: every feature
the target cannot express (expert choice, a non-gated MLP, biases it lacks, QK-norm, a
head size other than hidden / heads, sliding windows it does not model...) is refused in
one line before anything is written. The layers that are not MoE keep their dense MLP
(Qwen2-MoE's ``mlp_only_layers``); Qwen2-MoE's shared expert gets size 0 (it adds exactly 0)
and q/k/v biases of zero where the source has none (vLLM allocates them).

Tensors stream from the source into the output shards one at a time (an adapter is merged
into its base in memory first); the output is written to a temporary directory and renamed
when complete. Where it came from (source, fingerprint, tool version) goes into the shards'
metadata and a README.md beside them, not into config.json, so stock loaders see nothing new.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from upcycle.config import MoEConfig, from_dict
from upcycle.errors import UpcycleError
from upcycle.io import atomic_dir, read_model_config
from upcycle.models.sources import open_source
from upcycle.surgery.writer import ShardWriter, TensorSpec, plan_shards, shard_file_names, write_index
from upcycle.version import __version__

FORMATS = ("auto", "qwen2_moe", "mixtral")
LLAMA_FORM = ("llama", "mistral", "qwen2")
"""Source families whose dense parts both targets hold exactly (pre-norm RMSNorm, rotary, SwiGLU)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig:
    """Arguments of ``upcycle export``."""

    src: str
    """An upcycled checkpoint directory, or a LoRA adapter directory (merged into its base on the way)."""
    out: str
    format: str = "auto"
    """``qwen2_moe``, ``mixtral`` (every layer MoE) or ``auto`` (Mixtral when every layer is MoE)."""
    dtype: str | None = None
    """float32, bfloat16 or float16; None keeps the source's."""
    max_shard_size: int = 2 * 1024**3
    overwrite: bool = False
    progress: bool = True


@dataclass
class ExportResult:
    out: str
    format: str
    architecture: str
    moe_layers: list[int]
    bytes_written: int
    seconds: float


def export(cfg: ExportConfig) -> ExportResult:
    """Write ``cfg.src`` as a stock MoE checkpoint at ``cfg.out`` (see the module docstring)."""
    t0 = time.perf_counter()
    if cfg.format not in FORMATS:
        raise UpcycleError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise UpcycleError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    out = os.path.abspath(cfg.out)
    if os.path.exists(out) and not cfg.overwrite:
        raise UpcycleError(f"output {cfg.out} already exists (pass --overwrite to replace it)")
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(cfg.src):
        raise UpcycleError(f"--out {cfg.out} is the source itself; choose another output directory")
    with _resolved(cfg.src, out) as (src_dir, origin), open_source(src_dir) as src:
        raw = read_model_config(src_dir)
        target, target_config = plan_target(raw, cfg.format)
        names = _tensor_map(src, target_config)
        dtype = DTYPES[cfg.dtype] if cfg.dtype else src.default_dtype
        specs = [TensorSpec(dst, shape, dtype if sdt.is_floating_point else sdt) for dst, (_, shape, sdt) in names.items()]
        shards = plan_shards(specs, cfg.max_shard_size)
        total = sum(s.nbytes for s in specs)
        meta = {"format": "pt", "upcycle_version": __version__, "exported_from": origin,
                "source_fingerprint": src.fingerprint}
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp, \
                tqdm(total=total, unit="B", unit_scale=True, desc="exporting", disable=not cfg.progress) as bar:
            files = shard_file_names(len(shards))
            for group, fname in zip(shards, files):
                writer = ShardWriter(os.path.join(tmp, fname), group, metadata=meta)
                try:
                    for spec in group:
                        src_name = names[spec.name][0]
                        t = src.get_tensor(src_name) if src_name else torch.zeros(spec.shape)
                        bar.update(writer.write(spec.name, t.to(spec.dtype)))
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
            write_index(tmp, shards, files)
            target_config.dtype = dtype
            target_config.save_pretrained(tmp)
            src.save_tokenizer(tmp)
            src.generation_config().save_pretrained(tmp)
            _write_readme(tmp, target, origin, src.fingerprint, raw)
    return ExportResult(out=cfg.out, format=target, architecture=target_config.architectures[0],
                        moe_layers=list(raw["upcycle"]["layer_ids"]), bytes_written=total,
                        seconds=time.perf_counter() - t0)


@contextmanager
def _resolved(spec: str, out: str):
    """(upcycled checkpoint dir, description of the source): ``spec`` itself, or, for an adapter, its
    base with the adapter merged in, written beside ``out`` for the export's duration."""
    if os.path.isfile(os.path.join(spec, "adapter_config.json")):
        from upcycle.adapters.merge import merge_command

        parent = os.path.dirname(out)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.merging-", dir=parent)
        try:
            merged = merge_command(spec, os.path.join(tmp, "merged"))
            if not merged["upcycled"]:
                raise UpcycleError(f"adapter {spec} applies to a dense model ({merged['base']}): nothing to export "
                                   "as MoE")
            yield merged["out"], f"{os.path.abspath(spec)} (LoRA adapter) merged into {merged['base']}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if not os.path.isdir(spec):
        raise UpcycleError(f"checkpoint not found: {spec}")
    if "upcycle" not in read_model_config(spec):
        raise UpcycleError(f"{spec} is not an upcycled checkpoint (no 'upcycle' section in config.json); "
                           "export writes MoE checkpoints made by upcycle convert")
    yield spec, os.path.abspath(spec)


def plan_target(raw: dict, fmt: str):
    """(format, stock transformers config) for an upcycled config.json; UpcycleError for what it cannot carry."""
    up = raw["upcycle"]
    base, moe = up["base_model_type"], from_dict(MoEConfig, up["moe"], "config.upcycle.moe")
    mlp, n = up["mlp"], raw["num_hidden_layers"]
    all_moe = sorted(up["layer_ids"]) == list(range(n))
    if fmt == "auto":
        fmt = "mixtral" if all_moe else "qwen2_moe"
    others = {"qwen2_moe": "mixtral", "mixtral": "qwen2_moe"}

    def refuse(why: str, could: str | None = None) -> UpcycleError:
        alt = f"; {could} could carry it" if could else "; no stock format carries it"
        return UpcycleError(f"cannot export to {fmt}: {why}{alt}")

    if moe.routing != "topk":
        raise refuse(f"{moe.routing} routing (stock MoE classes route top-K)")
    if base not in LLAMA_FORM:
        raise refuse(f"the dense parts of a {base} model (exported exactly: {', '.join(LLAMA_FORM)})")
    if not mlp["gated"] or mlp["bias"]:
        raise refuse("a non-gated MLP" if not mlp["gated"] else "MLP biases")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise refuse("attention output or MLP biases")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    window = raw.get("sliding_window") if raw.get("use_sliding_window", base != "qwen2") else None
    if fmt == "mixtral":
        if not all_moe:
            raise refuse(f"only layers {','.join(map(str, up['layer_ids']))} of {n} are MoE (Mixtral has MoE "
                         "in every layer)", others[fmt])
        if not moe.normalize_topk:
            raise refuse("top-K weights that are not renormalised (Mixtral always renormalises)", others[fmt])
        if base == "qwen2":
            raise refuse("q/k/v biases (Mixtral attention has none)", others[fmt])
    else:
        if head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
            raise refuse(f"a head size of {head_dim} (Qwen2-MoE uses hidden / heads)",
                         others[fmt] if all_moe else None)
        if window:
            raise refuse("sliding-window attention", others[fmt] if all_moe else None)
    common = dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_hidden_layers=n,
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        hidden_act=mlp["activation"], max_position_embeddings=raw["max_position_embeddings"],
        rms_norm_eps=raw["rms_norm_eps"], tie_word_embeddings=raw.get("tie_word_embeddings", False),
        rope_parameters=raw.get("rope_parameters"), num_experts_per_tok=moe.top_k,
        bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"), pad_token_id=raw.get("pad_token_id"),
        initializer_range=raw.get("initializer_range", 0.02), attention_dropout=0.0,
    )
    if fmt == "mixtral":
        from transformers import MixtralConfig

        config = MixtralConfig(**common, intermediate_size=mlp["ffn_size"], num_local_experts=moe.num_experts,
                               head_dim=head_dim, sliding_window=window, router_aux_loss_coef=moe.aux_loss_weight)
        config.architectures = ["MixtralForCausalLM"]
    else:
        from transformers import Qwen2MoeConfig

        dense = sorted(set(range(n)) - set(up["layer_ids"]))
        config = Qwen2MoeConfig(**common, intermediate_size=raw.get("intermediate_size", mlp["ffn_size"]),
                                moe_intermediate_size=mlp["ffn_size"], shared_expert_intermediate_size=0,
                                num_experts=moe.num_experts, norm_topk_prob=moe.normalize_topk, decoder_sparse_step=1,
                                mlp_only_layers=dense, use_sliding_window=False,
                                router_aux_loss_coef=moe.aux_loss_weight)
        config.architectures = ["Qwen2MoeForCausalLM"]
    return fmt, config


def _tensor_map(src, config) -> dict[str, tuple[str | None, tuple, torch.dtype]]:
    """Target tensor -> (source tensor or None for zeros, shape, dtype), checked against the stock
    class's own state dict; a source tensor the target has no place for is a refusal."""
    from upcycle.arch import skeleton

    with warnings.catch_warnings():  # torch notes that the size-0 shared expert has nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        want = {k: tuple(v.shape) for k, v in skeleton(config).state_dict().items()}
    if config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    have = {n: src.tensor_info(n) for n in src.tensor_names()}
    rename = {n: n.replace(".mlp.router.weight", ".mlp.gate.weight") for n in have}
    fmt = config.model_type
    extra = sorted(n for n, d in rename.items() if d not in want)
    if extra:
        raise UpcycleError(f"cannot export to {fmt}: it has no place for {extra[0]}"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    by_target = {d: n for n, d in rename.items()}
    out = {}
    for name, shape in want.items():
        if name in by_target:
            src_shape, dtype = have[by_target[name]]
            if tuple(src_shape) != shape:
                raise UpcycleError(f"cannot export to {fmt}: {by_target[name]} has shape {tuple(src_shape)}, "
                                   f"{fmt} expects {shape}")
            out[name] = (by_target[name], shape, dtype)
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) or ".shared_expert" in name:
            # Zero biases where the source has none; the size-0 shared expert and its gate add 0.
            out[name] = (None, shape, torch.float32)
        else:
            raise UpcycleError(f"cannot export to {fmt}: the source has no tensor for {name}")
    return out


def _write_readme(tmp: str, fmt: str, origin: str, fingerprint: str, raw: dict) -> None:
    up = raw["upcycle"]
    moe = up["moe"]
    text = f"""# Exported by upcycle {__version__}

A stock `{fmt}` checkpoint: transformers, vLLM and SGLang load it without `upcycle`.

* source: `{origin}` (fingerprint `{fingerprint}`)
* upcycled from: `{up['source']['model']}` ({up['base_model_type']})
* MoE layers: {', '.join(map(str, up['layer_ids']))} of {raw['num_hidden_layers']}, {moe['num_experts']} experts, \
top-{moe['top_k']} routing{' (weights renormalised)' if moe['normalize_topk'] else ''}
"""
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
