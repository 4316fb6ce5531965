"""Routing statistics: how one MoE layer routed the tokens of a forward pass (real tokens only).

``summarize_routing`` reduces a ``Routing`` to a few detached device tensors (no sync);
``RoutingStats.from_summary`` turns them into Python numbers when someone reads them.

Fine-grained experts (granularity G: expert j is segment j % G of copy j // G) are also
reported per copy: at t = 0 a token's K choices are K / G whole copies, and how often they
span more copies than that (``degrouped_fraction``) measures how far the segments have come
apart into experts of their own.

Shape legend:
    T  tokens       E  experts      A  assignments (token, expert) pairs
    K  experts per token (top-K)     G  segments per copy
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
    granularity: int = 1
    """G: consecutive experts that are segments of one copy (1: every expert a whole copy)."""
    copies_per_token: float | None = None
    """Top-K with G > 1: mean number of copies a token's K choices come from (K / G when they are whole copies)."""
    degrouped_fraction: float | None = None
    """Top-K with G > 1: tokens whose K choices span more than K / G copies."""

    @property
    def tokens_per_copy(self) -> list[int]:
        """Assignments per copy (its G segments' summed)."""
        G = self.granularity
        return [sum(self.tokens_per_expert[c:c + G]) for c in range(0, len(self.tokens_per_expert), G)]

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
            granularity=int(summary.get("granularity", 1)),
            copies_per_token=float(summary["copies"]) / num_tokens if "copies" in summary and num_tokens else None,
            degrouped_fraction=float(summary["degrouped"]) / num_tokens if "degrouped" in summary and num_tokens
            else None,
        )

    @classmethod
    def from_routing(cls, routing: Routing, granularity: int = 1) -> "RoutingStats":
        return cls.from_summary(summarize_routing(routing, granularity))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def combine(cls, stats: list["RoutingStats"]) -> "RoutingStats":
        """Several forward passes as one: counts summed, fractions and means weighted by tokens."""
        n = sum(s.num_tokens for s in stats)

        def mean(field: str) -> float:
            return sum(getattr(s, field) * s.num_tokens for s in stats) / n if n else 0.0

        grouped = all(s.degrouped_fraction is not None for s in stats)

        return cls(
            tokens_per_expert=[sum(c) for c in zip(*(s.tokens_per_expert for s in stats))],
            num_tokens=n,
            num_assignments=sum(s.num_assignments for s in stats),
            dropped_fraction=mean("dropped_fraction"),
            unrouted_fraction=mean("unrouted_fraction"),
            entropy=mean("entropy"),
            z=mean("z"),
            granularity=stats[0].granularity if stats else 1,
            copies_per_token=mean("copies_per_token") if grouped else None,
            degrouped_fraction=mean("degrouped_fraction") if grouped else None,
        )


def probs_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of -sum_e p log p (nats); 0 log 0 counts as 0."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    return -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1).mean()


def copies_per_token(topk_idx_TK: Tensor, granularity: int) -> Tensor:
    """long [T]: how many distinct copies (expert // G) each token's K choices come from."""
    copies_TK = (topk_idx_TK // granularity).sort(dim=-1).values
    return 1 + (copies_TK.diff(dim=-1) != 0).sum(dim=-1)


@torch.no_grad()
def summarize_routing(routing: Routing, granularity: int = 1) -> dict[str, Tensor | int]:
    """Detached device tensors (and shape-derived ints) for ``RoutingStats``; no host sync.

    ``granularity`` G > 1 (top-K): also the copies a token's choices span, and how many tokens' span
    exceeds K / G (see the module docstring)."""
    T = routing.probs_TE.shape[0]
    extra = {}
    if granularity > 1 and routing.topk_idx_TK is not None:
        K = routing.topk_idx_TK.shape[-1]
        n_T = copies_per_token(routing.topk_idx_TK, granularity)
        extra = {"granularity": granularity, "copies": n_T.sum(), "degrouped": (n_T * granularity > K).sum()}
    return {
        **extra,
        "tokens_per_expert": routing.tokens_per_expert_E.detach(),
        "num_tokens": T,
        "num_requested": routing.num_requested,
        "num_dropped": routing.num_dropped.detach(),
        "num_unrouted": routing.num_unrouted.detach(),
        "entropy": probs_entropy(routing.probs_TE.detach()),
        "z": z_loss(routing.logits_TE.detach()),
    }
