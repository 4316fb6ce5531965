"""Routing functions: which expert sees which token, with what combine weight, plus the auxiliary losses.

The routing *schemes* (``schemes.py``) call these. Two rules, both returning a flat list of (token, expert, weight) assignments that any
experts backend consumes:

* ``route_topk``: every token picks its K most probable experts (Switch / GShard /
  Mixtral). Dropless by default; an optional capacity factor caps each expert per group.
* ``route_expert_choice``: every expert picks its T most probable tokens of a group
  (Zhou et al. 2022). Balanced by construction; some tokens may get no expert at all.

Shape legend:
    T  tokens (flattened batch)         E  experts
    K  experts per token (top-K)        A  assignments (token, expert) pairs
    B  batch                            S  sequence length
    G  routing groups                   N  tokens per group
    C  tokens each expert takes per group (expert choice; "T" in the paper)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from upcycle.errors import UpcycleError

SEQUENCE_EC_WARNING = (
    "expert choice with ec_group='sequence' is not causal: which tokens an expert picks depends on "
    "later tokens of the same sequence, so training sees the future and cached generation differs "
    "from a full forward pass; use ec_group='position' for decoder models"
)


@dataclass
class Routing:
    """The result of routing T tokens over E experts as A (token, expert, weight) assignments."""

    token_idx_A: Tensor
    """long [A]: flat token index (row-major ``b * S + s`` for [B, S] inputs)."""
    expert_idx_A: Tensor
    """long [A]: expert index."""
    weight_A: Tensor
    """float32 [A]: combine weight, differentiable w.r.t. the router logits."""
    probs_TE: Tensor
    """float32 [T, E]: softmax of the router logits; with a padding mask, of the real tokens only."""
    logits_TE: Tensor
    """float32 [T, E]: router logits (real tokens only, like ``probs_TE``)."""
    tokens_per_expert_E: Tensor
    """long [E]: assignments each expert received (after any capacity drop)."""
    num_dropped: Tensor
    """long []: assignments removed by a capacity limit (top-K only; 0 otherwise)."""
    num_unrouted: Tensor
    """long []: tokens left with no expert (their output is the residual path alone)."""
    topk_idx_TK: Tensor | None = None
    """long [T, K]: top-K choices before any capacity drop (what the balancing loss counts);
    None for expert choice."""

    @property
    def num_requested(self) -> int:
        """Assignments asked for before capacity: T*K for top-K, A for expert choice."""
        return self.topk_idx_TK.numel() if self.topk_idx_TK is not None else self.token_idx_A.numel()


def count_per_index(idx: Tensor, n: int) -> Tensor:
    """long [n]: occurrences of each value 0..n-1 in ``idx`` (like bincount, minus its host sync on CUDA)."""
    idx = idx.reshape(-1)
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


def router_probs(logits_TE: Tensor) -> Tensor:
    # float32 softmax: bf16 probabilities are too coarse to rank experts reliably.
    return torch.softmax(logits_TE.float(), dim=-1)


def expert_capacity(factor: float, group_tokens: int, top_k: int, num_experts: int) -> int:
    """ceil(factor * N * K / E): assignments one expert may keep per group of N tokens."""
    # round() first so that e.g. 1.1 * 10 / 11 = 1.0000000000000002 does not become 2.
    return max(1, math.ceil(round(factor * group_tokens * top_k / num_experts, 9)))


def route_topk(
    logits_TE: Tensor,
    top_k: int,
    normalize: bool = True,
    capacity_factor: float | None = None,
    group_size: int | None = None,
) -> Routing:
    """Token-choice routing: each token sends itself to its K most probable experts.

    ``normalize`` rescales the K chosen probabilities to sum to 1 (so identical expert copies
    reproduce the dense MLP exactly). ``capacity_factor`` c, if given, lets each expert keep
    at most ceil(c * N * K / E) assignments per group of N consecutive tokens (the whole
    input unless ``group_size``); first choices of all tokens win over second choices, then
    earlier tokens win (Switch / GShard). Dropped assignments are removed and the remaining
    weights are *not* renormalised: the token keeps only its residual path for that slot.
    """
    logits_TE = logits_TE.float()
    T, E = logits_TE.shape
    if not 1 <= top_k <= E:
        raise UpcycleError(f"top_k must be between 1 and the number of experts ({E}), got {top_k}")
    if group_size is not None and group_size < 1:
        raise UpcycleError(f"routing group size must be at least 1, got {group_size}")
    probs_TE = router_probs(logits_TE)
    topv_TK, topi_TK = probs_TE.topk(top_k, dim=-1)
    if normalize:
        topv_TK = topv_TK / topv_TK.sum(dim=-1, keepdim=True)
    token_idx_A = torch.arange(T, device=logits_TE.device).repeat_interleave(top_k)
    expert_idx_A = topi_TK.reshape(-1)
    weight_A = topv_TK.reshape(-1)
    zero = torch.zeros((), dtype=torch.long, device=logits_TE.device)
    num_dropped = num_unrouted = zero
    if capacity_factor is not None and T > 0:
        keep_A = _capacity_keep_mask(topi_TK, E, capacity_factor, group_size or T)
        num_dropped = (~keep_A).sum()
        num_unrouted = (~keep_A.view(T, top_k).any(dim=-1)).sum()
        token_idx_A, expert_idx_A, weight_A = token_idx_A[keep_A], expert_idx_A[keep_A], weight_A[keep_A]
    return Routing(
        token_idx_A=token_idx_A,
        expert_idx_A=expert_idx_A,
        weight_A=weight_A,
        probs_TE=probs_TE,
        logits_TE=logits_TE,
        tokens_per_expert_E=count_per_index(expert_idx_A, E),
        num_dropped=num_dropped,
        num_unrouted=num_unrouted,
        topk_idx_TK=topi_TK,
    )


def _capacity_keep_mask(topi_TK: Tensor, num_experts: int, factor: float, group_size: int) -> Tensor:
    """bool [T*K] (row-major over [T, K]): which assignments fit in their expert's capacity."""
    T, K = topi_TK.shape
    device = topi_TK.device
    t_A = torch.arange(T, device=device).repeat_interleave(K)
    k_A = torch.arange(K, device=device).repeat(T)
    g_A = t_A // group_size
    e_A = topi_TK.reshape(-1)
    # Queue order inside each (group, expert) bucket: slot k first, then token order. Two
    # stable sorts (priority, then bucket) leave every bucket in priority order.
    prio_order = torch.argsort(k_A * T + t_A, stable=True)
    bucket_A = (g_A * num_experts + e_A)[prio_order]
    bucket_order = torch.argsort(bucket_A, stable=True)
    order = prio_order[bucket_order]
    bucket_sorted = bucket_A[bucket_order]
    num_groups = (T - 1) // group_size + 1
    counts = count_per_index(bucket_sorted, num_groups * num_experts)
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(T * K, device=device) - starts[bucket_sorted]
    # The last group may be short; its cap follows its own size.
    caps_G = torch.full((num_groups,), expert_capacity(factor, group_size, K, num_experts), device=device)
    caps_G[-1] = expert_capacity(factor, T - group_size * (num_groups - 1), K, num_experts)
    keep_sorted = rank_sorted < caps_G[bucket_sorted // num_experts]
    keep_A = torch.empty_like(keep_sorted)
    keep_A[order] = keep_sorted
    return keep_A


def route_expert_choice(logits_BSE: Tensor, capacity: float, group: str = "position",
                        mask_BS: Tensor | None = None) -> Routing:
    """Expert-choice routing: in every group of n tokens each expert takes its C best tokens.

    C = min(n, ceil(capacity * n / E)); the combine weight is that token's router probability
    for the expert (not renormalised). ``group="position"`` groups the B tokens at one
    sequence position, so routing at position s never looks at other positions (causal; with
    batch 1 a group is one token, which every expert takes, weights summing to 1: the layer
    then acts as a dense soft mixture). ``group="sequence"`` groups the S tokens of a sequence
    as in the EC paper; it is not causal (see ``SEQUENCE_EC_WARNING``).

    ``mask_BS`` (bool, True = real token): padded tokens are in no group; n, and so C, count
    a group's real tokens only. The Routing's probabilities and logits are then the real
    tokens' only (row-major order), so losses and statistics never see a pad.
    """
    if logits_BSE.dim() != 3:
        raise UpcycleError(f"expert choice routes [batch, seq, experts] logits, got shape {tuple(logits_BSE.shape)}")
    if group not in ("position", "sequence"):
        raise UpcycleError(f"ec_group must be 'position' or 'sequence', got {group!r}")
    logits_BSE = logits_BSE.float()
    B, S, E = logits_BSE.shape
    device = logits_BSE.device
    probs_BSE = router_probs(logits_BSE)
    # Flat token index b*S + s, laid out like the probabilities so it groups the same way.
    tok_BS = torch.arange(B * S, device=device).view(B, S)
    by_position = group == "position"
    probs_GNE = probs_BSE.transpose(0, 1) if by_position else probs_BSE
    tok_GN = tok_BS.transpose(0, 1) if by_position else tok_BS
    G, N = tok_GN.shape
    scores_GEN = probs_GNE.transpose(1, 2)
    if mask_BS is None:
        C = _ec_capacity(capacity, N, E)
        weight_GEC, member_GEC = scores_GEN.topk(C, dim=-1)
        token_GEC = torch.gather(tok_GN.unsqueeze(1).expand(G, E, N), 2, member_GEC)
        # Expert-major order: assignments arrive already sorted by expert, C*G per expert.
        token_idx_A = token_GEC.permute(1, 0, 2).reshape(-1)
        weight_A = weight_GEC.permute(1, 0, 2).reshape(-1)
        per_expert = G * C
        real_T = None
    else:
        mask_GN = (mask_BS.transpose(0, 1) if by_position else mask_BS).bool()
        C_G = torch.tensor([_ec_capacity(capacity, n, E) for n in mask_GN.sum(1).tolist()],
                           dtype=torch.long, device=device)
        C = int(C_G.max()) if G else 0
        # Probabilities are >= 0: a pad scored -1 ranks below every real token, and the top
        # C_g <= n_g of a group are then all real.
        scores_GEN = scores_GEN.masked_fill(~mask_GN.unsqueeze(1), -1.0)
        weight_GEC, member_GEC = scores_GEN.topk(C, dim=-1)
        token_GEC = torch.gather(tok_GN.unsqueeze(1).expand(G, E, N), 2, member_GEC)
        keep_EGC = (torch.arange(C, device=device) < C_G.unsqueeze(-1)).unsqueeze(0).expand(E, G, C)
        token_idx_A = token_GEC.permute(1, 0, 2)[keep_EGC]
        weight_A = weight_GEC.permute(1, 0, 2)[keep_EGC]
        per_expert = int(C_G.sum())
        real_T = mask_BS.reshape(-1).bool()
    expert_idx_A = torch.arange(E, device=device).repeat_interleave(per_expert)
    routed_T = torch.zeros(B * S, dtype=torch.bool, device=device)
    routed_T[token_idx_A] = True
    probs_TE, logits_TE = probs_BSE.reshape(B * S, E), logits_BSE.reshape(B * S, E)
    if real_T is not None:
        probs_TE, logits_TE, routed_T = probs_TE[real_T], logits_TE[real_T], routed_T[real_T]
    return Routing(
        token_idx_A=token_idx_A,
        expert_idx_A=expert_idx_A,
        weight_A=weight_A,
        probs_TE=probs_TE,
        logits_TE=logits_TE,
        tokens_per_expert_E=torch.full((E,), per_expert, dtype=torch.long, device=device),
        num_dropped=torch.zeros((), dtype=torch.long, device=device),
        num_unrouted=(~routed_T).sum(),
    )


def _ec_capacity(capacity: float, n: int, num_experts: int) -> int:
    """C = min(n, ceil(capacity * n / E)) tokens per expert of a group of n (0 for an empty group)."""
    # round() first so that e.g. 1.1 * 10 / 11 = 1.0000000000000002 does not become 2.
    return min(n, math.ceil(round(capacity * n / num_experts, 9))) if n > 0 else 0


def restrict_to_tokens(routing_fn, logits_TE: Tensor, real_T: Tensor | None, **kwargs) -> Routing:
    """``routing_fn(logits_TE, **kwargs)`` over the real tokens only (``real_T`` bool [T]); the
    assignments keep indices into all T tokens, probabilities and logits are the real tokens'."""
    if real_T is None:
        return routing_fn(logits_TE, **kwargs)
    idx_R = real_T.reshape(-1).nonzero().squeeze(1)
    r = routing_fn(logits_TE[idx_R], **kwargs)
    r.token_idx_A = idx_R[r.token_idx_A]
    return r


def load_balancing_loss(probs_TE: Tensor, expert_idx_A: Tensor, num_experts: int, top_k: int) -> Tensor:
    """Switch balancing loss E * sum_e f_e * P_e; 1.0 when routing is perfectly uniform.

    f_e: fraction of the T*K requested assignments (before any capacity drop) that went to
    expert e; P_e: mean router probability of e. Only P carries a gradient (f is a count).
    """
    T = probs_TE.shape[0]
    if T == 0:
        return probs_TE.sum() * 0.0
    f_E = count_per_index(expert_idx_A, num_experts).float() / (T * top_k)
    P_E = probs_TE.float().mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean squared logsumexp of the logits; keeps logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.float().sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
