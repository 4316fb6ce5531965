"""Mixture-of-Experts components: routing schemes, expert storage, the one experts compute, the MoE block.

* ``routing`` (functions) and ``schemes`` (one object per scheme: route, aux losses, warnings)
* ``backends`` (which experts backend runs) and ``compute`` (``experts_forward``: the math, once)
* ``experts`` (weight storage: ``ExpertsBase``, ``StackedExperts``), ``block`` (``MoEBlock`` and
  helpers over every block of a model), ``shared_expert`` (the always-on ``SharedExpert``), ``stats``
  (routing statistics, per copy too for fine-grained experts)
"""

from upcycle.moe.backends import EXPERT_BACKENDS, grouped_mm_unsupported, resolve_backend, triton_unsupported
from upcycle.moe.block import MoEBlock, aux_loss, moe_blocks, routing_stats, set_experts_backend, use_attention_mask
from upcycle.moe.compute import ExpertWeights, LowRank, experts_forward, grad_contiguous
from upcycle.moe.experts import DerivedExpertWeights, ExpertsBase, StackedExperts
from upcycle.moe.routing import (
    SEQUENCE_EC_WARNING,
    Routing,
    expert_capacity,
    load_balancing_loss,
    route_expert_choice,
    route_topk,
    router_probs,
    z_loss,
)
from upcycle.moe.schemes import (
    ROUTING_FIELDS,
    ROUTING_SCHEMES,
    ExpertChoiceRouting,
    RoutingScheme,
    TopKRouting,
    routing_scheme,
    scheme_class,
)
from upcycle.moe.shared_expert import SharedExpert
from upcycle.moe.stats import RoutingStats, copies_per_token, probs_entropy, summarize_routing

__all__ = [
    "EXPERT_BACKENDS",
    "ROUTING_FIELDS",
    "ROUTING_SCHEMES",
    "DerivedExpertWeights",
    "ExpertChoiceRouting",
    "ExpertWeights",
    "ExpertsBase",
    "LowRank",
    "MoEBlock",
    "Routing",
    "RoutingScheme",
    "RoutingStats",
    "SharedExpert",
    "SEQUENCE_EC_WARNING",
    "StackedExperts",
    "TopKRouting",
    "aux_loss",
    "copies_per_token",
    "expert_capacity",
    "experts_forward",
    "grad_contiguous",
    "grouped_mm_unsupported",
    "load_balancing_loss",
    "moe_blocks",
    "probs_entropy",
    "resolve_backend",
    "route_expert_choice",
    "route_topk",
    "router_probs",
    "routing_scheme",
    "routing_stats",
    "scheme_class",
    "set_experts_backend",
    "summarize_routing",
    "triton_unsupported",
    "use_attention_mask",
    "z_loss",
]
