"""Upcycled checkpoints: load one, describe one.

    model = upcycle.load("runs/smollm2-moe", experts_backend="grouped_mm")

The format (DESIGN.md section 3) is a Hugging Face model directory whose config.json has an
``upcycle`` section; ``save_pretrained`` of a loaded model writes the same format back.
"""

from __future__ import annotations

import glob
import json
import math
import os

import torch
from safetensors import safe_open

from upcycle.errors import UpcycleError


def read_json_object(path: str, what: str) -> dict:
    """A JSON object from ``path``; a one-line UpcycleError for an unreadable file or another JSON value."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UpcycleError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise UpcycleError(f"{path} is not {what} (expected a JSON object)")
    return raw


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UpcycleError(f"checkpoint not found: {path}")
    if not os.path.isfile(cfg_path):
        raise UpcycleError(f"{path} has no config.json: not a model directory")
    raw = read_json_object(cfg_path, "a model config")
    if not isinstance(raw.get("upcycle", {}), dict):
        raise UpcycleError(f"{cfg_path} is not a model config (its 'upcycle' entry is not an object)")
    return raw


def load(path: str, experts_backend: str = "auto", dtype: torch.dtype | str | None = None, device=None):
    """Load an upcycled checkpoint as a ready (eval-mode) transformers model.

    ``experts_backend``: ``auto`` (triton on CUDA, else grouped_mm where dtype and shapes
    allow, else loop), ``loop``, ``grouped_mm`` or ``triton``.
    """
    from transformers import AutoModelForCausalLM

    from upcycle.moe import set_experts_backend

    from pathlib import Path

    from upcycle.sources import _read_safetensors_header

    raw = _read_config(path)
    if "upcycle" not in raw:
        raise UpcycleError(f"{path} is not an upcycled checkpoint (config.json has no 'upcycle' section)")
    for f in _weight_files(path):  # truncated or garbled shards: one line now, not a traceback later
        _read_safetensors_header(Path(f))
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
    raw = _read_config(path)
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
            info.update(_describe_moe(up, shapes, total))
        except (KeyError, TypeError, ValueError) as e:
            raise UpcycleError(f"{path}/config.json has a malformed 'upcycle' section ({type(e).__name__}: {e})") from None
    return info


def _describe_moe(up: dict, shapes: dict, total: int) -> dict:
    """The MoE lines of ``describe``: layers, experts, routing, active parameters per token."""
    moe = up["moe"]
    E = moe["num_experts"]
    # Experts a token passes through on average: K for top-K, about C for expert choice
    # (with batch-1 decoding expert choice gives every token all E experts; see the README).
    per_token = moe["top_k"] if moe["routing"] == "topk" else min(float(moe["capacity"]), E)
    inactive = 0
    for k, (shape, _) in shapes.items():
        if ".experts." in k:
            inactive += math.prod(shape) * (E - per_token) / E
    return dict(
        active_params_per_token=int(round(total - inactive)),
        moe_layer_ids=up["layer_ids"],
        num_experts=E,
        routing=moe["routing"],
        top_k=moe["top_k"] if moe["routing"] == "topk" else None,
        capacity=moe["capacity"] if moe["routing"] == "expert-choice" else None,
        ec_group=moe["ec_group"] if moe["routing"] == "expert-choice" else None,
        init=up["init"]["method"],
        source=up["source"]["model"],
        source_fingerprint=up["source"]["fingerprint"],
        upcycle_version=up["version"],
    )
