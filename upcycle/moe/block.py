"""The MoE block (a drop-in for a decoder layer's MLP) and helpers over every block of a model.

``MoEBlock(hidden_states_BSD) -> [B, S, D]``, same dtype, like the dense MLP it replaces.
Submodule names are the checkpoint contract: ``mlp.router.weight`` [E, D] and
``mlp.experts.gate_up_proj`` / ``up_proj`` / ``down_proj`` (see ``experts.py``), and with a shared
expert ``mlp.shared_expert.gate_proj`` / ``up_proj`` / ``down_proj`` (see ``shared_expert.py``): a
dense MLP every real token passes through with weight 1, added to the routed experts' output.

Per forward it leaves behind ``aux_loss`` (the scheme's auxiliary losses, training only) and
``last_stats`` (a ``RoutingStats``, computed from detached tensors only when read, so
recording costs no device sync).

Padding: a block routes only the real tokens of a batch. The model's forward hands each
block the attention mask of the current call (``token_mask``, set by the hook that
``use_attention_mask`` installs on the model; it is an attribute of this model's blocks,
not a global). It stays set after the forward, because activation checkpointing runs the
blocks again during backward and must route exactly as the forward did.

Shape legend:
    B  batch            S  sequence length      T  tokens (B * S)
    D  hidden size      F  expert FFN size       E  experts
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.config import MoEConfig
from upcycle.errors import UpcycleError
from upcycle.moe.backends import check_backend_name
from upcycle.moe.compute import autocast_off
from upcycle.moe.experts import StackedExperts
from upcycle.moe.routing import Routing
from upcycle.moe.schemes import routing_scheme
from upcycle.moe.shared_expert import SharedExpert
from upcycle.moe.stats import RoutingStats, summarize_routing


class MoEBlock(nn.Module):
    """Router + stacked experts, routed by the scheme ``cfg.routing`` names, plus an optional shared expert
    (``shared_ffn_size`` > 0)."""

    def __init__(
        self,
        cfg: MoEConfig,
        hidden_size: int,
        ffn_size: int,
        *,
        gated: bool,
        activation: str,
        bias: bool = False,
        shared_ffn_size: int = 0,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.scheme = routing_scheme(cfg)
        self.hidden_size, self.ffn_size = hidden_size, ffn_size
        self.router = nn.Linear(hidden_size, cfg.num_experts, bias=False, dtype=dtype, device=device)
        self.experts = StackedExperts(
            cfg.num_experts, hidden_size, ffn_size, gated=gated, activation=activation, bias=bias,
            backend=backend, dtype=dtype, device=device,
        )
        self.shared_expert = SharedExpert(hidden_size, shared_ffn_size, gated=gated, activation=activation, bias=bias,
                                          dtype=dtype, device=device) if shared_ffn_size else None
        for message in self.scheme.build_warnings():
            warnings.warn(message, stacklevel=2)
        self.expert_parallel: nn.Module | None = None
        """Set when the experts are sharded over ranks (``upcycle.moe.expert_parallel``): ``experts`` then
        holds this rank's experts only, and this module sends each token to its experts' rank and back."""
        self.record_stats = True
        self.token_mask: Tensor | None = None
        """bool [B, S] of the current forward (True = real token); None: every token is real."""
        self.aux_loss: Tensor | None = None
        self._stats_summary: dict[str, Tensor] | None = None
        self._last_stats: RoutingStats | None = None

    def set_backend(self, name: str) -> None:
        """Switch the experts backend (``auto``, ``loop``, ``grouped_mm``, ``triton``)."""
        self.experts.backend = name

    @property
    def last_stats(self) -> RoutingStats | None:
        """Routing statistics of the latest forward (None before the first, or if not recorded)."""
        if self._last_stats is None and self._stats_summary is not None:
            self._last_stats = RoutingStats.from_summary(self._stats_summary)
        return self._last_stats

    def extra_repr(self) -> str:
        g = f", granularity={self.cfg.granularity}" if self.cfg.granularity > 1 else ""
        return f"{self.scheme!r}, num_experts={self.cfg.num_experts}{g}"

    def router_logits(self, x_BSD: Tensor) -> Tensor:
        """float32 [B, S, E] router logits of a [B, S, D] input, whatever autocast says.

        Near-ties between experts decide top-K, so routing is computed in float32 in every
        model dtype. Autocast would undo the float32 casts (it runs ``linear`` in bf16 on its
        own: 0.6% of tokens then pick another top-2 set, docs/benchmarks.md), so it is off here.
        """
        with autocast_off(x_BSD.device.type):
            if type(self.router) is nn.Linear:
                return F.linear(x_BSD.float(), self.router.weight.float())
            # Wrapped by PEFT or a quantiser: its own forward must run for the wrapper to count. It
            # gets float32 unless its weights are in another float dtype (a bf16 model: they would
            # refuse a float32 input); quantised weights (uint8 / int8) cast the input themselves.
            return self.router(x_BSD.to(_wrapped_input_dtype(self.router))).float()

    def _mask_for(self, x_BSD: Tensor, token_mask: Tensor | None) -> Tensor | None:
        mask = token_mask if token_mask is not None else self.token_mask
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(x_BSD.shape[:2]):
            raise UpcycleError(f"MoEBlock got a token mask of shape {tuple(mask.shape)} for hidden states of shape "
                               f"{tuple(x_BSD.shape)}: expected [batch, seq] = {tuple(x_BSD.shape[:2])}")
        return mask.to(device=x_BSD.device, dtype=torch.bool)

    def route(self, x_BSD: Tensor, token_mask: Tensor | None = None) -> Routing:
        """Routing for a [B, S, D] input; ``token_mask`` bool [B, S] (default: the model's, if any)."""
        return self.scheme.route(self.router_logits(x_BSD), self._mask_for(x_BSD, token_mask), self.training)

    def forward(self, hidden_states: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """hidden_states [B, S, D] (or [S, D], taken as one sequence) -> [B, S, D], same dtype.

        ``token_mask`` bool [B, S]: False marks a pad, which gets no expert (output 0) and
        counts in no loss or statistic. Default: the mask the model's forward handed over.
        """
        shape = hidden_states.shape
        if hidden_states.dim() < 2 or shape[-1] != self.hidden_size:
            raise UpcycleError(
                f"MoEBlock expects [batch, seq, {self.hidden_size}] hidden states, got shape {tuple(shape)}"
            )
        # Extra leading dims fold into the batch; a 2-D input is a single sequence.
        x_BSD = hidden_states.reshape(-1, *shape[-2:])
        r = self.route(x_BSD, token_mask)
        x_TD = x_BSD.reshape(-1, self.hidden_size)
        if self.expert_parallel is None:
            y_TD = self.experts(x_TD, r.token_idx_A, r.expert_idx_A, r.weight_A, expert_major=self.scheme.expert_major)
        else:
            y_TD = self.expert_parallel(self.experts, x_TD, r.token_idx_A, r.expert_idx_A, r.weight_A,
                                        expert_major=self.scheme.expert_major)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            mask = self._mask_for(x_BSD, token_mask)
            if mask is not None:  # a pad gets no expert, the shared one included
                shared_TD = shared_TD * mask.reshape(-1, 1).to(shared_TD.dtype)
            y_TD = y_TD + shared_TD
        self.aux_loss = self.scheme.aux_loss(r) if self.training else None
        self._last_stats = None
        self._stats_summary = summarize_routing(r, self.cfg.granularity) if self.record_stats else None
        return y_TD.view(shape)


def _wrapped_input_dtype(router: nn.Module) -> torch.dtype:
    """The input dtype a wrapped router takes: float32, unless its float weights are all of another dtype."""
    dtypes = {p.dtype for p in router.parameters() if p.is_floating_point()}
    return next(iter(dtypes)) if len(dtypes) == 1 else torch.float32


# ---------------------------------------------------------------- over every block of a model


def moe_blocks(model: nn.Module) -> dict[str, MoEBlock]:
    """Every ``MoEBlock`` in ``model``, by qualified module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEBlock)}


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """The latest forward's ``RoutingStats`` of every MoE block that recorded some."""
    out = {}
    for name, block in moe_blocks(model).items():
        stats = block.last_stats
        if stats is not None:
            out[name] = stats
    return out


def aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the MoE blocks' auxiliary losses from the latest training forward; None if none."""
    losses = [b.aux_loss for b in moe_blocks(model).values() if b.aux_loss is not None]
    if not losses:
        return None
    device = losses[0].device  # blocks may sit on different devices (pipeline parallel)
    return torch.stack([loss.float().to(device) for loss in losses]).sum()


def set_experts_backend(model: nn.Module, name: str) -> None:
    """Use experts backend ``name`` in every MoE block of ``model``."""
    check_backend_name(name)
    for block in moe_blocks(model).values():
        block.set_backend(name)


def use_attention_mask(model: nn.Module) -> None:
    """Make ``model``'s forward hand its 2-D attention mask to every MoE block inside it.

    ``model``: the module whose forward takes ``attention_mask`` and ``input_ids`` /
    ``inputs_embeds`` (the causal LM itself: the mask it gets is the user's 2-D one, before
    any model turns it into 4-D or per-layer masks). With a KV cache the mask covers past and
    current tokens; the blocks get the current ones (its last S columns). A batch without
    padding (no mask, or all ones) is routed exactly as before (mask None).
    """
    params = list(inspect.signature(model.forward).parameters)

    def argument(name: str, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = params.index(name) if name in params else len(args)
        return args[i] if i < len(args) else None

    def hand_over(module: nn.Module, args, kwargs) -> None:
        mask = argument("attention_mask", args, kwargs)
        token_mask = None
        if isinstance(mask, Tensor) and mask.dim() == 2:
            ids, embeds = argument("input_ids", args, kwargs), argument("inputs_embeds", args, kwargs)
            S = ids.shape[-1] if ids is not None else embeds.shape[1] if embeds is not None else mask.shape[1]
            current = mask[:, -S:].bool()
            token_mask = None if bool(current.all()) else current
        for block in moe_blocks(module).values():
            block.token_mask = token_mask

    model.register_forward_pre_hook(hand_over, with_kwargs=True)
