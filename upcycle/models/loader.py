"""One loader for every checkpoint kind: what ``upcycle.load``, eval, generate, merge and train open.

    model = load("runs/moe")                                          # an upcycled checkpoint
    model = load("runs/esft/checkpoints/last")                        # ESFT: its base, trained experts written in
    model = load("runs/qlora/checkpoints/last")                       # an adapter: its base (NF4 if trained so) + it
    model = load("runs/lora/checkpoints/last", merge=True)            # ... folded into the full-precision base
    model, tokenizer = load_model_and_tokenizer("runs/smollm2-moe")   # upcycle.load + its tokenizer
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")       # the dense source itself

The kinds know nothing of each other (``upcycled`` loads a directory, ``esft`` builds on it,
``upcycle.adapters.adapted`` on any of them); this module, above the first two, picks one. The
adapters package sits above this module (it loads an adapter's base through ``load_model``), so
the adapter kind is imported when one is opened, not while the packages initialise.
"""

from __future__ import annotations

import os

from upcycle.errors import UpcycleError
from upcycle.io import read_model_config
from upcycle.models.esft import ESFT_CONFIG, is_esft_dir, load_esft
from upcycle.models.sources import open_source
from upcycle.models.upcycled import load_upcycled

ADAPTER_CONFIG = "adapter_config.json"  # upcycle.adapters.peft_io.CONFIG_NAME (PEFT's name)


def checkpoint_kind(spec: str) -> str:
    """``adapter``, ``esft``, ``model`` (a directory with a config.json) or ``source`` (no directory: a .gguf file,
    an alias, a hub id, or nothing; ``open_source`` judges). A directory that is none of these is one UpcycleError
    naming what each kind holds (and, for a training run's directory, where its checkpoints are)."""
    spec = str(spec)
    if not os.path.isdir(spec):
        return "source"
    if os.path.isfile(os.path.join(spec, ADAPTER_CONFIG)):
        return "adapter"
    if is_esft_dir(spec):
        return "esft"
    if os.path.isfile(os.path.join(spec, "config.json")):
        return "model"
    runs = os.path.join(spec, "checkpoints")
    hint = (f"; it looks like a training run: its checkpoints are in {runs} (the newest: {os.path.join(runs, 'last')})"
            if os.path.isdir(runs) else "")
    raise UpcycleError(f"{spec} is neither a model nor an adapter: it has no config.json (a model directory), "
                       f"{ADAPTER_CONFIG} (a LoRA adapter) or {ESFT_CONFIG} (an ESFT checkpoint){hint}")


def _adapted():
    from upcycle.adapters import adapted  # above this module: see the module docstring

    return adapted


def _no_adapter_flags(spec: str, kind: str, base, merge: bool) -> None:
    """``base`` / ``merge`` say what an adapter or an ESFT checkpoint is put on, and how (an ESFT checkpoint is
    always written into its base: ``merge`` changes nothing there); refused for any other model."""
    if kind not in ("adapter", "esft"):
        flag = "base (--base)" if base else "merge (--merge)" if merge else None
        if flag:
            raise UpcycleError(f"{flag} applies to an adapter directory or an ESFT checkpoint; {spec} is a model "
                               "itself")


def load(path: str, experts_backend: str = "auto", dtype=None, device=None, *, base: str | None = None,
         merge: bool = False):
    """``upcycle.load``: an upcycled checkpoint, an ESFT checkpoint or an adapter, as a ready (eval-mode) model.

    ``experts_backend``: ``auto`` (triton on CUDA, else grouped_mm where dtype and shapes
    allow, else loop), ``loop``, ``grouped_mm`` or ``triton``. An ESFT checkpoint (the trained
    experts of a run with ``experts_subset``) loads as its base with those experts written in. An
    adapter directory loads as its recorded base (or ``base``), checked against the recorded
    fingerprint, with the adapter attached unmerged; a QLoRA adapter on its base quantised as it was
    trained (NF4, double quantisation, shared expert base); ``merge=True`` folds it into the
    full-precision base instead (``upcycle.adapters.adapted``).
    """
    return _load(str(path), experts_backend, dtype, device, base, merge, upcycled_only=True)


def _load(spec, experts_backend, dtype, device, base, merge, *, upcycled_only: bool, verify_base: bool = True):
    kind = checkpoint_kind(spec)
    _no_adapter_flags(spec, kind, base, merge)
    if kind == "adapter":
        return _adapted().load_adapted(spec, base, merge=merge, experts_backend=experts_backend, dtype=dtype,
                                       device=device, verify_base=verify_base)
    if kind == "esft":
        return load_esft(spec, base=base, experts_backend=experts_backend, dtype=dtype, device=device,
                         verify_base=verify_base)
    if upcycled_only or (kind == "model" and "upcycle" in read_model_config(spec)):
        return load_upcycled(spec, experts_backend=experts_backend, dtype=dtype, device=device)
    with open_source(spec) as src:
        model = src.load_dense_model()
    if dtype is not None:
        model.to(dtype)
    return model.to(device) if device else model


def load_model(spec: str, experts_backend: str = "auto", device: str | None = None, dtype=None, *,
               base: str | None = None, merge: bool = False, verify_base: bool = True):
    """The model ``spec`` names (eval mode): ``upcycle.load`` for an upcycled, ESFT or adapter directory, else the
    dense source. ``verify_base=False``: ``base`` was checked against the adapter's record by the caller."""
    return _load(str(spec), experts_backend, dtype, device, base, merge, upcycled_only=False, verify_base=verify_base)


def load_tokenizer(spec: str, base: str | None = None):
    """The tokenizer of the model ``spec`` names: its own files; an adapter or ESFT checkpoint without any: its
    base's (``base``: the one it is loaded on, else the recorded one)."""
    from transformers import AutoTokenizer

    spec = str(spec)
    kind = checkpoint_kind(spec)
    if kind in ("adapter", "esft") and not _has_tokenizer(spec):
        return load_tokenizer(base or _recorded_base(spec, kind))
    if kind == "source" or (kind == "model" and "upcycle" not in read_model_config(spec)):
        with open_source(spec) as src:
            return src.load_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError):
        raise UpcycleError(f"{spec} has no tokenizer files") from None


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                 "tokenizer.model"))


def _recorded_base(spec: str, kind: str) -> str:
    if kind == "adapter":
        return _adapted().resolve_base(spec)
    from upcycle.models.esft import esft_base, read_esft_config

    return esft_base(spec, read_esft_config(spec))


def load_model_and_tokenizer(spec: str, experts_backend: str = "auto", device: str | None = None, *,
                             base: str | None = None, merge: bool = False, verify_base: bool = True):
    """(model, tokenizer) for any checkpoint ``load_model`` takes (an adapter's tokenizer: its own files, else its
    base's)."""
    spec = str(spec)
    kind = checkpoint_kind(spec)
    if kind == "source" or (kind == "model" and "upcycle" not in read_model_config(spec)):
        _no_adapter_flags(spec, kind, base, merge)
        with open_source(spec) as src:  # one read of the source for both
            model = src.load_dense_model()
            return (model.to(device) if device else model), src.load_tokenizer()
    model = load_model(spec, experts_backend, device, base=base, merge=merge, verify_base=verify_base)
    adapted = getattr(model, "upcycle_adapted", None)  # upcycle.adapters.adapted.ADAPTED_ATTR: the base it is on
    return model, load_tokenizer(spec, base=adapted.base if adapted is not None else base)
