"""Training checkpoints: the model (full, or the adapter only) plus everything a resume needs.

    out/checkpoints/step-000200/   model weights + config + tokenizer (a loadable checkpoint:
                                   ``upcycle eval`` / ``upcycle.load`` read it as is), or
                                   adapter_config.json + adapter_model.safetensors;
                                   trainer_state.pt: step, optimiser, scheduler, RNG, recipe
    out/checkpoints/last -> step-000200

Written to a temporary directory and renamed when complete, so a kill mid-save leaves the
previous checkpoints whole; the oldest are deleted beyond ``keep_last``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from upcycle.errors import UpcycleError

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_dirs(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints in run directory ``out``, oldest first, as (step, path)."""
    found = []
    for path in glob.glob(os.path.join(out, "checkpoints", "step-*")):
        m = _STEP_DIR.search(os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, STATE_NAME)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str, out: str) -> str | None:
    """The checkpoint directory ``resume`` names (``auto``: the latest in ``out``, None if none)."""
    if resume == "auto":
        found = checkpoint_dirs(out)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_NAME)):
        raise UpcycleError(f"cannot resume from {resume}: not a training checkpoint (no {STATE_NAME})")
    return resume


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, state: dict, *, adapter: bool,
                    tokenizer, base_path: str, fingerprint: str | None, keep_last: int | None, d) -> str:
    """Write checkpoint ``step`` (a collective call: every process must enter it)."""
    from upcycle.train.distributed import unwrap

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = None if adapter else get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    rng = d.gather_objects({"cpu": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None})
    final = os.path.join(out, "checkpoints", f"step-{step:06d}")
    if d.main:
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        inner = unwrap(model)
        if adapter:
            from upcycle.adapters import save_adapter

            save_adapter(inner, tmp, base_path=base_path, fingerprint=fingerprint)
        else:
            inner.save_pretrained(tmp, state_dict=model_sd)
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                    "rng": rng, "world": d.world}, os.path.join(tmp, STATE_NAME))
        if os.path.exists(final):  # the same step saved again (a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point_last(out, final)
        if keep_last is not None:
            for _, old in checkpoint_dirs(out)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def _point_last(out: str, final: str) -> None:
    link = os.path.join(out, "checkpoints", "last")
    tmp = f"{link}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.basename(final), tmp)
    if os.path.isdir(link) and not os.path.islink(link):  # a copy that followed the link (cp -r)
        shutil.rmtree(link)
    os.replace(tmp, link)


def load_trainer_state(path: str) -> dict:
    try:
        # weights_only=False: the state holds the recipe dict and RNG states, written by us.
        return torch.load(os.path.join(path, STATE_NAME), map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for damaged files
        raise UpcycleError(f"cannot read {path}/{STATE_NAME}: {str(e).splitlines()[0]}") from None


def restore(state: dict, model, optimizer, scheduler, d) -> None:
    """Optimiser, scheduler and RNG from a loaded ``trainer_state`` (the weights are loaded already)."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng") or []
    if state.get("world") == d.world and d.rank < len(rng):
        torch.set_rng_state(rng[d.rank]["cpu"])
        if d.device.type == "cuda" and rng[d.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rng[d.rank]["cuda"])
    else:  # another world size: dropout masks cannot continue exactly; reseed per rank
        torch.manual_seed(int(state.get("seed", 0)) * 1009 + int(state["step"]) * 31 + d.rank)
