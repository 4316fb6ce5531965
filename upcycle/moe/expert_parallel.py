"""Expert parallelism: each MoE layer's experts sharded over the N ranks of a group, tokens sent to them.

    ep = ExpertParallel(group, num_experts=32)            # this rank holds experts ep.lo:ep.hi (32/N of them)
    block.experts = shard_stacked(block.experts, ep.lo, ep.hi)
    block.expert_parallel = ep                            # MoEBlock.forward now dispatches through it
    agree_on_batches(model, [ep, ...], device)            # lets expert choice skip the count exchange

(``upcycle.train`` does all of this for ``expert_parallel: N``; see ``upcycle/train/expert_sharding.py``.)

Rank ``r`` of the group holds experts ``r * E/N ... (r + 1) * E/N - 1`` of every MoE layer, whole
experts in one contiguous range (a fine-grained copy's G segments are consecutive ids, so a copy
stays on one rank whenever G divides E/N). Per forward of a block, on every rank of the group
(the all-to-all token dispatcher of torchtitan, Megatron-Core's ``MoEAlltoAllTokenDispatcher``):

1. Routing happens where the token is (``MoEBlock.route``); pads have no assignment, so they are
   never sent.
2. The assignments are sorted by expert (stable: the order in which the one-process compute adds
   them up), which groups them by destination rank and, inside, by local expert.
3. Counts: every rank needs to know how many rows it receives from each rank for each of its
   experts. Top-K: one small all-to-all of the per-expert counts ([N, E/N] int64). Expert choice
   gives every expert the same number of tokens of a micro-batch, a function of its shape alone
   when nothing is padded: when every rank of the group runs the same unpadded shape (established
   once per model forward by ``agree_on_batches``: one 5-integer all-reduce for all the layers), the
   counts are known and the exchange is skipped; else they are exchanged as for top-K.
4. One differentiable ``all_to_all_single`` with uneven splits sends each assignment's token row
   (cast to the experts' compute dtype first, as the one-process compute casts its gathered rows).
5. The local experts compute every received row with weight 1 (``experts(...)``: any storage,
   backend, LoRA deltas, NF4), unweighted.
6. The reverse ``all_to_all_single`` brings each row's expert output home.
7. The combine happens where the token lives: ``y[t] += weight_a * out_a`` in float32, in the same
   order as the one-process compute, so the router's gradient (through ``weight_a``) is computed
   there, the weights never travel, and the result equals the one-process result bit for bit
   whenever the expert GEMMs give the same rows (they do on the CPU: the tests compare).

Rows travel once per assignment: a token with two experts on one rank goes there twice (as in
torchtitan and Megatron's dispatchers). Sending it once and its assignments beside it would save
up to K-fold on fine-grained layers, but then either the weights travel or the outputs come back
per assignment, and the sum is no longer added in the one-process order; docs/benchmarks.md counts
what it would save.

Autograd: both all-to-alls are differentiable (backward is the reverse exchange with the same
splits), so every rank must run the same collectives in the same order in backward too. Two
things guarantee it: a rank that receives no row at all still runs its experts on one zero row
with weight 0 (so its graph reaches the exchange and every local parameter gets a zero gradient:
FSDP then reduces the same tensors on every rank), and recomputation under activation
checkpointing routes the same tokens again, so it exchanges the same counts.

Traffic: ``ExpertParallel.traffic`` adds up, per rank, the bytes sent to *other* ranks (a rank's
rows for itself are a local copy), exactly from the splits: ``counts`` (the count exchange),
``forward`` (rows out and back), ``backward`` (their gradients, counted when backward runs).

Shape legend:
    T  tokens of this rank      D  hidden size            E  experts of the layer
    A  assignments here         R  rows received          N  ranks of the group (El = E/N each)
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from upcycle.errors import UpcycleError
from upcycle.moe.experts import StackedExperts
from upcycle.moe.routing import count_per_index

__all__ = ["ExpertParallel", "agree_on_batches", "local_range", "shard_stacked"]


def local_range(num_experts: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi): the experts rank ``rank`` of a group of ``size`` holds."""
    if num_experts % size:
        raise UpcycleError(f"expert_parallel={size} must divide the number of experts of every MoE layer; "
                           f"a layer has {num_experts}")
    per = num_experts // size
    return rank * per, (rank + 1) * per


def shard_stacked(experts: StackedExperts, lo: int, hi: int) -> StackedExperts:
    """``experts`` keeping experts ``lo:hi`` only (in place: the same module, its parameters cut to
    [hi - lo, ...] copies; names and backend unchanged). Returns it."""
    if type(experts) is not StackedExperts:
        raise UpcycleError(f"shard_stacked takes plain StackedExperts, got {type(experts).__name__}")
    for name, p in list(experts.named_parameters(recurse=False)):
        experts.register_parameter(name, nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad))
    experts.num_experts = hi - lo
    return experts


class _CountBackward(torch.autograd.Function):
    """Identity; its backward adds ``nbytes`` to ``traffic["backward"]`` (the reverse exchange's bytes)."""

    @staticmethod
    def forward(ctx, x: Tensor, traffic: dict, nbytes: int) -> Tensor:
        ctx.traffic, ctx.nbytes = traffic, nbytes
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.traffic["backward"] += ctx.nbytes
        return grad, None, None


class ExpertParallel(nn.Module):
    """The all-to-all dispatch of one MoE block over an expert-parallel group (see the module docstring).

    No parameters: the block's ``experts`` holds this rank's shard; this only moves tokens.
    """

    def __init__(self, group, num_experts: int):
        super().__init__()
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts = num_experts
        self.lo, self.hi = local_range(num_experts, self.rank, self.size)
        self.local_experts = self.hi - self.lo
        self.uniform_batches = False
        """Every rank of the group runs the current forward on the same [B, S] with no padding
        (``agree_on_batches`` sets it per model forward); expert choice then knows the counts."""
        self.traffic = {"counts": 0, "forward": 0, "backward": 0, "rows_sent": 0, "forwards": 0}

    def extra_repr(self) -> str:
        return f"rank={self.rank}/{self.size}, experts={self.lo}:{self.hi} of {self.num_experts}"

    def forward(self, experts: nn.Module, x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor,
                *, expert_major: bool = False) -> Tensor:
        """Like ``experts(x_TD, token_idx_A, expert_idx_A, weight_A)`` with all E experts (global ids in
        ``expert_idx_A``), where ``experts`` holds only this rank's: x [T, D] -> y [T, D] in x's dtype."""
        N, El, E = self.size, self.local_experts, self.num_experts
        T, D = x_TD.shape
        if expert_major:  # expert choice: grouped by expert in expert order already
            tok_A, exp_A, w_A = token_idx_A, expert_idx_A, weight_A
        else:
            order_A = torch.argsort(expert_idx_A, stable=True)
            tok_A, exp_A, w_A = token_idx_A[order_A], expert_idx_A[order_A], weight_A[order_A]
        if expert_major and self.uniform_batches:
            # Every expert of every rank took A / E tokens: no exchange, no host sync.
            per_expert = tok_A.numel() // E
            send_N, recv_NEl = [El * per_expert] * N, [[per_expert] * El for _ in range(N)]
        else:
            counts_E = count_per_index(exp_A, E)
            recv_E = torch.empty_like(counts_E)
            dist.all_to_all_single(recv_E, counts_E, group=self.group)  # El counts to each rank
            counts, recv = torch.stack([counts_E, recv_E]).view(2, N, El).tolist()  # the one host sync
            send_N, recv_NEl = [sum(c) for c in counts], recv
            self.traffic["counts"] += (N - 1) * El * counts_E.element_size()
        recv_N = [sum(c) for c in recv_NEl]
        dtype = _compute_dtype(experts, x_TD)
        x_send_AD = x_TD[tok_A].to(dtype)
        x_recv_RD = self._exchange(x_send_AD, recv_N, send_N)
        local_R = torch.arange(El, device=x_TD.device).repeat(N).repeat_interleave(
            torch.tensor([c for row in recv_NEl for c in row], device=x_TD.device), output_size=sum(recv_N))
        y_recv_RD = self._compute(experts, x_recv_RD, local_R)
        y_back_AD = self._exchange(y_recv_RD, send_N, recv_N)
        self.traffic["rows_sent"] += sum(n for d, n in enumerate(send_N) if d != self.rank)
        self.traffic["forwards"] += 1
        y_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
        y_TD.index_add_(0, tok_A, y_back_AD.float() * w_A.unsqueeze(-1).float())
        return y_TD.to(x_TD.dtype)

    def _exchange(self, t_ND: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        """One differentiable all-to-all of rows with uneven splits; traffic counted (backward: the reverse)."""
        row = t_ND.shape[-1] * t_ND.element_size()
        sent = row * sum(n for d, n in enumerate(in_splits) if d != self.rank)
        back = row * sum(n for s, n in enumerate(out_splits) if s != self.rank)
        self.traffic["forward"] += sent
        if t_ND.requires_grad:
            t_ND = _CountBackward.apply(t_ND, self.traffic, back)
        # A functional collective: the result waits for the exchange at its first use.
        return all_to_all_single_autograd(t_ND.contiguous(), out_splits, in_splits, self.group)

    def _compute(self, experts: nn.Module, x_RD: Tensor, local_R: Tensor) -> Tensor:
        R = x_RD.shape[0]
        if R:
            return experts(x_RD, torch.arange(R, device=x_RD.device), local_R, x_RD.new_ones(R, dtype=torch.float32))
        # Nothing arrived: one zero row with weight 0 keeps this rank's graph the same shape as the
        # others' (the reverse exchange runs in backward, every local parameter gets a zero gradient).
        x_1D = torch.cat([x_RD, x_RD.new_zeros(1, x_RD.shape[1])])
        zero = torch.zeros(1, dtype=torch.long, device=x_RD.device)
        return experts(x_1D, zero, zero, x_RD.new_zeros(1, dtype=torch.float32))[:0]


def _compute_dtype(experts: nn.Module, x_TD: Tensor) -> torch.dtype:
    """The dtype the experts compute in (autocast's, else their weights'): rows travel in it."""
    device = x_TD.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    storage = getattr(experts, "base_layer", experts)  # a LoRA wrapper computes in its base's dtype
    return getattr(storage, "weight_dtype", x_TD.dtype)


def agree_on_batches(model: nn.Module, dispatchers: list[ExpertParallel], device) -> None:
    """Before every forward of ``model`` (the module taking ``input_ids`` / ``inputs_embeds``), one
    all-reduce over the dispatchers' group says whether every rank runs the same [B, S] unpadded
    (``ExpertParallel.uniform_batches``). Register after ``use_attention_mask`` (it reads the blocks'
    masks that hook sets). Under activation checkpointing the recomputation keeps the forward's answer."""
    if not dispatchers:
        return
    group = dispatchers[0].group
    params = list(inspect.signature(model.forward).parameters)

    def argument(name, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = params.index(name) if name in params else len(args)
        return args[i] if i < len(args) else None

    blocks = [m for m in model.modules() if getattr(m, "expert_parallel", None) in dispatchers]

    def agree(module, args, kwargs) -> None:
        ids = argument("input_ids", args, kwargs)
        if ids is None:
            ids = argument("inputs_embeds", args, kwargs)
        B, S = (ids.shape[0], ids.shape[1]) if ids is not None and ids.dim() >= 2 else (-1, -1)
        padded = any(b.token_mask is not None for b in blocks)
        t = torch.tensor([B, -B, S, -S, int(padded)], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        hi_B, lo_B, hi_S, lo_S, any_padded = t.tolist()
        uniform = hi_B == -lo_B and hi_S == -lo_S and not any_padded
        for ep in dispatchers:
            ep.uniform_batches = uniform

    model.register_forward_pre_hook(agree, with_kwargs=True)
