"""An adapter directory opened as the model it adapts: what ``upcycle.load``, eval, generate and merge do with one.

    model = load_adapted("runs/qlora/checkpoints/last")              # its NF4 base as trained, adapter on, unmerged
    model = load_adapted("runs/lora/checkpoints/last", merge=True)   # folded into the full-precision base
    model = load_adapted(ad, base="/data/copy-of-base")               # the base elsewhere (same fingerprint)
    print(model.upcycle_adapted.label)                               # "QLoRA adapter on its NF4 base"

Like PEFT's ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)``: the adapter records its
base (``base_model_name_or_path``, and here its fingerprint); the base is found and checked
(``upcycle.models.recorded``: a base moved away or replaced is one line naming the record and what
was found), loaded, and the adapter attached.

* A LoRA adapter goes on the base as stored, unmerged (``merge_lora`` / ``unload_lora`` still work).
* A QLoRA adapter was fitted to its NF4 base, not to the full-precision weights: the base is
  quantised again exactly as training quantised it (the adapter's ``upcycle.quantization`` record:
  modules, NF4, double quantisation, blocksize, shared expert base, dtypes; ``nf4_record``), so its
  logits are the training model's at that step. Adapters saved before the record existed: a
  training checkpoint's ``trainer_state.pt`` says whether the run was QLoRA, and the trainer of
  that time always quantised the same way (q/k/v/o and, with expert LoRA, every experts module,
  blocksize 64, double quantisation, shared base where the experts were copies, compute in bf16 on
  CUDA and fp32 elsewhere); without one, the full-precision base is used and a warning says so.
* ``merge=True``: the adapter folded into the full-precision base (``upcycle merge`` writes this
  very model); for QLoRA that is another model than the one trained (the NF4 rounding is gone):
  ``docs/benchmarks.md`` measures the difference.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch

from upcycle.adapters.inject import lora_modules, merge_and_unload
from upcycle.adapters.nf4_record import describe_record, nf4_record, quantize_as_recorded, record_dtype
from upcycle.adapters.peft_io import adapter_base, is_adapter_dir, load_adapter, read_adapter_config
from upcycle.adapters.qlora import quantize_model
from upcycle.errors import UpcycleError
from upcycle.models.loader import load_model

__all__ = ["ADAPTED_ATTR", "Adapted", "base_quantizer", "load_adapted", "resolve_base"]

log = logging.getLogger("upcycle")

ADAPTED_ATTR = "upcycle_adapted"  # the model's ``Adapted``: what ``load_adapted`` made of which adapter
HINT = "; name the right one: --base BASE (Python: base=BASE)"
TRAINER_STATE = "trainer_state.pt"  # a training checkpoint's state (upcycle.train.checkpointing writes it)


@dataclass
class Adapted:
    """What ``load_adapted`` returned: which adapter on which base, and how."""

    adapter: str
    """The adapter directory."""
    base: str
    """The base it was loaded on (found and checked by its fingerprint)."""
    merged: bool
    """True: folded into the full-precision base; False: attached unmerged."""
    quantization: str | None
    """The base's quantisation in words (``nf4_record.describe_record``); None: full precision."""
    modules: int
    """How many modules the adapter wraps (merged or not)."""

    def describe(self) -> str:
        """One line: ``runs/q/step-6: QLoRA adapter on its NF4 base /abs/runs/moe, NF4 (double quantisation, ...)``."""
        return f"{self.adapter}: {self.label} {self.base}" + (f", {self.quantization}" if self.quantization else "")

    @property
    def label(self) -> str:
        """Which model this is, for tables: ``LoRA adapter on its base``, ``QLoRA adapter on its NF4 base``,
        ``adapter merged into its full-precision base``."""
        if self.merged:
            return "adapter merged into its full-precision base"
        return "QLoRA adapter on its NF4 base" if self.quantization else "LoRA adapter on its base"


def resolve_base(adapter_dir: str, base: str | None = None, hint: str = HINT) -> str:
    """The adapter's base (``base`` if given, else the recorded one), checked against its recorded fingerprint."""
    raw = read_adapter_config(adapter_dir)
    found = adapter_base(adapter_dir, raw, base, hint=hint)
    if is_adapter_dir(found):
        raise UpcycleError(f"the base of adapter {adapter_dir} is itself an adapter ({found}): merge that one first "
                           f"(upcycle merge {found} --out DIR) and name the result: --base DIR")
    return found


def base_quantizer(adapter_dir: str, raw: dict):
    """How to rebuild the base the adapter was trained on: ``quantise(model)`` (in place, on the full-precision
    base), or None for the full-precision base itself; from the adapter's record, or for an older adapter
    from its training checkpoint (see the module docstring)."""
    ext = raw.get("upcycle")
    if not ext:  # an adapter PEFT made: PEFT records no quantisation of ours, its base is the one it names
        return None
    if "quantization" in ext:
        record = ext["quantization"]
        if not record:
            return None
        return lambda model: quantize_as_recorded(model, record, where=f"adapter {adapter_dir}")
    recipe, cuda = _trained_with(adapter_dir)
    if recipe is None:
        warnings.warn(f"adapter {adapter_dir} does not record whether its base was quantised (saved before upcycle "
                      f"recorded it) and is no training checkpoint that says: loaded on the full-precision base; if "
                      f"it was trained with QLoRA, its outputs are not the trained model's", stacklevel=3)
        return None
    if not recipe.get("nf4"):
        return None
    experts = bool((recipe.get("lora") or {}).get("experts", True))
    compute = torch.bfloat16 if cuda else torch.float32

    def quantise(model):
        # What upcycle.train.model.build_model did before the record existed.
        model.float()
        quantize_model(model, experts=experts, compute_dtype=compute)
    log.info("adapter %s records no quantisation of its base (saved before upcycle recorded it); its checkpoint "
             "says the run was QLoRA: the base is quantised as that trainer did (NF4, double quantisation, "
             "blocksize 64, q/k/v/o%s, compute in %s)", adapter_dir, " and experts" if experts else "",
             str(compute).removeprefix("torch."))
    return quantise


def _trained_with(adapter_dir: str) -> tuple[dict | None, bool]:
    """(the recipe, trained on CUDA) of the training checkpoint ``adapter_dir``; (None, False) if it is none."""
    path = os.path.join(adapter_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        return None, False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged files
        raise UpcycleError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    recipe = state.get("recipe") if isinstance(state, dict) else None
    if not isinstance(recipe, dict):
        return None, False
    rng = state.get("rng") or [{}]
    return recipe, isinstance(rng, list) and isinstance(rng[0], dict) and rng[0].get("cuda") is not None


def load_adapted(adapter_dir: str, base: str | None = None, *, merge: bool = False, experts_backend: str = "auto",
                 dtype=None, device=None, verify_base: bool = True, hint: str = HINT, stage=None):
    """The model the adapter in ``adapter_dir`` adapts, with it on (eval mode); see the module docstring.

    ``base``: where the base is (default: the recorded one), checked against the recorded fingerprint
    (``verify_base=False``: the caller did, with ``resolve_base``). ``merge``: fold the adapter into the
    full-precision base. ``dtype``: the base's (default: as stored; a QLoRA base: the precision it was
    quantised from, as trained). ``hint`` ends a wrong-base error line. ``stage(name)``: told when loading
    and merging start (``upcycle merge``'s progress bar). ``model.upcycle_adapted`` says what was made.
    """
    raw = read_adapter_config(adapter_dir)
    if verify_base or not base:
        base = resolve_base(adapter_dir, base, hint)
    quantise = None if merge else base_quantizer(adapter_dir, raw)
    if stage:
        stage("loading the base")
    model = load_model(base, experts_backend=experts_backend, dtype=dtype)
    if quantise is not None:
        record = (raw.get("upcycle") or {}).get("quantization")
        if dtype is None and record_dtype(record) is not None:
            # The trainer quantised its float32 master weights and ran the rest of the model in that precision.
            model.to(record_dtype(record))
        quantise(model)
    record = nf4_record(model)  # what the base is now, in words for the caller
    load_adapter(model, adapter_dir, base_path=base, verify_base=False)
    modules = len(lora_modules(model))
    if merge:
        if stage:
            stage("merging")
        merge_and_unload(model)
    if device is not None:
        model.to(device)
    info = Adapted(adapter=str(adapter_dir), base=base, merged=merge,
                   quantization=describe_record(record) if record else None, modules=modules)
    setattr(model, ADAPTED_ATTR, info)
    return model.eval()
