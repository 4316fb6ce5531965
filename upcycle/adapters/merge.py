"""``upcycle merge ADAPTER --out DIR [--base PATH]``: a full checkpoint with the adapter folded in.

ADAPTER is a LoRA adapter directory, or an ESFT checkpoint (a run with ``experts_subset`` and
no LoRA: the trained experts only), whose experts are written back into the base.

    merge_command("runs/sft-adapter", "runs/sft-merged")

The base is the adapter's recorded ``base_model_name_or_path`` unless ``base`` is given; its
fingerprint must match the adapter's record. An upcycled base gives an upcycled checkpoint
(``upcycle.load`` / ``AutoModelForCausalLM`` after ``import upcycle``), a dense one a plain
transformers checkpoint. Written to a temporary directory beside ``out`` and renamed into
place when complete; an existing ``out`` is refused, never overwritten.
"""

from __future__ import annotations

import os

from upcycle.adapters.inject import lora_modules, merge_and_unload
from upcycle.adapters.peft_io import check_base, load_adapter, read_adapter_config
from upcycle.errors import UpcycleError
from upcycle.io import atomic_dir, is_upcycled_dir
from upcycle.models.esft import is_esft_dir, load_esft, read_esft_config
from upcycle.models.loader import load_model
from upcycle.models.sources import open_source


def merge_command(adapter_dir: str, out: str, base: str | None = None) -> dict:
    """Merge the adapter in ``adapter_dir`` into its base and write the result to ``out``.

    Returns a summary: ``out``, ``base``, ``upcycled`` (whether the result has MoE layers) and
    ``merged_modules`` (how many wrapped modules were folded in).
    """
    out = os.path.normpath(out)
    exists = f"{out} already exists; merge never overwrites: choose another --out"
    if os.path.exists(out):
        raise UpcycleError(exists)
    if is_esft_dir(adapter_dir):
        return _merge_esft(adapter_dir, out, base, exists)
    raw = read_adapter_config(adapter_dir)
    base = base or raw.get("base_model_name_or_path")
    if not base:
        raise UpcycleError(f"adapter {adapter_dir} does not record its base model: pass --base")
    if not os.path.exists(base):
        try:
            open_source(base).close()  # an alias or hub id is fine; anything else is a clear error
        except UpcycleError as e:
            raise UpcycleError(f"base model of adapter {adapter_dir} not found ({e}); pass --base") from None
    check_base(adapter_dir, raw, base)  # before loading anything big
    model = load_model(base)
    load_adapter(model, adapter_dir, base_path=base, verify_base=False)
    n = len(lora_modules(model))
    merge_and_unload(model)
    _write(model, base, out, exists)
    return {"out": out, "base": base, "upcycled": is_upcycled_dir(out), "merged_modules": n}


def _write(model, base: str, out: str, exists: str) -> None:
    with atomic_dir(out, exists_message=exists) as tmp:
        model.save_pretrained(tmp)
        with open_source(base) as src:
            src.save_tokenizer(tmp)
            if not os.path.isfile(os.path.join(tmp, "generation_config.json")):
                src.generation_config().save_pretrained(tmp)


def _merge_esft(path: str, out: str, base: str | None, exists: str) -> dict:
    """An ESFT checkpoint (trained experts and modules only) written back into its base."""
    raw = read_esft_config(path)
    base = base or raw.get("base_model_name_or_path")
    model = load_esft(path, base=base)  # a one-line error for a missing base; checks the fingerprint first
    _write(model, base, out, exists)
    n = sum(len(ids) for ids in raw["experts_subset"].values())
    return {"out": out, "base": base, "upcycled": is_upcycled_dir(out), "merged_modules": len(raw["experts_subset"]),
            "merged_experts": n}
