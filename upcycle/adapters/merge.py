"""``upcycle merge ADAPTER --out DIR [--base PATH]``: a full checkpoint with the adapter folded in.

ADAPTER is a LoRA adapter directory, or an ESFT checkpoint (a run with ``experts_subset`` and
no LoRA: the trained experts only), whose experts are written back into the base.

    merge_command("runs/sft-adapter", "runs/sft-merged")

The base is the adapter's recorded ``base_model_name_or_path`` unless ``base`` is given; either
must have the fingerprint the adapter recorded (``upcycle.models.recorded``: a base moved away
or replaced is one line naming the record and what was found). An upcycled base gives an
upcycled checkpoint (``upcycle.load`` / ``AutoModelForCausalLM`` after ``import upcycle``), a
dense one a plain transformers checkpoint. Written to a temporary directory beside ``out`` and
renamed into place when complete; an existing ``out`` is refused, never overwritten.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm

from upcycle.adapters.adapted import load_adapted, resolve_base
from upcycle.errors import UpcycleError
from upcycle.io import atomic_dir, is_upcycled_dir
from upcycle.models.esft import esft_base, is_esft_dir, load_esft, read_esft_config
from upcycle.models.sources import open_source


def merge_command(adapter_dir: str, out: str, base: str | None = None, progress: bool = False) -> dict:
    """Merge the adapter in ``adapter_dir`` into its base and write the result to ``out``.

    Returns a summary: ``out``, ``base``, ``upcycled`` (whether the result has MoE layers) and
    ``merged_modules`` (how many wrapped modules were folded in). ``progress``: a bar over the
    stages (loading the base, merging, writing), as ``upcycle merge`` shows, once the base is
    found and checked (a wrong one is a single line, with no bar before it).
    """
    out = os.path.normpath(out)
    exists = f"{out} already exists; merge never overwrites: choose another --out"
    if os.path.exists(out):
        raise UpcycleError(exists)
    if is_esft_dir(adapter_dir):
        return _merge_esft(adapter_dir, out, base, exists, progress)
    # Found and checked before anything big is loaded.
    # (Also reached from `upcycle export ADAPTER`, which has no --base: the hint names merge.)
    base = resolve_base(adapter_dir, base, hint=f"; give the right one: upcycle merge {adapter_dir} --base BASE "
                                                "--out DIR")
    with _Stages(progress) as stage:
        # The very model upcycle.load(adapter_dir, merge=True) gives (the adapter folded into the full-precision base).
        model = load_adapted(adapter_dir, base, merge=True, verify_base=False, stage=stage)
        n = model.upcycle_adapted.modules
        stage("writing")
        _write(model, base, out, exists)
    return {"out": out, "base": base, "upcycled": is_upcycled_dir(out), "merged_modules": n}


class _Stages:
    """A progress bar over merge's three stages; ``stage(name)`` starts the next one."""

    def __init__(self, progress: bool):
        self.bar = tqdm(total=3, desc="merging", unit="stage", disable=not progress)
        self.started = False

    def __enter__(self):
        return self

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(name)

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.bar.update()
        self.bar.close()


def _write(model, base: str, out: str, exists: str) -> None:
    with atomic_dir(out, exists_message=exists) as tmp:
        model.save_pretrained(tmp)
        with open_source(base) as src:
            src.save_tokenizer(tmp)
            if not os.path.isfile(os.path.join(tmp, "generation_config.json")):
                src.generation_config().save_pretrained(tmp)


def _merge_esft(path: str, out: str, base: str | None, exists: str, progress: bool) -> dict:
    """An ESFT checkpoint (trained experts and modules only) written back into its base."""
    raw = read_esft_config(path)
    base = esft_base(path, raw, base)  # a one-line error for a missing, moved or changed base
    with _Stages(progress) as stage:
        stage("loading the base")
        model = load_esft(path, base=base, verify_base=False)
        stage("merging")  # the trained experts are written in as the base loads
        stage("writing")
        _write(model, base, out, exists)
    n = sum(len(ids) for ids in raw["experts_subset"].values())
    return {"out": out, "base": base, "upcycled": is_upcycled_dir(out), "merged_modules": len(raw["experts_subset"]),
            "merged_experts": n}
