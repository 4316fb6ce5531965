"""Mixture-of-Experts components: routers, stacked experts, the MoE block, routing statistics."""

from upcycle.moe.block import MoEBlock
from upcycle.moe.experts import EXPERT_BACKENDS, StackedExperts, grouped_mm_unsupported, resolve_backend
from upcycle.moe.router import (
    SEQUENCE_EC_WARNING,
    Routing,
    expert_capacity,
    load_balancing_loss,
    route_expert_choice,
    route_topk,
    router_probs,
    z_loss,
)
from upcycle.moe.stats import (
    RoutingStats,
    aux_loss,
    moe_blocks,
    probs_entropy,
    routing_stats,
    set_experts_backend,
    summarize_routing,
)

__all__ = [
    "EXPERT_BACKENDS",
    "MoEBlock",
    "Routing",
    "RoutingStats",
    "SEQUENCE_EC_WARNING",
    "StackedExperts",
    "aux_loss",
    "expert_capacity",
    "grouped_mm_unsupported",
    "load_balancing_loss",
    "moe_blocks",
    "probs_entropy",
    "resolve_backend",
    "route_expert_choice",
    "route_topk",
    "router_probs",
    "routing_stats",
    "set_experts_backend",
    "summarize_routing",
    "z_loss",
]
