"""Training checkpoints: the model (full, or the adapter only) plus everything a resume needs.

    out/checkpoints/step-000200/   model weights + config + tokenizer (a loadable checkpoint:
                                   ``upcycle eval`` / ``upcycle.load`` read it as is), or
                                   adapter_config.json + adapter_model.safetensors, or (a full
                                   run with experts_subset) esft_config.json + esft_model.safetensors;
                                   trainer_state.pt: step, scheduler, RNG, recipe, log window;
                                   optimizer.pt: the optimizer's state (newest checkpoint only;
                                   8-bit AdamW's quantised moments as they are)
    out/checkpoints/last -> step-000200

Written to a temporary directory and renamed when complete (``upcycle.io.atomic_dir``), so a
kill mid-save leaves the previous checkpoints whole; the oldest are deleted beyond ``keep_last``.
"""

from __future__ import annotations

import contextlib
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

from upcycle.adapters.peft_io import read_adapter_config, save_adapter
from upcycle.errors import UpcycleError
from upcycle.io import atomic_dir, read_json_object, remove_stale
from upcycle.models.esft import read_esft_config, save_esft
from upcycle.models.recorded import check_fingerprint
from upcycle.train.distributed import unwrap

STATE_NAME = "trainer_state.pt"
OPTIM_NAME = "optimizer.pt"  # only the newest checkpoint keeps it: older ones are weights for selection
_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_dirs(out: str, resumable: bool = False) -> list[tuple[int, str]]:
    """Complete checkpoints in run directory ``out`` (with ``resumable``: those that keep the
    optimiser state), oldest first, as (step, path)."""
    found = []
    for path in glob.glob(os.path.join(out, "checkpoints", "step-*")):
        m = _STEP_DIR.search(os.path.basename(path))
        need = (STATE_NAME, OPTIM_NAME) if resumable else (STATE_NAME,)
        if m and all(os.path.isfile(os.path.join(path, f)) for f in need):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str, out: str) -> str | None:
    """The checkpoint directory ``resume`` names (``auto``: the latest in ``out``, None if none)."""
    if resume == "auto":
        found = checkpoint_dirs(out, resumable=True)
        if not found and checkpoint_dirs(out):
            raise UpcycleError(f"{out} has checkpoints but none with the optimiser state (a save was cut short?); "
                               "resume from one explicitly is not possible either: start anew with overwrite=true")
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_NAME)):
        raise UpcycleError(f"cannot resume from {resume}: not a training checkpoint (no {STATE_NAME})")
    if not os.path.isfile(os.path.join(resume, OPTIM_NAME)):
        raise UpcycleError(f"cannot resume from {resume}: it holds weights only (the optimiser state is kept in "
                           "the newest checkpoint of a run); resume from that one")
    return resume


def drop_after(out: str, step: int) -> None:
    """Delete checkpoints later than ``step``: resuming from an earlier one abandons them."""
    for s, path in checkpoint_dirs(out):
        if s > step:
            shutil.rmtree(path)


def remove_partial(out: str) -> None:
    """Delete checkpoint directories a killed save left half-written (and put back one it had moved aside)."""
    folder = os.path.join(out, "checkpoints")
    if os.path.isdir(folder):
        remove_stale(folder)


# Settings that decide which examples step N sees and how: a resume must not change them.
_PINNED = ("model", "seed", "batch_size", "data", "lora", "nf4", "experts_subset")


def check_compatible(state: dict, cfg, path: str) -> None:
    import dataclasses

    old, new = state.get("recipe") or {}, dataclasses.asdict(cfg)
    # A key the checkpoint predates (experts_subset) was None then: adding it on resume is a change.
    changed = [k for k in _PINNED if old.get(k) != new[k]]
    if changed:
        raise UpcycleError(f"cannot resume from {path}: the recipe changed {', '.join(changed)} since it was "
                           "saved (those decide what each step trains on); start a new run with another out=")
    # Checkpoints from before optim.name were written by torch's AdamW.
    was, now = (old.get("optim") or {}).get("name", "adamw"), cfg.optim.name
    if was != now:
        raise UpcycleError(f"cannot resume from {path}: its optimizer state is {was}'s and the recipe asks for {now} "
                           f"(their states do not convert); resume with optim.name={was}, or start a new run with "
                           "another out=")


def check_steps(state: dict, total_steps: int, path: str) -> None:
    """A resume must not end before the step its checkpoint reached."""
    step = int(state["step"])
    if total_steps < step:
        raise UpcycleError(f"cannot resume from {path}: it is at step {step}, and the recipe ends at step "
                           f"{total_steps} (max_steps or epochs); raise it, or evaluate that checkpoint as it is")


def check_same_data(state: dict, train_report: dict, path: str) -> None:
    """The training set a resume builds must be the one the checkpoint trained on (``data`` is pinned, but
    the files it names can change, and so can how a version of upcycle reads them)."""
    was = state.get("data")
    if was is None:  # checkpoints from before it was recorded: the run directory's data.json, if any
        try:
            run_dir = os.path.dirname(os.path.dirname(path))
            was = read_json_object(os.path.join(run_dir, "data.json"), "a data report")["train"]
        except (UpcycleError, KeyError):
            return
    if was != train_report:
        def brief(r):
            return ", ".join(f"{k} {v}" for k, v in r.items() if k != "source") if isinstance(r, dict) else r

        raise UpcycleError(f"cannot resume from {path}: the training set is not the one it trained on ({brief(was)} "
                           f"then, {brief(train_report)} now: a data file changed?); start a new run with another out=")


_NOT_SETTINGS = ("out", "resume", "overwrite", "progress", "tensorboard")


def recipe_changes(old: dict | None, cfg) -> dict[str, list]:
    """{dotted key: [the checkpoint's value, the recipe's]} of every setting a resume changes (the pinned
    ones are refused before: ``check_compatible``). A key the checkpoint predates is no change."""
    import dataclasses

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    was, now = flat(old or {}), flat(dataclasses.asdict(cfg))
    return {k: [was[k], v] for k, v in now.items()
            if k.split(".")[0] not in _NOT_SETTINGS and k in was and was[k] != v}


def check_adapter_base(path: str, model: str, fingerprint: str | None, kind: str = "adapter") -> None:
    """An adapter (or ESFT) checkpoint resumes only onto the base it was trained on: the recipe's
    ``model`` (fingerprint ``fingerprint``) must have the fingerprint the checkpoint recorded."""
    if kind == "esft":
        raw = read_esft_config(path)
        want, recorded = raw.get("base_fingerprint"), raw.get("base_model_name_or_path")
    else:
        raw = read_adapter_config(path)
        want, recorded = (raw.get("upcycle") or {}).get("base_fingerprint"), raw.get("base_model_name_or_path")
    if fingerprint:
        what = "the base its " + ("trained experts were" if kind == "esft" else "adapter was") + " trained on"
        check_fingerprint(model, want, what=f"cannot resume from {path}: {what}", recorded=recorded, have=fingerprint,
                          hint="; resume with that model=, or start a new run with another out=")


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, state: dict, *, kind: str,
                    tokenizer, base_path: str, fingerprint: str | None, keep_last: int | None, d,
                    layout=None) -> str:
    """Write checkpoint ``step`` (a collective call: every process must enter it). ``kind``: ``full``
    (the whole model), ``adapter`` (the LoRA adapter) or ``esft`` (the trained experts and modules;
    ``state["experts_subset"]`` names the experts). ``layout``: the run's ``ExpertLayout`` if its experts
    are sharded over ranks: gathered to the main process first, so the checkpoint is the one-process one."""
    whole_adapters = contextlib.nullcontext()
    if layout is not None:
        model_sd = layout.full_model_state_dict(model, d.main) if kind == "full" else None
        optim_sd = layout.full_optimizer_state_dict(model, optimizer, d.main)
        if kind == "adapter":
            whole_adapters = layout.whole_adapters(unwrap(model), d.main)
    else:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=opts) if kind == "full" else None
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    rng = d.gather_objects({"cpu": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None})
    final = os.path.join(out, "checkpoints", f"step-{step:06d}")
    with whole_adapters:
        if d.main:
            _write(final, model, model_sd, optim_sd, scheduler, state, step, kind, tokenizer, base_path, fingerprint,
                   rng, d.world)
    if d.main:
        _point_last(out, final)
        kept = checkpoint_dirs(out)
        if keep_last is not None:
            for _, old in kept[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        for _, old in kept[:-1]:  # AdamW's state is twice the weights: the newest checkpoint's suffices
            if os.path.exists(os.path.join(old, OPTIM_NAME)):
                os.remove(os.path.join(old, OPTIM_NAME))
    d.barrier()
    return final


def _write(final: str, model, model_sd, optim_sd, scheduler, state: dict, step: int, kind: str, tokenizer,
           base_path: str, fingerprint: str | None, rng, world: int) -> None:
    """The main process's part of ``save_checkpoint``: the checkpoint directory, written aside and renamed."""
    inner = unwrap(model)
    # The same step saved again (a resumed run) is swapped whole.
    with atomic_dir(final, overwrite=True) as tmp:
        if kind == "adapter":
            save_adapter(inner, tmp, base_path=base_path, fingerprint=fingerprint)
        elif kind == "esft":
            sub = state["experts_subset"]
            save_esft(inner, tmp, base_path=base_path, fingerprint=fingerprint, subset=sub["experts"],
                      settings=sub["settings"])
        else:
            inner.save_pretrained(tmp, state_dict=model_sd)
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng, "world": world},
                   os.path.join(tmp, STATE_NAME))
        torch.save(optim_sd, os.path.join(tmp, OPTIM_NAME))


def _point_last(out: str, final: str) -> None:
    link = os.path.join(out, "checkpoints", "last")
    tmp = f"{link}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.basename(final), tmp)
    if os.path.isdir(link) and not os.path.islink(link):  # a copy that followed the link (cp -r)
        shutil.rmtree(link)
    os.replace(tmp, link)


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged files
        raise UpcycleError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def load_trainer_state(path: str) -> dict:
    """The trainer state of checkpoint ``path``, with its optimiser state under ``optimizer``."""
    return {**_load(os.path.join(path, STATE_NAME)), "optimizer": _load(os.path.join(path, OPTIM_NAME))}


# What the recipe sets in each optimiser group (the group's peak lr is ``initial_lr``); the loaded state keeps
# the rest (moments, step counts, bitsandbytes' quantisation settings).
_RECIPE_GROUP_KEYS = ("initial_lr", "betas", "eps", "weight_decay")


def restore(state: dict, model, optimizer, scheduler, d, layout=None) -> None:
    """Optimiser, scheduler and RNG from a loaded ``trainer_state`` (the weights are loaded already), with the
    recipe's settings applied from the checkpoint's step on.

    ``optimizer`` and ``scheduler`` come built from the recipe; loading the state would bring back the
    settings of the run that saved it (its learning rates, betas, weight decay) while ``recipe.yaml``
    says otherwise. So the recipe's are put back, and every group's learning rate is the schedule's
    (a function of the step and the run's length: ``lr_factor``) at this step: what a fresh run with
    this recipe has at this step. Unchanged settings give the same bits as before (resume is exact).

    ``layout``: the run's ``ExpertLayout`` if its experts are sharded: each rank takes its experts' rows of
    the (one-process) optimiser state, whatever layout saved it.
    """
    recipe = [{k: g[k] for k in ("name", *_RECIPE_GROUP_KEYS) if k in g} for g in optimizer.param_groups]
    try:
        optim_sd = state["optimizer"] if layout is None else layout.local_optimizer_state(state["optimizer"])
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd,
                                 options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as e:
        raise UpcycleError(f"the checkpoint's optimiser state does not fit this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    scheduler.load_state_dict(state["scheduler"])
    groups = optimizer.param_groups  # the same construction as the checkpoint's (its settings are pinned)
    if [g.get("name") for g in groups] != [r["name"] for r in recipe]:
        raise UpcycleError(f"the checkpoint's optimiser groups ({', '.join(str(g.get('name')) for g in groups)}) are "
                           f"not this recipe's ({', '.join(r['name'] for r in recipe)})")
    for g, r in zip(groups, recipe):
        g.update(r)
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    for g, factor in zip(groups, scheduler.lr_lambdas):
        g["lr"] = g["initial_lr"] * factor(scheduler.last_epoch)  # LambdaLR's own formula: bit for bit
    rng = state.get("rng") or []
    if state.get("world") == d.world and d.rank < len(rng):
        torch.set_rng_state(rng[d.rank]["cpu"])
        if d.device.type == "cuda" and rng[d.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rng[d.rank]["cuda"])
    else:  # another world size: dropout masks cannot continue exactly; reseed per rank
        torch.manual_seed(int(state.get("seed", 0)) * 1009 + int(state["step"]) * 31 + d.rank)
