"""Does upcycling pay? Dense SmolLM2-135M vs its upcycles, continued on the same tokens.

    python benchmarks/does_upcycling_pay.py --steps 30 --out runs/pay

Upcycles the embedded SmolLM2-135M (last 6 MLPs, top-2) to 8 and 32 experts, then runs the
built-in ``continued_pretraining`` recipe with the same settings and the same token budget
(same data order, same seed) on (a) the dense model and (b) each upcycle. Held-out
perplexity (Shakespeare's held-out plays) is measured before training (a fresh upcycle
equals the dense model) and after. Prints a markdown table; results also in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def _eval_rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "eval"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/pay")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=16, help="held-out micro-batches per evaluation")
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides (key=value)")
    a = p.parse_args()

    import upcycle
    from upcycle.train import load_recipe, train

    runs = [("dense", "smollm2-135m", 1)]
    for E in a.experts:
        path = os.path.join(a.out, f"models/smollm2-135m-L6-E{E}")
        if not os.path.isdir(path):
            upcycle.convert(upcycle.ConvertConfig(out=path, model="smollm2-135m", layers=6,
                                                  moe=upcycle.MoEConfig(num_experts=E, top_k=2)))
        runs.append((f"upcycled E={E}", path, E))
    results = []
    for name, model, E in runs:
        out = os.path.join(a.out, name.replace(" ", "-").replace("=", ""))
        cfg = load_recipe("continued_pretraining", [
            f"model={model}", f"out={out}", "overwrite=true", f"max_steps={a.steps}", f"batch_size={a.batch_size}",
            f"micro_batch_size={a.micro_batch_size}", f"data.seq_len={a.seq_len}", "eval_every=null",
            "save_every=null", "keep_last=1", "eval_at_start=true", f"eval_batches={a.eval_batches}",
            "schedule.warmup_steps=3", *a.set])
        print(f"== {name}: {model}", file=sys.stderr)
        t0 = time.perf_counter()
        s = train(cfg)
        wall = time.perf_counter() - t0
        evals = _eval_rows(out)
        info = upcycle.checkpoint.describe(s["last_checkpoint"])
        results.append({
            "model": name, "experts": E, "total_params": info["total_params"],
            "active_params": info["active_params_per_token"], "ppl_before": evals[0]["ppl"],
            "ppl_after": evals[-1]["ppl"], "loss_before": evals[0]["loss"], "loss_after": evals[-1]["loss"],
            "eval_tokens": evals[-1]["eval_tokens"], "train_tokens": s["tokens"], "steps": s["steps"],
            "train_s": s["train_time_s"], "wall_s": round(wall, 1),
        })
    env = {"date": time.strftime("%Y-%m-%d"), "device": "cpu" if not torch.cuda.is_available()
           else torch.cuda.get_device_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "platform": platform.platform(), "args": vars(a)}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"env": env, "results": results}, f, indent=2)
    print(f"\n{env['date']}, {env['device']} ({env['cpus']} cores), torch {env['torch']}; "
          f"{a.steps} steps x {a.batch_size} x {a.seq_len} tokens, same data order and recipe for every model\n")
    print("| model | total params | active/token | held-out ppl before | after | change | train tokens | steps | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        change = 100 * (r["ppl_after"] / r["ppl_before"] - 1)
        print(f"| {r['model']} | {r['total_params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M | "
              f"{r['ppl_before']:.3f} | {r['ppl_after']:.3f} | {change:+.1f}% | {r['train_tokens']:,} | "
              f"{r['steps']} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
