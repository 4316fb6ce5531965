"""The outer loop of ``Trainer``: steps, progress bar, metrics, evaluation, checkpoints, stops."""

from __future__ import annotations

import os
import time

from tqdm.auto import tqdm

from upcycle.io import write_json
from upcycle.train.optim import describe_optimizer


def _window(saved: dict | None = None) -> dict:
    """Sums over the steps since the last metrics line (saved in checkpoints: a resume that
    starts mid-window logs the same line an uninterrupted run would)."""
    return {"ce": 0.0, "targets": 0, "aux": 0.0, "tokens": 0, "steps": 0, "grad_norm": 0.0, **(saved or {}),
            "t0": time.perf_counter()}


def run_loop(t, stop) -> dict:
    """Train ``t`` (a ``Trainer``) to its last step or to a stop; returns the run's summary."""
    cfg, d = t.cfg, t.d
    if d.main:
        _announce(t)
    t0, start_step = time.perf_counter(), t.step
    elapsed_before = float(t.state.get("elapsed_s", 0.0)) if t.state else 0.0
    tokens_seen = int(t.state.get("tokens", 0)) if t.state else 0
    bar = tqdm(total=t.total_steps, initial=t.step, unit="step", dynamic_ncols=True,
               disable=not (d.main and cfg.progress), desc=os.path.basename(os.path.normpath(cfg.out)))
    win, last_eval, saved, stopped = _window(t.state.get("window") if t.state else None), None, [], None

    def epoch() -> float:
        return t.step / t.steps_per_epoch

    def extra() -> dict:
        return {"tokens": tokens_seen, "elapsed_s": elapsed_before + time.perf_counter() - t0,
                "window": {k: v for k, v in win.items() if k != "t0"}}

    if cfg.eval_at_start and t.step == 0:
        last_eval = t.evaluate()
        if last_eval is not None and d.main:
            _log_eval(t, bar, last_eval, 0.0, 0)
    while t.step < t.total_steps:
        r = t.train_step()
        tokens_seen += r["tokens"]
        win["ce"] += r["ce_sum"]
        win["targets"] += r["n_targets"]
        win["aux"] += r["aux_loss"]
        win["tokens"] += r["tokens"]
        win["grad_norm"] = max(win["grad_norm"], r["grad_norm"])
        win["steps"] += 1
        rate = win["tokens"] / max(time.perf_counter() - win["t0"], 1e-9)
        bar.set_postfix(loss=f"{r['lm_loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        done = t.step == t.total_steps
        if t.step % cfg.log_every == 0 or done:
            routing = t.telemetry.summary(d.all_sum)
            if d.main:
                t.metrics.write({
                    "type": "train", "step": t.step, "epoch": round(epoch(), 4), "tokens": tokens_seen,
                    "loss": win["ce"] / max(win["targets"], 1), "aux_loss": win["aux"] / win["steps"],
                    "lr": r["lr"], "grad_norm": win["grad_norm"], "tokens_per_s": rate,
                    "elapsed_s": extra()["elapsed_s"], "routing": routing})
            win = _window()
        epoch_end = t.step % t.steps_per_epoch == 0
        epoch_save = (cfg.save_every_epoch and epoch_end and round(epoch()) >= cfg.save_from_epoch)
        evaluated = None
        if done or epoch_save or (cfg.eval_every and t.step % cfg.eval_every == 0):
            evaluated = last_eval = t.evaluate()
            if evaluated is not None and d.main:
                _log_eval(t, bar, evaluated, epoch(), tokens_seen)
        # Every process stops at the same step, whichever of them got the signal.
        stopped = (stop.signal or "a signal to another process") if d.any(stop.signal is not None) else None
        if done or epoch_save or stopped or (cfg.save_every and t.step % cfg.save_every == 0):
            path = t.save(epoch(), {**extra(), "eval": evaluated})
            saved.append({"step": t.step, "epoch": round(epoch(), 4), "path": path,
                          "eval_loss": evaluated["loss"] if evaluated else None})
        if stopped:
            break
    bar.close()
    summary = {
        "out": cfg.out, "steps": t.step, "total_steps": t.total_steps, "epochs": round(epoch(), 4),
        "tokens": tokens_seen, "train_time_s": round(time.perf_counter() - t0, 1),
        "steps_this_run": t.step - start_step, "stopped_by": stopped,
        "final_eval": last_eval, "checkpoints": saved,
        "last_checkpoint": saved[-1]["path"] if saved else t._last_checkpoint(),
    }
    if d.main:
        write_json(os.path.join(cfg.out, "summary.json"), summary)
    return summary


def _log_eval(t, bar, ev: dict, epoch: float, tokens: int) -> None:
    t.metrics.write({"type": "eval", "step": t.step, "epoch": round(epoch, 4), "tokens": tokens, **ev})
    bar.write(f"step {t.step}: held-out loss {ev['loss']:.4f}, perplexity {ev['ppl']:.2f}")


def _announce(t) -> None:
    cfg, rep = t.cfg, t.data_report
    what = "resuming " + t.resume_from if t.resume_from else "training"
    lines = [f"{what}: {cfg.model} -> {cfg.out}",
             f"data: {len(t.train_ds)} training sequences"
             + (f", {len(t.eval_ds)} held-out" if t.eval_ds is not None else "")
             + f"; {t.steps_per_epoch} steps per epoch of {cfg.batch_size} sequences "
               f"({t.micro_per_step // t.d.world} micro-batches of {cfg.micro_batch_size} x {t.d.world} process(es))",
             f"steps: {t.total_steps} ({t.total_steps / t.steps_per_epoch:.2f} epochs); "
             f"MoE layers: {t.model_info['moe_layers']}"]
    if t.layout is not None:
        lines.append(t.layout.describe())
    if t.changes:
        changed = ", ".join(f"{k} {was} -> {now}" for k, (was, now) in t.changes.items())
        lines.append(f"changed since the checkpoint, applied from step {t.step + 1} as a fresh run with them would: "
                     f"{changed}")
    if "trainable" in t.model_info:
        lines.append(t.model_info["trainable"])
    lines.append(describe_optimizer(cfg.optim.name, t.d.device))
    for line in lines:
        tqdm.write(line)
    write_json(os.path.join(cfg.out, "data.json"), rep)
