"""Adapters on disk in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    save_adapter(model, "runs/sft-adapter", base_path="runs/smollm2-moe")
    model = load_adapter(upcycle.load("runs/smollm2-moe"), "runs/sft-adapter")
    peft.PeftModel.from_pretrained(upcycle.load("runs/smollm2-moe"), "runs/sft-adapter")  # same logits

Tensor names (``<path>``: the module's qualified name in the model):

* Linear targets, as PEFT writes them: ``base_model.model.<path>.lora_A.weight`` [r, D_in],
  ``...lora_B.weight`` [D_out, r].
* Experts, in PEFT's ``target_parameters`` layout (``lora.ParamWrapper``), which matches
  ours: PEFT nests one wrapper per parameter, in the experts' parameter order, so the first
  projection (``gate_up_proj`` / ``up_proj``) is the inner one:
  ``<path>.base_layer.lora_A.weight`` [E*r, D] (rows e*r..e*r+r-1 are expert e's A),
  ``<path>.base_layer.lora_B.weight`` [M, r*E] (column k*E+e is rank k of expert e), and
  ``down_proj``: ``<path>.lora_A.weight`` [E*r, F], ``<path>.lora_B.weight`` [D, r*E].
  PEFT applies them through a weight parametrisation; we never build ``W + B A``.
  An adapter on a subset of the experts (expert-specialised fine-tuning) stores those k
  experts only ([k*r, D], ...; ``upcycle.experts_subset`` in the config names them): ours
  reads it back, PEFT cannot (its wrappers want all E).
* Trained routers, as PEFT's ``modules_to_save=["router"]``: ``<block path>.router.weight``.

``adapter_config.json`` is PEFT's ``LoraConfig`` plus an ``upcycle`` section (our extension,
ignored by PEFT): the base fingerprint (``sha256:`` over its weight files, as
``upcycle.models.sources`` computes it), the expert layout, the original target patterns.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from upcycle.adapters.config import LoraConfig
from upcycle.adapters.inject import CONFIG_ATTR, apply_lora, lora_modules, unload_lora
from upcycle.adapters.lora import LoraExperts
from upcycle.adapters.nf4_record import describe_record, nf4_record
from upcycle.errors import UpcycleError
from upcycle.io import atomic_path, read_json_object, read_safetensors, write_json
from upcycle.models.recorded import check_fingerprint, record_source, reopen_source
from upcycle.models.sources import base_fingerprint
from upcycle.moe.block import MoEBlock
from upcycle.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# 2: the upcycle section records how the base was quantised (``quantization``: an NF4 record, or null for a
# full-precision base); version-1 adapters lack the key (``adapters.adapted`` says what it does about that).
FORMAT_VERSION = 2


def _base_of(model, base_path):
    """The base checkpoint: ``base_path`` as given (a dir, .gguf or alias), else the model's own path if it exists."""
    if base_path:
        return str(base_path)
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(path) if path and os.path.exists(str(path)) else None


def _experts_tensors(e: LoraExperts) -> dict[str, torch.Tensor]:
    E, r = e.num_adapted, e.r  # a subset adapter (keep_experts): its k experts, in expert_ids order

    def a(t):  # [E, r, I] -> [E*r, I]
        return t.reshape(E * r, t.shape[-1])

    def b(t):  # [E, O, r] -> [O, r*E], column k*E+e
        return t.permute(1, 2, 0).reshape(t.shape[1], r * E)

    return {"base_layer.lora_A.weight": a(e.lora_A_in), "base_layer.lora_B.weight": b(e.lora_B_in),
            "lora_A.weight": a(e.lora_A_down), "lora_B.weight": b(e.lora_B_down)}


def _experts_from_file(e: LoraExperts, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    E, r = e.num_adapted, e.r

    def a(t):
        return t.reshape(E, r, t.shape[-1])

    def b(t):
        return t.reshape(t.shape[0], r, E).permute(2, 0, 1)

    return {"lora_A_in": a(tensors["base_layer.lora_A.weight"]), "lora_B_in": b(tensors["base_layer.lora_B.weight"]),
            "lora_A_down": a(tensors["lora_A.weight"]), "lora_B_down": b(tensors["lora_B.weight"])}


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file names (see the module docstring)."""
    cfg = _config_of(model)
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        if isinstance(m, LoraExperts):
            parts = _experts_tensors(m)
        else:
            parts = {"lora_A.weight": m.lora_A.weight, "lora_B.weight": m.lora_B.weight}
        out.update({f"{PREFIX}{name}.{k}": v for k, v in parts.items()})
    if cfg.train_router:
        for name, m in model.named_modules():
            if isinstance(m, MoEBlock):
                out[f"{PREFIX}{name}.router.weight"] = m.router.weight
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _config_of(model) -> LoraConfig:
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise UpcycleError("the model has no LoRA adapter: call apply_lora (or load_adapter) first")
    return cfg


def _peft_config(model, cfg: LoraConfig, base: str, fingerprint: str) -> dict:
    wrapped = lora_modules(model)
    linears = [n for n, m in wrapped.items() if not isinstance(m, LoraExperts)]
    experts = {n: m for n, m in wrapped.items() if isinstance(m, LoraExperts)}
    plain = isinstance(cfg.target_modules, list) and not any(c in p for p in cfg.target_modules for c in "*?[")
    # A shared expert's projections get LoRA with the experts (not through target_modules): PEFT must name them.
    plain = plain and all(any(n == p or n.endswith("." + p) for p in cfg.target_modules) for n in linears)
    # PEFT matches a list by name suffix exactly as we do; anything else becomes the exact names.
    targets = list(cfg.target_modules) if plain else "(" + "|".join(re.escape(n) for n in linears) + ")"
    target_parameters = None
    layout = None
    if experts:
        first = next(iter(experts.values())).base_layer
        up_name = "gate_up_proj" if first.gated else "up_proj"
        suffixes = sorted({".".join(n.split(".")[-2:]) for n in experts})  # e.g. "mlp.experts"
        target_parameters = [f"{s}.{p}" for s in suffixes for p in (up_name, "down_proj")]
        layout = {"modules": list(experts), "num_experts": first.num_experts, "hidden_size": first.hidden_size,
                  "ffn_size": first.ffn_size, "gated": first.gated, "layout": "peft-target_parameters"}
    subset = {n: m.expert_ids for n, m in experts.items() if m.expert_ids is not None}
    # PEFT's expert wrapper (lora.ParamWrapper) refuses any lora_dropout (it cannot drop out inside a weight
    # parametrisation), and the setting is one for all targets: with expert adapters PEFT reads 0 (dropout acts
    # in training only, so loading for inference is exact) and ours reads the trained value from our section.
    peft_dropout = 0.0 if target_parameters else cfg.dropout
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": None,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": peft_dropout, "use_rslora": cfg.use_rslora,
        "target_modules": targets, "target_parameters": target_parameters, "exclude_modules": None,
        "modules_to_save": ["router"] if cfg.train_router else None, "bias": "none", "lora_bias": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "upcycle": {
            "format_version": FORMAT_VERSION, "upcycle_version": __version__, "base_fingerprint": fingerprint,
            "target_modules": cfg.target_modules, "linear_modules": linears, "experts": layout,
            "train_router": cfg.train_router, "lora_dropout": cfg.dropout,
            # Expert-specialised fine-tuning: per experts module, the experts that have an adapter (the
            # tensors hold their rows only, in this order). PEFT cannot load such an adapter.
            "experts_subset": subset or None,
            # QLoRA: the NF4 base the adapter was fitted to (modules, blocksize, double quantisation, shared
            # base, dtypes), so loading it rebuilds that base instead of the full-precision one.
            "quantization": nf4_record(model),
        },
    }


def save_adapter(model, out_dir: str, base_path: str | None = None, *, fingerprint: str | None = None) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` to ``out_dir``; returns it.

    ``base_path``: the checkpoint the model was loaded from (default: ``model.name_or_path``);
    its fingerprint goes into the config (``fingerprint``: already computed, e.g. by a trainer
    that saves every N steps and should not re-hash gigabytes each time).
    """
    cfg = _config_of(model)
    base = _base_of(model, base_path)
    if base is None:
        raise UpcycleError("cannot tell which checkpoint the model was loaded from: pass base_path")
    if any(m.merged for m in lora_modules(model).values()):
        raise UpcycleError("the adapter is merged into the base weights: unmerge_lora(model) before saving it")
    config = _peft_config(model, cfg, record_source(base), fingerprint or base_fingerprint(base))
    tensors = adapter_state_dict(model)
    os.makedirs(out_dir, exist_ok=True)
    # Each file written aside and renamed: an interrupted save leaves the old adapter whole.
    with atomic_path(os.path.join(out_dir, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(out_dir, CONFIG_NAME), config)
    return out_dir


def is_adapter_dir(path) -> bool:
    """A directory holding an adapter (its ``adapter_config.json``), whatever else it holds."""
    return os.path.isfile(os.path.join(str(path), CONFIG_NAME))


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise UpcycleError(f"{adapter_dir} is not an adapter directory (no {CONFIG_NAME})")
    raw = read_json_object(path, "an adapter config")
    if raw.get("peft_type") != "LORA":
        raise UpcycleError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    return raw


def lora_config_from_peft(raw: dict) -> LoraConfig:
    """Our LoraConfig for a PEFT ``adapter_config.json`` (ours or PEFT's own); unsupported options raise."""
    for key, ok in (("use_dora", False), ("bias", "none"), ("lora_bias", False), ("fan_in_fan_out", False)):
        if raw.get(key, ok) != ok:
            raise UpcycleError(f"adapter option {key}={raw[key]!r} is not supported")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules"):
        if raw.get(key):
            raise UpcycleError(f"adapter option {key} is not supported")
    mts = raw.get("modules_to_save") or []
    if any(m != "router" for m in mts):
        raise UpcycleError(f"adapter modules_to_save={mts} is not supported (only 'router')")
    ext = raw.get("upcycle") or {}
    targets = ext.get("target_modules", raw.get("target_modules") or [])
    dropout = ext.get("lora_dropout", raw.get("lora_dropout", 0.0))  # ours: the trained value (see _peft_config)
    return LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=dropout,
                      use_rslora=bool(raw.get("use_rslora", False)), target_modules=targets,
                      experts=bool(ext["experts"]) if "experts" in ext else bool(raw.get("target_parameters")),
                      train_router=bool(ext.get("train_router", "router" in mts)))


def check_base(adapter_dir: str, raw: dict, base: str | None, hint: str = "") -> None:
    """UpcycleError if the adapter records a base fingerprint that ``base`` does not have."""
    want = (raw.get("upcycle") or {}).get("base_fingerprint")
    if not want:
        return
    if base is None:
        warnings.warn(f"cannot check the base of adapter {adapter_dir}: the model's checkpoint path is unknown "
                      "(pass base_path)", stacklevel=3)
        return
    check_fingerprint(base, want, what=f"the base of adapter {adapter_dir}",
                      recorded=raw.get("base_model_name_or_path"), hint=hint)


def adapter_base(adapter_dir: str, raw: dict, base: str | None = None, hint: str = "") -> str:
    """The base of the adapter in ``adapter_dir`` (``raw``: its config), checked against its recorded
    fingerprint: ``base`` if given, else the recorded ``base_model_name_or_path`` (``models.recorded``)."""
    if base:
        check_base(adapter_dir, raw, base, hint)
        return base
    recorded = raw.get("base_model_name_or_path")
    if not recorded:
        raise UpcycleError(f"adapter {adapter_dir} does not record its base model{hint}")
    return reopen_source(recorded, (raw.get("upcycle") or {}).get("base_fingerprint"),
                         what=f"the base of adapter {adapter_dir}", near=adapter_dir, hint=hint)


def load_adapter(model, adapter_dir: str, base_path: str | None = None, *, verify_base: bool = True):
    """Apply the adapter in ``adapter_dir`` to ``model`` and load its weights; returns ``model``.

    ``base_path``: where ``model`` was loaded from (default ``model.name_or_path``), checked
    against the fingerprint the adapter recorded (``verify_base=False``: the caller did).
    """
    raw = read_adapter_config(adapter_dir)
    if verify_base:
        check_base(adapter_dir, raw, _base_of(model, base_path))
    cfg = lora_config_from_peft(raw)
    wpath = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        raise UpcycleError(f"{adapter_dir} has no {WEIGHTS_NAME}")
    saved = read_safetensors(wpath)
    apply_lora(model, cfg)
    try:
        keep_adapted_experts(model, (raw.get("upcycle") or {}).get("experts_subset"), adapter_dir)
        _load_tensors(model, cfg, saved, wpath)
    except Exception:
        unload_lora(model)  # leave the model without a half-loaded adapter
        raise
    return model


def keep_adapted_experts(model, subset: dict | None, where: str = "the adapter") -> None:
    """Restrict the model's expert adapters to ``subset`` ({experts module: expert ids}, as an adapter
    config records it; None: nothing to do)."""
    if not subset:
        return
    wrapped = {n: m for n, m in lora_modules(model).items() if isinstance(m, LoraExperts)}
    unknown = sorted(set(subset) - set(wrapped))
    if unknown:
        raise UpcycleError(f"{where} restricts experts of {unknown[0]}, which has no expert adapter in this model")
    for name, ids in subset.items():
        wrapped[name].keep_experts(ids)


def load_adapter_weights(model, adapter_dir: str) -> None:
    """Copy a saved adapter's tensors into the adapter already on ``model`` (resuming training)."""
    wpath = os.path.join(adapter_dir, WEIGHTS_NAME)
    saved = read_safetensors(wpath)
    _load_tensors(model, _config_of(model), saved, wpath)


def _load_tensors(model, cfg: LoraConfig, saved: dict[str, torch.Tensor], wpath: str) -> None:
    used: set[str] = set()

    def take(prefix: str, keys) -> dict[str, torch.Tensor]:
        missing = [k for k in keys if prefix + k not in saved]
        if missing:
            raise UpcycleError(f"{wpath} lacks {prefix}{missing[0]}: the adapter does not fit this model")
        used.update(prefix + k for k in keys)
        return {k: saved[prefix + k] for k in keys}

    params: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        prefix = f"{PREFIX}{name}."
        if isinstance(m, LoraExperts):
            want = _experts_tensors(m)
            got = take(prefix, want)
            for k, v in got.items():
                _check_shape(prefix + k, v, want[k].shape)
            params.update({f"{name}.{k}": v for k, v in _experts_from_file(m, got).items()})
        else:
            params.update({f"{name}.{k}": v for k, v in take(prefix, ("lora_A.weight", "lora_B.weight")).items()})
    if cfg.train_router:
        for name, m in model.named_modules():
            if isinstance(m, MoEBlock):
                params[f"{name}.router.weight"] = take(f"{PREFIX}{name}.", ("router.weight",))["router.weight"]
    extra = sorted(set(saved) - used)
    if extra:
        raise UpcycleError(f"{wpath} holds {len(extra)} tensors this model has no place for, e.g. {extra[0]}")
    own = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in params.items():
            _check_shape(PREFIX + k, v, own[k].shape)
            own[k].copy_(v)


def _check_shape(key: str, value: torch.Tensor, shape) -> None:
    if tuple(value.shape) != tuple(shape):
        raise UpcycleError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model needs {tuple(shape)}")


def describe_adapter(adapter_dir: str) -> dict:
    """What ``upcycle inspect ADAPTER`` shows, from the config and the safetensors header only."""
    import math

    raw = read_adapter_config(adapter_dir)
    ext = raw.get("upcycle") or {}
    wpath = os.path.join(adapter_dir, WEIGHTS_NAME)
    params = 0
    if os.path.isfile(wpath):
        with safe_open(wpath, framework="pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    experts = ext.get("experts") or {}
    return {
        "path": adapter_dir,
        "kind": "QLoRA adapter (LoRA on an NF4 base)" if ext.get("quantization") else "LoRA adapter",
        "r": raw["r"], "alpha": raw["lora_alpha"],
        "dropout": ext.get("lora_dropout", raw.get("lora_dropout", 0.0)), "use_rslora": raw.get("use_rslora", False),
        "target_modules": raw.get("target_modules"), "target_parameters": raw.get("target_parameters"),
        "linear_modules": len(ext.get("linear_modules") or []), "expert_layers": len(experts.get("modules") or []),
        "train_router": "router" in (raw.get("modules_to_save") or []), "adapter_params": params,
        "experts_subset": {n: len(ids) for n, ids in (ext.get("experts_subset") or {}).items()} or None,
        "base": raw.get("base_model_name_or_path"), "base_fingerprint": ext.get("base_fingerprint"),
        "base_quantization": (describe_record(ext["quantization"]) if "quantization" in ext
                              else "not recorded (saved before upcycle recorded it)" if ext else None),
    }
