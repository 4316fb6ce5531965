"""The MoE block: a drop-in replacement for a Hugging Face decoder layer's MLP.

``MoEBlock(hidden_states_BSD) -> [B, S, D]``, same dtype, like the dense MLP it replaces.
Submodule names are the checkpoint contract: ``mlp.router.weight`` [E, D] and
``mlp.experts.gate_up_proj`` / ``up_proj`` / ``down_proj`` (see ``experts.py``).

Per forward it leaves behind ``aux_loss`` (weighted balancing + z-loss, training only) and
``last_stats`` (a ``RoutingStats``, computed from detached tensors only when read, so
recording costs no device sync).

Shape legend:
    B  batch            S  sequence length      T  tokens (B * S)
    D  hidden size      F  expert FFN size       E  experts
    K  experts per token (top-K)                 A  assignments (token, expert) pairs
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.config import MoEConfig
from upcycle.errors import UpcycleError
from upcycle.moe.experts import StackedExperts
from upcycle.moe.router import (
    SEQUENCE_EC_WARNING,
    Routing,
    load_balancing_loss,
    route_expert_choice,
    route_topk,
    z_loss,
)
from upcycle.moe.stats import RoutingStats, summarize_routing


class MoEBlock(nn.Module):
    """Router + stacked experts, routed as ``cfg`` says.

    Top-K capacity (``cfg.topk_capacity_factor``) applies only while training, with the
    whole batch as one routing group: which assignments get dropped depends on other tokens,
    including later ones, so applying it at inference would make outputs depend on the
    future and differ between a full forward pass and cached decoding. Evaluation and
    generation are dropless.
    """

    def __init__(
        self,
        cfg: MoEConfig,
        hidden_size: int,
        ffn_size: int,
        *,
        gated: bool,
        activation: str,
        bias: bool = False,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.hidden_size, self.ffn_size = hidden_size, ffn_size
        self.router = nn.Linear(hidden_size, cfg.num_experts, bias=False, dtype=dtype, device=device)
        self.experts = StackedExperts(
            cfg.num_experts, hidden_size, ffn_size, gated=gated, activation=activation, bias=bias,
            backend=backend, dtype=dtype, device=device,
        )
        if cfg.routing == "expert-choice" and cfg.ec_group == "sequence":
            warnings.warn(SEQUENCE_EC_WARNING, stacklevel=2)
        self.record_stats = True
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
        c = self.cfg
        how = (f"top_k={c.top_k}, capacity_factor={c.topk_capacity_factor}" if c.routing == "topk"
               else f"capacity={c.capacity}, ec_group={c.ec_group!r}")
        return f"routing={c.routing!r}, num_experts={c.num_experts}, {how}"

    def route(self, x_BSD: Tensor) -> Routing:
        """Routing for a [B, S, D] input (router in float32 whatever the model dtype)."""
        cfg = self.cfg
        if type(self.router) is nn.Linear:
            # Route in float32 whatever the model dtype: near-ties between experts decide top-K.
            logits_BSE = F.linear(x_BSD.float(), self.router.weight.float())
        else:
            # Wrapped by PEFT or a quantiser: its own forward must run for the wrapper to count.
            logits_BSE = self.router(x_BSD).float()
        if cfg.routing == "topk":
            capacity = cfg.topk_capacity_factor if self.training else None
            return route_topk(logits_BSE.flatten(0, 1), cfg.top_k, normalize=cfg.normalize_topk,
                              capacity_factor=capacity)
        return route_expert_choice(logits_BSE, cfg.capacity, group=cfg.ec_group)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states [B, S, D] (or [S, D], taken as one sequence) -> [B, S, D], same dtype."""
        shape = hidden_states.shape
        if hidden_states.dim() < 2 or shape[-1] != self.hidden_size:
            raise UpcycleError(
                f"MoEBlock expects [batch, seq, {self.hidden_size}] hidden states, got shape {tuple(shape)}"
            )
        # Extra leading dims fold into the batch; a 2-D input is a single sequence.
        x_BSD = hidden_states.reshape(-1, *shape[-2:])
        r = self.route(x_BSD)
        # Expert choice returns assignments grouped by expert, the same count each: the
        # triton backend then needs no sort.
        y_TD = self.experts(x_BSD.reshape(-1, self.hidden_size), r.token_idx_A, r.expert_idx_A, r.weight_A,
                            expert_major=self.cfg.routing == "expert-choice")
        self.aux_loss = self._aux_loss(r) if self.training else None
        self._last_stats = None
        self._stats_summary = summarize_routing(r) if self.record_stats else None
        return y_TD.view(shape)

    def _aux_loss(self, r: Routing) -> Tensor:
        cfg = self.cfg
        loss = cfg.z_loss_weight * z_loss(r.logits_TE)
        if r.topk_idx_TK is not None:  # expert choice is balanced by construction
            loss = loss + cfg.aux_loss_weight * load_balancing_loss(r.probs_TE, r.topk_idx_TK, cfg.num_experts,
                                                                    cfg.top_k)
        return loss
