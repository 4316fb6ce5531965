"""Routing statistics: how one MoE layer routed the tokens of a forward pass (real tokens only).

``summarize_routing`` reduces a ``Routing`` to a few detached device tensors (no sync);
``RoutingStats.from_summary`` turns them into Python numbers when someone reads them.

Shape legend:
    T  tokens       E  experts      A  assignments (token, expert) pairs
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from upcycle.moe.routing import Routing, z_loss


@dataclass
class RoutingStats:
    """How one MoE layer routed the tokens of its latest forward pass."""

    tokens_per_expert: list[int]
    """Assignments each expert received (after capacity drops); sums to ``num_assignments``."""
    num_tokens: int
    """Tokens routed: the real (unpadded) tokens of the batch."""
    num_assignments: int
    """(token, expert) pairs that reached an expert."""
    dropped_fraction: float
    """Top-K with a capacity factor: dropped assignments / requested assignments (T * K)."""
    unrouted_fraction: float
    """Tokens that reached no expert at all (dropped everywhere, or picked by no expert)."""
    entropy: float
    """Mean per-token entropy of the router probabilities, in nats (log E when uniform)."""
    z: float
    """Mean squared logsumexp of the router logits (what the z-loss penalises)."""

    @classmethod
    def from_summary(cls, summary: dict[str, Tensor | int]) -> "RoutingStats":
        tpe = summary["tokens_per_expert"].tolist()
        num_tokens, requested = int(summary["num_tokens"]), int(summary["num_requested"])
        return cls(
            tokens_per_expert=tpe,
            num_tokens=num_tokens,
            num_assignments=int(sum(tpe)),
            dropped_fraction=int(summary["num_dropped"]) / requested if requested else 0.0,
            unrouted_fraction=int(summary["num_unrouted"]) / num_tokens if num_tokens else 0.0,
            entropy=float(summary["entropy"]),
            z=float(summary["z"]),
        )

    @classmethod
    def from_routing(cls, routing: Routing) -> "RoutingStats":
        return cls.from_summary(summarize_routing(routing))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def combine(cls, stats: list["RoutingStats"]) -> "RoutingStats":
        """Several forward passes as one: counts summed, fractions and means weighted by tokens."""
        n = sum(s.num_tokens for s in stats)

        def mean(field: str) -> float:
            return sum(getattr(s, field) * s.num_tokens for s in stats) / n if n else 0.0

        return cls(
            tokens_per_expert=[sum(c) for c in zip(*(s.tokens_per_expert for s in stats))],
            num_tokens=n,
            num_assignments=sum(s.num_assignments for s in stats),
            dropped_fraction=mean("dropped_fraction"),
            unrouted_fraction=mean("unrouted_fraction"),
            entropy=mean("entropy"),
            z=mean("z"),
        )


def probs_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of -sum_e p log p (nats); 0 log 0 counts as 0."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    return -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1).mean()


@torch.no_grad()
def summarize_routing(routing: Routing) -> dict[str, Tensor | int]:
    """Detached device tensors (and shape-derived ints) for ``RoutingStats``; no host sync."""
    T = routing.probs_TE.shape[0]
    return {
        "tokens_per_expert": routing.tokens_per_expert_E.detach(),
        "num_tokens": T,
        "num_requested": routing.num_requested,
        "num_dropped": routing.num_dropped.detach(),
        "num_unrouted": routing.num_unrouted.detach(),
        "entropy": probs_entropy(routing.probs_TE.detach()),
        "z": z_loss(routing.logits_TE.detach()),
    }
