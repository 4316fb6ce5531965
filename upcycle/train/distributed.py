"""torch.distributed for the trainer: one process, or many under torchrun (DDP or FSDP2).

    torchrun --nproc-per-node 8 -m upcycle train continued_pretraining
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 --nproc-per-node 8 \\
        -m upcycle train continued_pretraining

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single process.
GPUs use NCCL, the CPU uses gloo (what the 2-process equivalence test runs on).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from upcycle.errors import UpcycleError


@dataclass
class Dist:
    """Where this process stands: rank, world size, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over processes (float64 on the CPU for gloo; the input is not changed)."""
        if not self.enabled:
            return t
        out = t.detach().to(self.device if self.device.type == "cuda" else "cpu", copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (stop together, or not at all)."""
        if not self.enabled:
            return flag
        return bool(self.all_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init(device: str | None) -> Dist:
    """Join the torchrun process group if there is one; pick this process's device."""
    want_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UpcycleError("device cuda was asked for but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per decoder layer, then the root); as is for one process."""
    if not d.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    from upcycle.train.model import decoder_layers

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


def no_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-batches but the last."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()
