"""One loader for every checkpoint kind: what ``upcycle.load``, eval, generate, merge and train open.

    model = load("runs/esft/checkpoints/last")                        # upcycle.load: upcycled or ESFT
    model, tokenizer = load_model_and_tokenizer("runs/smollm2-moe")   # upcycle.load + its tokenizer
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")       # the dense source itself

The kinds know nothing of each other (``upcycled`` loads a directory, ``esft`` builds on it);
this module, above both, picks one.
"""

from __future__ import annotations

import os

from upcycle.errors import UpcycleError
from upcycle.io import read_model_config
from upcycle.models.esft import is_esft_dir, load_esft
from upcycle.models.sources import open_source
from upcycle.models.upcycled import load_upcycled


def load(path: str, experts_backend: str = "auto", dtype=None, device=None):
    """``upcycle.load``: an upcycled checkpoint as a ready (eval-mode) transformers model.

    ``experts_backend``: ``auto`` (triton on CUDA, else grouped_mm where dtype and shapes
    allow, else loop), ``loop``, ``grouped_mm`` or ``triton``. An ESFT checkpoint (the trained
    experts of a run with ``experts_subset``) loads as its base with those experts written in.
    """
    if is_esft_dir(path):
        return load_esft(path, experts_backend=experts_backend, dtype=dtype, device=device)
    return load_upcycled(path, experts_backend=experts_backend, dtype=dtype, device=device)


def _upcycled(spec: str) -> bool:
    """An upcycled checkpoint, or an ESFT checkpoint of one (``upcycle.load`` reads both)."""
    if is_esft_dir(spec):
        return True
    # A damaged config.json of a model directory is its own one-line error, not "not upcycled".
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        return "upcycle" in read_model_config(spec)
    return False


def load_model(spec: str, experts_backend: str = "auto", device: str | None = None):
    """The model ``spec`` names: ``upcycle.load`` for an upcycled directory, else the dense source (eval mode)."""
    if _upcycled(spec):
        return load(spec, experts_backend=experts_backend, device=device)
    with open_source(spec) as src:
        model = src.load_dense_model()
    return model.to(device) if device else model


def load_model_and_tokenizer(spec: str, experts_backend: str = "auto", device: str | None = None):
    """(model, tokenizer) for an upcycled checkpoint dir or any dense source ``--model`` accepts."""
    if _upcycled(spec):
        from transformers import AutoTokenizer

        model = load(spec, experts_backend=experts_backend, device=device)
        try:
            return model, AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError):
            raise UpcycleError(f"{spec} has no tokenizer files") from None
    with open_source(spec) as src:
        model = src.load_dense_model()
        return (model.to(device) if device else model), src.load_tokenizer()
