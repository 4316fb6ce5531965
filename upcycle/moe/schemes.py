"""Routing schemes: one object per scheme, built from the config, the only place that knows it.

    scheme = routing_scheme(cfg)                  # TopKRouting or ExpertChoiceRouting
    r = scheme.route(logits_BSE, mask_BS, training=True)
    loss = scheme.aux_loss(r)

A scheme owns how tokens meet experts (``route``), what it adds to the loss (``aux_loss``),
how many experts a token passes through (``experts_per_token``), which settings are its own
(``fields``, so a flag of another scheme can be refused), and its warnings. Adding a scheme
is one class here plus its name in ``upcycle.config.RoutingName``.

Padding: ``mask_BS`` (bool [B, S], True = real token, None = all real) keeps pads out of every
routing group: they get no expert, take no capacity, and count in no loss or statistic.

Shape legend: B batch, S sequence, E experts, T tokens (B * S).
"""

from __future__ import annotations

import typing
from typing import ClassVar

from torch import Tensor

from upcycle.config import MoEConfig, RoutingName
from upcycle.errors import UpcycleError
from upcycle.moe.routing import (
    SEQUENCE_EC_WARNING,
    Routing,
    load_balancing_loss,
    restrict_to_tokens,
    route_expert_choice,
    route_topk,
    z_loss,
)

TOP1_NORMALIZED_WARNING = (
    "top-1 routing with renormalised weights gives every token weight 1: the router gets no gradient from the "
    "language-model loss (only from the auxiliary losses); pass --no-normalize to train it through the output"
)


class RoutingScheme:
    """Base of the routing schemes; ``cfg`` is read at call time (a recipe may change its loss weights)."""

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]
    """``MoEConfig`` fields only this scheme reads."""
    expert_major: ClassVar[bool] = False
    """``route`` returns assignments grouped by expert, the same count each (kernels skip their sort)."""

    def __init__(self, cfg: MoEConfig):
        self.cfg = cfg

    def route(self, logits_BSE: Tensor, mask_BS: Tensor | None, training: bool) -> Routing:
        raise NotImplementedError

    def aux_loss(self, r: Routing) -> Tensor:
        """What routing adds to the training loss: the router z-loss, weighted."""
        return self.cfg.z_loss_weight * z_loss(r.logits_TE)

    @property
    def experts_per_token(self) -> float:
        """Experts a token passes through on average (what active parameters are counted with)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """This scheme's own settings, by ``MoEConfig`` field name."""
        return {f: getattr(self.cfg, f) for f in self.fields}

    def convert_warnings(self) -> list[str]:
        """Warnings worth a line when a checkpoint is made with this scheme."""
        return self.build_warnings()

    def build_warnings(self) -> list[str]:
        """Warnings worth a line whenever a layer with this scheme is built."""
        return []

    def __repr__(self) -> str:
        return f"routing={self.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.settings().items())


class TopKRouting(RoutingScheme):
    """Each token picks its K most probable experts (Switch / GShard / Mixtral).

    A capacity factor (``topk_capacity_factor``) applies only while training, with the
    whole batch as one routing group: which assignments get dropped depends on other tokens,
    including later ones, so applying it at inference would make outputs depend on the
    future and differ between a full forward pass and cached decoding.
    """

    name = "topk"
    fields = ("top_k", "normalize_topk", "topk_capacity_factor")

    def route(self, logits_BSE: Tensor, mask_BS: Tensor | None, training: bool) -> Routing:
        cfg = self.cfg
        return restrict_to_tokens(route_topk, logits_BSE.flatten(0, 1), mask_BS, top_k=cfg.top_k,
                                  normalize=cfg.normalize_topk,
                                  capacity_factor=cfg.topk_capacity_factor if training else None)

    def aux_loss(self, r: Routing) -> Tensor:
        balance = load_balancing_loss(r.probs_TE, r.topk_idx_TK, self.cfg.num_experts, self.cfg.top_k)
        return super().aux_loss(r) + self.cfg.aux_loss_weight * balance

    @property
    def experts_per_token(self) -> float:
        return self.cfg.top_k

    def convert_warnings(self) -> list[str]:
        return [TOP1_NORMALIZED_WARNING] if self.cfg.top_k == 1 and self.cfg.normalize_topk else []


class ExpertChoiceRouting(RoutingScheme):
    """Each expert picks its C best tokens of a routing group (Zhou et al. 2022); balanced by
    construction, so its only auxiliary loss is the z-loss. Groups: one position across the
    batch (causal, the default) or one sequence (not causal)."""

    name = "expert-choice"
    fields = ("capacity", "ec_group")
    expert_major = True

    def route(self, logits_BSE: Tensor, mask_BS: Tensor | None, training: bool) -> Routing:
        return route_expert_choice(logits_BSE, self.cfg.capacity, group=self.cfg.ec_group, mask_BS=mask_BS)

    @property
    def experts_per_token(self) -> float:
        # About C (with batch-1 decoding every token gets all E experts; see the README).
        return min(float(self.cfg.capacity), self.cfg.num_experts)

    def build_warnings(self) -> list[str]:
        return [SEQUENCE_EC_WARNING] if self.cfg.ec_group == "sequence" else []


ROUTING_SCHEMES: dict[str, type[RoutingScheme]] = {s.name: s for s in (TopKRouting, ExpertChoiceRouting)}
assert set(ROUTING_SCHEMES) == set(typing.get_args(RoutingName)), "every RoutingName needs a scheme"

ROUTING_FIELDS = tuple(f for s in ROUTING_SCHEMES.values() for f in s.fields)
"""Every scheme-specific ``MoEConfig`` field."""


def scheme_class(name: str) -> type[RoutingScheme]:
    try:
        return ROUTING_SCHEMES[name]
    except KeyError:
        raise UpcycleError(f"unknown routing {name!r}; valid: {', '.join(ROUTING_SCHEMES)}") from None


def routing_scheme(cfg: MoEConfig) -> RoutingScheme:
    """The scheme ``cfg.routing`` names, reading ``cfg``."""
    return scheme_class(cfg.routing)(cfg)
