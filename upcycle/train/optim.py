"""AdamW with one parameter group per kind (router, experts, adapters, the rest), and the schedule.

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)

Why separate groups: a fresh router starts from noise while the experts start from a trained
MLP, so they want different learning rates (upcycling papers train the router faster), and
adapters usually take a larger rate than full fine-tuning.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from upcycle.train.config import OptimConfig, ScheduleConfig

GROUPS = ("router", "experts", "adapter", "rest")


def param_kind(name: str) -> str:
    """Which group a parameter (by qualified name) belongs to."""
    if "lora_" in name:
        return "adapter"
    if ".router." in f".{name}":
        return "router"
    if ".experts." in f".{name}":
        return "experts"
    return "rest"


def _decays(name: str, p: torch.Tensor) -> bool:
    # Matrices decay; biases and norm gains do not (the usual rule), nor does the router,
    # whose logit scale is what decides routing.
    return p.dim() >= 2 and param_kind(name) != "router" and "norm" not in name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split by kind and by weight decay; empty groups left out."""
    lrs = {"router": cfg.router_lr, "experts": cfg.experts_lr, "adapter": cfg.adapter_lr, "rest": None}
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((param_kind(name), _decays(name, p)), []).append(p)
    groups = []
    for kind in GROUPS:
        for decay in (True, False):
            params = buckets.get((kind, decay))
            if params:
                lr = lrs[kind] if lrs[kind] is not None else cfg.lr
                groups.append(dict(params=params, lr=lr, initial_lr=lr, name=f"{kind}{'' if decay else '_no_decay'}",
                                   weight_decay=cfg.weight_decay if decay else 0.0))
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    if not groups:
        from upcycle.errors import UpcycleError

        raise UpcycleError("nothing to train: every parameter is frozen")
    # foreach=False: the per-tensor loop gives the same bits whatever the grouping, which the
    # resume and 1-vs-2-process tests rely on; the speed difference is small next to the model.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of each group's peak learning rate for optimiser step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
