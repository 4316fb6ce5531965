"""Run by tests/test_expert_parallel.py under torchrun (gloo): expert parallelism against one process.

    torchrun --standalone --nproc-per-node 2 tests/ep_worker.py block OUT.pt
    torchrun --standalone --nproc-per-node 4 tests/ep_worker.py train SPEC.json

``block``: one MoEBlock per case (routing, backend, padding, LoRA on the experts), its experts sharded
over all ranks; every rank also builds the whole block (same seed) and runs its own micro-batch
through it; rank 0 writes the largest differences (outputs, input and router gradients, expert
gradients summed over every rank's tokens) and the bitwise verdicts to OUT.pt.

``train``: trainer runs one after another (a JSON list of recipes), each writing its run directory;
with ``grads`` in the spec, the full gradient of every parameter (gathered from every rank as a
checkpoint gathers the weights) before each optimiser step, to ``<out>/grads.pt``.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.distributed as dist



def block_cases():
    for routing in ("topk", "expert-choice"):
        for backend in ("loop", "grouped_mm"):
            for padded in (False, True):
                yield dict(routing=routing, backend=backend, padded=padded, lora=False)
    yield dict(routing="topk", backend="grouped_mm", padded=True, lora=True)
    yield dict(routing="expert-choice", backend="loop", padded=False, lora=True)


def run_block(out_path: str) -> None:
    from upcycle.adapters.lora import LoraExperts
    from upcycle.config import MoEConfig
    from upcycle.moe import MoEBlock
    from upcycle.moe.expert_parallel import ExpertParallel, agree_on_batches, shard_stacked

    rank, world = dist.get_rank(), dist.get_world_size()
    E, D, F, B, S = 8, 16, 32, 3, 5
    results = []
    for case in block_cases():
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=E, routing=case["routing"], top_k=2, capacity=2.0)
        full = MoEBlock(cfg, D, F, gated=True, activation="silu", backend=case["backend"])
        with torch.no_grad():
            full.router.weight.mul_(20)  # routing far from uniform: some experts get no token on some rank
        sharded = MoEBlock(cfg, D, F, gated=True, activation="silu", backend=case["backend"])
        sharded.load_state_dict(full.state_dict())
        if case["lora"]:
            full.experts = LoraExperts(full.experts, r=2, alpha=4)
            with torch.no_grad():
                full.experts.lora_B_in.normal_()
                full.experts.lora_B_down.normal_()
            sharded.experts = LoraExperts(sharded.experts, r=2, alpha=4)
            sharded.experts.load_state_dict(full.experts.state_dict())
        ep = ExpertParallel(dist.group.WORLD, E)
        target = sharded.experts.base_layer if case["lora"] else sharded.experts
        shard_stacked(target, ep.lo, ep.hi)
        if case["lora"]:
            for name in ("lora_A_in", "lora_B_in", "lora_A_down", "lora_B_down"):
                p = getattr(sharded.experts, name)
                setattr(sharded.experts, name, torch.nn.Parameter(p.detach()[ep.lo:ep.hi].clone()))
        sharded.expert_parallel = ep
        holder = torch.nn.Module()
        holder.block = sharded
        holder.forward = lambda input_ids: None
        torch.manual_seed(100 + rank)  # every rank its own micro-batch
        x = torch.randn(B, S, D)
        mask = None
        if case["padded"]:
            mask = torch.ones(B, S, dtype=torch.bool)
            mask[rank % B, : 1 + rank % (S - 1)] = False  # left padding, a different amount per rank
        sharded.token_mask = mask
        agree_on_batches(holder, [ep], "cpu")
        holder(input_ids=torch.zeros(B, S, dtype=torch.long))  # runs the agreement hook only
        x_ref = x.clone().requires_grad_(True)
        x_ep = x.clone().requires_grad_(True)
        y_ref = full(x_ref, token_mask=mask)
        y_ep = sharded(x_ep)
        g = torch.randn_like(y_ref)
        (y_ref * g).sum().backward()
        (y_ep * g).sum().backward()
        # Expert gradients: the one-process sum over every rank's micro-batch.
        trainable = {n: p for n, p in full.named_parameters() if "experts" in n and p.requires_grad}
        pairs = {"y": (y_ref, y_ep), "dx": (x_ref.grad, x_ep.grad),
                 "drouter": (full.router.weight.grad, sharded.router.weight.grad)}
        own = dict(sharded.named_parameters())
        for n, p in trainable.items():
            total = p.grad.clone()
            dist.all_reduce(total)
            pairs[n] = (total[ep.lo:ep.hi], own[n].grad)
        # Each difference relative to the largest magnitude of the reference tensor.
        diffs = {k: ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() for k, (a, b) in pairs.items()}
        exact = {k: torch.equal(a, b) for k, (a, b) in pairs.items()}
        t = torch.tensor([max(diffs.values())], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        all_exact = torch.tensor([float(all(exact.values()))])
        dist.all_reduce(all_exact, op=dist.ReduceOp.MIN)
        results.append({**case, "max_diff": t.item(), "exact": bool(all_exact.item()), "diffs": diffs,
                        "uniform": ep.uniform_batches, "traffic": dict(ep.traffic)})
    if rank == 0:
        torch.save(results, out_path)


def run_train(spec_path: str) -> None:
    from upcycle.config import from_dict
    from upcycle.train import TrainConfig
    from upcycle.train.trainer import Trainer

    with open(spec_path) as f:
        spec = json.load(f)
    for run in spec["runs"]:
        cfg = from_dict(TrainConfig, run["recipe"])
        trainer = Trainer(cfg)
        if run.get("resave"):  # load the checkpoint at this layout and write it straight back
            trainer.save(trainer.step / trainer.steps_per_epoch, {"tokens": 0, "elapsed_s": 0.0, "window": {}})
            continue
        if run.get("stop_after"):  # as a scheduler would: SIGTERM once this many steps are done
            train_step = trainer.train_step

            def step_then_signal(_t=trainer, _f=train_step, _at=run["stop_after"]):
                r = _f()
                if _t.step == _at:
                    signal.raise_signal(signal.SIGTERM)
                return r

            trainer.train_step = step_then_signal
        grads = []
        if run.get("grads"):
            step = trainer.optimizer.step

            def capture(*a, _step=step, _t=trainer, **k):
                grads.append(_t.full_gradients())
                return _step(*a, **k)

            trainer.optimizer.step = capture
        trainer.run()
        if grads and trainer.d.main:
            torch.save(grads, os.path.join(cfg.out, "grads.pt"))


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "block":
        dist.init_process_group("gloo")
        try:
            run_block(path)
            dist.barrier()  # leave together: gloo aborts a rank whose peer tears down while a message is in flight
        finally:
            dist.destroy_process_group()
    else:
        try:
            run_train(path)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
