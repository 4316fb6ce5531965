"""AdamW with one parameter group per kind (router, experts, adapters, the rest), and the schedule.

    optimizer = build_optimizer(model, cfg.optim)       # cfg.optim.name: adamw | adamw_8bit | paged_adamw[_8bit]
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)

Why separate groups: a fresh router starts from noise while the experts start from a trained
MLP, so they want different learning rates (upcycling papers train the router faster), and
adapters usually take a larger rate than full fine-tuning.

The bitsandbytes optimizers (QLoRA's 8-bit and paged AdamW) take the same groups, learning
rates, betas, epsilon and decoupled weight decay; clipping and the schedule act on any of
them alike. 8-bit AdamW keeps both moments as block-wise quantised uint8 (blocks of 256 with
an fp32 absmax each: ~2 bytes a parameter instead of 8); tensors under 4,096 elements keep
fp32 moments (bitsandbytes' ``min_8bit_size``). Paged: the moments live in CUDA unified
memory, which the driver pages to the CPU when the GPU runs short (QLoRA's answer to the
memory spikes of long sequences); without CUDA bitsandbytes runs them unpaged.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.train.config import OptimConfig, ScheduleConfig

OPTIMIZERS = {"adamw": None, "adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW",
              "paged_adamw_8bit": "PagedAdamW8bit"}
"""``optim.name`` -> the ``bitsandbytes.optim`` class that implements it (None: ``torch.optim.AdamW``)."""
BNB_MIN_VERSION = "0.50"
INSTALL_HINT = "pip install 'upcycle[qlora]' (or: pip install 'bitsandbytes>=0.50')"

GROUPS = ("router", "experts", "adapter", "rest")


def param_kind(name: str) -> str:
    """Which group a parameter (by qualified name) belongs to."""
    if "lora_" in name:
        return "adapter"
    if ".router." in f".{name}":
        return "router"
    # A shared expert is the MoE layer's always-on expert, made from the same dense MLP: the experts' rate.
    if ".experts." in f".{name}" or ".shared_expert." in f".{name}":
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


def bitsandbytes_optim(name: str):
    """The ``bitsandbytes.optim`` module for optimizer ``name``; UpcycleError naming the install
    command if bitsandbytes is missing (or older than the floor)."""
    try:
        # bitsandbytes logs at import that it found no ``kernels`` package for a CPU 4-bit GEMM
        # that upcycle never calls (NF4 is upcycle's own): keep that out of the user's console.
        quiet = logging.getLogger("bitsandbytes")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            import bitsandbytes
        finally:
            quiet.setLevel(level)
    except ImportError:
        raise UpcycleError(f"optim.name={name} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None
    have = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2] if p.isdigit())
    if have < tuple(int(p) for p in BNB_MIN_VERSION.split(".")):
        raise UpcycleError(f"optim.name={name} needs bitsandbytes >= {BNB_MIN_VERSION} (its CPU 8-bit AdamW), "
                           f"found {bitsandbytes.__version__}: {INSTALL_HINT}")
    return bitsandbytes.optim


def check_optimizer(name: str) -> None:
    """UpcycleError now, before any model is loaded, if optimizer ``name`` cannot be built here."""
    if name not in OPTIMIZERS:
        raise UpcycleError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if OPTIMIZERS[name] is not None:
        bitsandbytes_optim(name)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups:
        raise UpcycleError("nothing to train: every parameter is frozen")
    check_optimizer(cfg.name)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if OPTIMIZERS[cfg.name] is None:
        # foreach=False: the per-tensor loop gives the same bits whatever the grouping, which the
        # resume and 1-vs-2-process tests rely on; the speed difference is small next to the model.
        return torch.optim.AdamW(groups, **kw, foreach=False)
    cls = getattr(bitsandbytes_optim(cfg.name), OPTIMIZERS[cfg.name])
    with warnings.catch_warnings():
        # "Paged optimizers are not supported on CPU": the trainer says so itself, once.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return cls(groups, **kw)


def describe_optimizer(name: str, device: torch.device) -> str:
    """One line for the run's log: which optimizer runs, and what it does on this device."""
    if OPTIMIZERS[name] is None:
        return "optimizer: adamw (torch, fp32 state)"
    import bitsandbytes

    bits = "8-bit" if name.endswith("8bit") else "32-bit"
    paged = name.startswith("paged")
    where = ("paged through CUDA unified memory" if device.type == "cuda"
             else "unpaged: bitsandbytes pages only CUDA memory") if paged else "not paged"
    return f"optimizer: {name} (bitsandbytes {bitsandbytes.__version__} {OPTIMIZERS[name]}, {bits} state, {where})"


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (moments, quantisation constants)."""
    def size(v) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        return 0

    return sum(size(state) for state in optimizer.state.values())


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
