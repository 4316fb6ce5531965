"""What a QLoRA adapter's base was quantised to, recorded with the adapter, and that base built again.

    record = nf4_record(model)               # saved in adapter_config.json, upcycle.quantization
    quantize_as_recorded(base, record)       # the same NF4 modules, bit for bit, on a freshly loaded base

An adapter trained on an NF4 base was fitted to that base's rounding, not to the full-precision
weights: loading it for evaluation or generation must rebuild the same quantised model. The record
names every quantised module (its qualified name in the base, without LoRA's ``base_layer``) with
the settings that decide its codes and its forward:

    {"method": "nf4", "modules": {
        "model.layers.0.self_attn.q_proj": {"kind": "linear", "dtype": "float32", "blocksize": 64,
                                            "double_quant": true, "compute_dtype": "float32"},
        "model.layers.3.mlp.experts": {"kind": "experts", ..., "shared_base": true}}}

``dtype`` is the precision the weight had when it was quantised (what dequantisation returns;
the trainer quantises its float32 master copy); ``compute_dtype`` is the dtype the module computes
in (``null``: the device's default, bf16 on CUDA, fp32 elsewhere). Quantisation is deterministic,
so the same base (checked by its fingerprint) with the same settings gives the same codes.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.adapters.qlora import NF4Linear, NF4StackedExperts
from upcycle.errors import UpcycleError
from upcycle.moe.experts import ExpertsBase

__all__ = ["METHOD", "describe_record", "nf4_record", "quantize_as_recorded", "record_dtype"]

METHOD = "nf4"
_KINDS = {NF4Linear: "linear", NF4StackedExperts: "experts"}


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: str | None, where: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UpcycleError(f"{where}: {name!r} is not a floating-point dtype")
    return dtype


def _base_name(name: str) -> str:
    """The module's name in the base model: LoRA wraps a target at ``<name>.base_layer`` (PEFT's layout)."""
    return name.removesuffix(".base_layer")


def nf4_record(model: nn.Module) -> dict | None:
    """The record of ``model``'s NF4 modules (see the module docstring); None when nothing is quantised.

    A quantised module of a kind the record cannot describe is refused: an adapter saved without
    what its base was would load onto another model.
    """
    modules: dict[str, dict] = {}
    for name, m in model.named_modules():
        if not getattr(m, "is_quantized", False):
            continue
        kind = _KINDS.get(type(m))
        if kind is None:
            raise UpcycleError(f"{name} is a quantised {type(m).__name__}, which an adapter cannot record its base "
                               f"by (only {', '.join(t.__name__ for t in _KINDS)})")
        q = m.nf4("weight" if kind == "linear" else "down_proj")
        entry = {"kind": kind, "dtype": _dtype_name(q.dtype), "blocksize": q.blocksize,
                 "double_quant": q.double_quant, "compute_dtype": _dtype_name(m.compute_dtype)}
        if kind == "experts":
            entry["shared_base"] = bool(m.shared_base)
        modules[_base_name(name)] = entry
    return {"method": METHOD, "modules": modules} if modules else None


def describe_record(record: dict | None) -> str:
    """A few words for messages and tables: ``NF4 (double quantisation, blocksize 64), 16 Linear, 2 experts``."""
    if not record:
        return "full precision"
    entries = list(record["modules"].values())
    dq = {e["double_quant"] for e in entries}
    bs = sorted({e["blocksize"] for e in entries})
    quant = "double quantisation" if dq == {True} else "single quantisation" if dq == {False} else "mixed"
    n_lin = sum(e["kind"] == "linear" for e in entries)
    n_exp = sum(e["kind"] == "experts" for e in entries)
    shared = sum(bool(e.get("shared_base")) for e in entries)
    parts = [f"{n_lin} Linear"] + ([f"{n_exp} experts ({shared} with a shared base)"] if n_exp else [])
    return f"NF4 ({quant}, blocksize {'/'.join(map(str, bs))}): {', '.join(parts)}"


def record_dtype(record: dict | None) -> torch.dtype | None:
    """The one dtype every recorded module was quantised from (the model's precision when it was quantised);
    None when there is no record or the modules differ."""
    modules = (record or {}).get("modules") if isinstance(record, dict) else None
    names = {e.get("dtype") for e in modules.values()} if isinstance(modules, dict) else set()
    return _dtype(names.pop(), "upcycle.quantization's dtype") if len(names) == 1 else None


def quantize_as_recorded(model: nn.Module, record: dict, where: str = "the adapter") -> None:
    """Quantise ``model`` (a full-precision base, no adapter on it yet) as ``record`` says, in place.

    Every recorded module must exist and be of the recorded kind; each is cast to its recorded
    ``dtype`` first (a bf16 checkpoint the trainer upcast to float32 quantises from float32) and
    quantised with the recorded settings. ``where`` names the record in errors. Nothing is
    changed before every module is found.
    """
    method = record.get("method") if isinstance(record, dict) else None
    if method != METHOD or not isinstance(record.get("modules"), dict):
        raise UpcycleError(f"{where}: upcycle.quantization is not an NF4 record (method {method!r}); this version "
                           f"of upcycle rebuilds NF4 bases only")
    plan = []
    for name, entry in record["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UpcycleError(f"{where} was trained on a base whose {name} was quantised, and this base has no "
                               f"{name}") from None
        kind = entry.get("kind")
        ok = type(module) is nn.Linear if kind == "linear" else isinstance(module, ExpertsBase) if kind == "experts" \
            else None
        if ok is None:
            raise UpcycleError(f"{where}: quantised module {name} has unknown kind {kind!r}")
        if not ok or getattr(module, "is_quantized", False):
            raise UpcycleError(f"{where}: quantised module {name} was a {kind} module; in this base it is a "
                               f"{type(module).__name__}")
        plan.append((name, module, entry))
    for name, module, entry in plan:
        dtype = _dtype(entry.get("dtype"), f"{where}: {name}'s dtype")
        compute = _dtype(entry.get("compute_dtype"), f"{where}: {name}'s compute_dtype")
        kw = dict(blocksize=int(entry["blocksize"]), double_quant=bool(entry["double_quant"]), compute_dtype=compute)
        if dtype is not None:
            module.to(dtype)
        if entry["kind"] == "linear":
            new = NF4Linear.from_linear(module, **kw)
        else:
            # shared_base=True refuses experts that are not exact copies: a record that says shared means
            # the trained base's were, and the fingerprint-checked base must be the same.
            new = NF4StackedExperts.from_experts(module, shared_base=bool(entry.get("shared_base")), **kw)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
