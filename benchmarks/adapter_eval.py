"""Held-out loss of an adapter as trained, unmerged and merged (docs/benchmarks.md, "Adapters as models").

    python benchmarks/adapter_eval.py                  # demo upcycle (6 layers x 8 experts), short lora_sft + qlora_sft
    python benchmarks/adapter_eval.py --experts 32 --steps 4 --eval-batches 16

Converts the demo upcycle of the embedded SmolLM2-135M (``upcycle convert --layers 6 --experts E``)
if it is missing, trains ``lora_sft`` and ``qlora_sft`` a few steps with CPU-sized overrides (the
recipes' header comments; kept and reused when their runs exist), then evaluates on the runs'
own held-out conversations (the recipe's 2% split, response tokens only, as the trainer
evaluates), each model as ``upcycle.load`` gives it:

* the base (full precision);
* QLoRA only: the NF4 base alone, quantised as the run quantised it (what quantisation costs);
* the adapter unmerged: LoRA on the full-precision base, QLoRA on its NF4 base (the model it was
  fitted to, ``upcycle.load(adapter)``);
* the adapter merged into the full-precision base (``upcycle.load(adapter, merge=True)``, what
  ``upcycle merge`` writes).

For QLoRA, merged minus NF4-unmerged is what a user gives up (or gains) by merging the adapter
into full-precision weights: the adapter was fitted to the NF4 rounding, which merging removes.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

import upcycle
from upcycle.inference import format_table

CPU_OVERRIDES = ["max_steps={steps}", "data.curate.target=32", "data.seq_len=256", "batch_size=8",
                 "micro_batch_size=4", "eval_batches=2", "progress=false"]


def ensure_model(path: str, experts: int) -> str:
    if not os.path.isdir(path):
        upcycle.convert(upcycle.ConvertConfig(out=path, model="smollm2-135m", layers=6,
                                              moe=upcycle.MoEConfig(num_experts=experts), progress=False))
    return path


def ensure_run(recipe: str, model: str, out: str, steps: int) -> tuple[str, object, float | None]:
    """(the run's last checkpoint, its recipe, seconds it took or None if it existed)."""
    from upcycle.train import load_recipe, train

    overrides = [f"model={model}", f"out={out}", *(o.format(steps=steps) for o in CPU_OVERRIDES)]
    cfg = load_recipe(recipe, overrides)
    last = os.path.join(out, "checkpoints", "last")
    if os.path.isdir(last):
        return os.path.realpath(last), cfg, None
    t0 = time.perf_counter()
    s = train(cfg)
    return s["last_checkpoint"], cfg, time.perf_counter() - t0


@torch.no_grad()
def held_out_loss(model, eval_ds, pad_id: int, micro: int, batches: int | None) -> tuple[float, int]:
    """(cross-entropy per target token, target tokens) over the held-out set, as the trainer computes it."""
    from upcycle.data import collate

    idx = list(range(len(eval_ds)))
    chunks = [idx[i:i + micro] for i in range(0, len(idx), micro)][:batches]
    ce, n = 0.0, 0
    for part in chunks:
        b = collate([eval_ds[k] for k in part], pad_id=pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:].flatten()
        ce += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels, ignore_index=-100, reduction="sum").item()
        n += int((labels != -100).sum())
    return ce / max(n, 1), n


def nf4_base(model_path: str, adapter: str):
    """The base alone, quantised as the adapter records its run quantised it."""
    from upcycle.adapters import quantize_as_recorded, read_adapter_config

    record = read_adapter_config(adapter)["upcycle"]["quantization"]
    model = upcycle.load(model_path).float()
    quantize_as_recorded(model, record, where=f"adapter {adapter}")
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8, help="experts of the demo upcycle (the README's demo: 32)")
    p.add_argument("--model", default=None, help="upcycled base (default: runs/smollm2-135m-L6-E<experts>)")
    p.add_argument("--runs", default="runs/bench-adapter-eval", help="where the two training runs go")
    p.add_argument("--steps", type=int, default=4, help="training steps of each recipe")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out micro-batches of 4 (None: all)")
    a = p.parse_args()
    torch.manual_seed(0)
    model_path = ensure_model(a.model or f"runs/smollm2-135m-L6-E{a.experts}", a.experts)
    from upcycle.data import build_datasets
    from upcycle.models.loader import load_tokenizer

    rows, gaps = [], []
    for recipe in ("lora_sft", "qlora_sft"):
        ckpt, cfg, took = ensure_run(recipe, model_path, os.path.join(a.runs, recipe), a.steps)
        tok = load_tokenizer(model_path)
        if tok.pad_token_id is None:  # as the trainer does
            tok.pad_token = tok.eos_token
        _, eval_ds, _ = build_datasets(cfg.data, tok, seed=cfg.seed, log=lambda *_: None)
        models = [("base (full precision)", lambda: upcycle.load(model_path))]
        if cfg.nf4:
            models.append(("NF4 base alone", lambda: nf4_base(model_path, ckpt)))
        models += [("adapter unmerged" + (" (on its NF4 base, as trained)" if cfg.nf4 else ""),
                    lambda: upcycle.load(ckpt)),
                   ("adapter merged (full precision)", lambda: upcycle.load(ckpt, merge=True))]
        losses = {}
        for what, load in models:
            t0 = time.perf_counter()
            model = load()
            loss, n = held_out_loss(model, eval_ds, tok.pad_token_id, cfg.micro_batch_size, a.eval_batches)
            losses[what] = loss
            rows.append([recipe, what, f"{loss:.4f}", f"{math.exp(loss):.3f}", f"{loss - losses[models[0][0]]:+.4f}", n,
                         f"{time.perf_counter() - t0:.0f}"])
            del model
        if took is not None:
            print(f"{recipe}: trained {a.steps} steps in {took:.0f} s -> {ckpt}")
        unmerged, merged = (losses[w] for w, _ in models[-2:])
        gaps.append(f"{recipe}: merged - unmerged = {merged - unmerged:+.5f} nats/token")
    print(f"{datetime.date.today()}, {platform.node() or 'host'}: {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"base {model_path}")
    print(format_table(["run", "model", "held-out loss", "ppl", "vs base", "target tokens", "seconds"], rows))
    print("\n".join(gaps))


if __name__ == "__main__":
    main()
