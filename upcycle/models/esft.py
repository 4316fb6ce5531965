"""ESFT checkpoints: what a full fine-tuning of a subset of the experts trained, and nothing else.

    upcycle merge runs/esft/checkpoints/last --out runs/esft-merged      # a whole checkpoint again
    model = upcycle.load("runs/esft/checkpoints/last")                 # the base with the trained parts in

A directory with

* ``esft_config.json``: ``format`` ("upcycle-esft"), ``base_model_name_or_path`` and
  ``base_fingerprint`` (``sha256:`` over the base's weight files, as ``upcycle.models.sources``
  computes it), ``experts_subset`` ({MoE experts module: trained expert ids}), the selection
  settings, the upcycle version;
* ``esft_model.safetensors``: every trained tensor under its name in the base checkpoint; an
  experts tensor holds the trained experts' rows only (``...mlp.experts.gate_up_proj`` [k, M, D],
  rows in ``experts_subset`` order), a router or attention weight (if trained) is whole;
* the tokenizer files.

Loading reads the base (the recorded one, or one given; either must have the recorded
fingerprint: ``upcycle.models.recorded``), then writes those rows and tensors into it: every
frozen expert is the base's, bit for bit.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.io import atomic_path, read_json_object, read_safetensors, write_json
from upcycle.models.recorded import check_fingerprint, record_source, reopen_source
from upcycle.models.sources import base_fingerprint
from upcycle.models.upcycled import load_upcycled
from upcycle.moe.experts import StackedExperts
from upcycle.moe.subset import SubsetExperts, check_expert_ids
from upcycle.version import __version__

ESFT_CONFIG = "esft_config.json"
ESFT_WEIGHTS = "esft_model.safetensors"
FORMAT = "upcycle-esft"
FORMAT_VERSION = 1


def is_esft_dir(path) -> bool:
    return os.path.isfile(os.path.join(str(path), ESFT_CONFIG))


def esft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor under its checkpoint name; a ``SubsetExperts``' ``trained.<name>`` as ``<name>``."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name.replace(".trained.", ".")] = p
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_esft(model: nn.Module, out_dir: str, *, base_path: str, fingerprint: str | None, subset: dict,
              settings: dict) -> str:
    """Write ``esft_config.json`` + ``esft_model.safetensors`` into ``out_dir`` (see the module docstring)."""
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "upcycle_version": __version__,
              "base_model_name_or_path": record_source(base_path),
              "base_fingerprint": fingerprint or base_fingerprint(base_path),
              "experts_subset": subset, "settings": settings}
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, ESFT_WEIGHTS)) as tmp:
        save_file(esft_state_dict(model), tmp, metadata={"format": "pt"})
    write_json(os.path.join(out_dir, ESFT_CONFIG), config)
    return out_dir


def read_esft_config(path: str) -> dict:
    raw = read_json_object(os.path.join(path, ESFT_CONFIG), "an ESFT config")
    if raw.get("format") != FORMAT or not isinstance(raw.get("experts_subset"), dict):
        raise UpcycleError(f"{path}/{ESFT_CONFIG} is not an upcycle ESFT config (format {raw.get('format')!r})")
    return raw


def esft_base(path: str, raw: dict, base: str | None = None) -> str:
    """The base of ESFT checkpoint ``path`` (``raw``: its config), checked against the recorded fingerprint:
    ``base`` if given, else the recorded one (``models.recorded``); one-line UpcycleError otherwise."""
    what = f"the base of ESFT checkpoint {path}"
    hint = f"; give the right one: upcycle merge {path} --base BASE --out DIR"
    if base:
        check_fingerprint(base, raw.get("base_fingerprint"), what=what, recorded=raw.get("base_model_name_or_path"))
        return base
    if not raw.get("base_model_name_or_path"):
        raise UpcycleError(f"ESFT checkpoint {path} does not record its base{hint}")
    return reopen_source(raw["base_model_name_or_path"], raw.get("base_fingerprint"), what=what, near=path, hint=hint)


def load_esft_tensors(model: nn.Module, path: str, subset: dict) -> None:
    """Write the checkpoint's tensors into ``model``: into a ``SubsetExperts``' trained stack as they
    are (resuming), or into the rows ``subset`` names of plain ``StackedExperts`` (loading, merging)."""
    wpath = os.path.join(path, ESFT_WEIGHTS)
    saved = read_safetensors(wpath)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    # Every experts module the subset names gets all its weights (a damaged file must not load halfway).
    for owner, ids in subset.items():
        m = modules.get(owner)
        m = m.trained if isinstance(m, SubsetExperts) else m
        if ids and isinstance(m, StackedExperts):
            missing = sorted(n for n, _ in m.named_parameters(recurse=False) if f"{owner}.{n}" not in saved)
            if missing:
                raise UpcycleError(f"{wpath} lacks {owner}'s trained {', '.join(missing)}")
    with torch.no_grad():
        for key, value in saved.items():
            owner, _, leaf = key.rpartition(".")
            m = modules.get(owner)
            if owner in subset and isinstance(m, (SubsetExperts, StackedExperts)):
                ids = check_expert_ids(subset[owner], m.num_experts, f"{path}: experts_subset[{owner}]")
                target = getattr(m.trained, leaf, None) if isinstance(m, SubsetExperts) else getattr(m, leaf, None)
                if not isinstance(target, torch.Tensor):
                    raise UpcycleError(f"{wpath} holds {key}, which these experts do not have")
                if isinstance(m, SubsetExperts):
                    if m.expert_ids != ids:
                        raise UpcycleError(f"{wpath}: {owner} trained experts {ids}, this model trains {m.expert_ids}")
                    _check_shape(key, value, target.shape)
                    target.copy_(value)
                else:
                    _check_shape(key, value, (len(ids), *target.shape[1:]))
                    target.index_copy_(0, torch.tensor(ids, device=target.device), value.to(target))
            elif key in params:
                _check_shape(key, value, params[key].shape)
                params[key].copy_(value)
            else:
                raise UpcycleError(f"{wpath} holds {key}, which this model has no place for")


def _check_shape(key: str, value: torch.Tensor, shape) -> None:
    if tuple(value.shape) != tuple(shape):
        raise UpcycleError(f"ESFT tensor {key} has shape {tuple(value.shape)}, the model needs {tuple(shape)}")


def load_esft(path: str, base: str | None = None, experts_backend: str = "auto", dtype=None, device=None, *,
              verify_base: bool = True):
    """The base model with the ESFT checkpoint ``path`` written into it (eval mode): what ``upcycle.load``
    returns for such a directory. ``base``: where the base is (default: the recorded path), checked against
    the recorded fingerprint (``verify_base=False``: the caller did, with ``esft_base``)."""
    raw = read_esft_config(path)
    if verify_base or not base:
        base = esft_base(path, raw, base)
    model = load_upcycled(base, experts_backend=experts_backend, dtype=dtype, device=device)
    load_esft_tensors(model, path, raw["experts_subset"])
    return model


def describe_esft(path: str) -> dict:
    """What ``upcycle inspect`` shows for an ESFT checkpoint, from its config and safetensors header."""
    import math

    raw = read_esft_config(path)
    wpath = os.path.join(path, ESFT_WEIGHTS)
    params = 0
    if os.path.isfile(wpath):
        with safe_open(wpath, framework="pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    subset = raw["experts_subset"]
    return {"path": path, "kind": "ESFT checkpoint (trained experts only)", "moe_layers": len(subset),
            "trained_experts": sum(len(ids) for ids in subset.values()),
            "experts_per_layer": {n: len(ids) for n, ids in subset.items()}, "trained_params": params,
            "settings": raw.get("settings"), "base": raw.get("base_model_name_or_path"),
            "base_fingerprint": raw.get("base_fingerprint")}
