"""The one experts forward: every backend, every weight storage, with or without LoRA deltas.

    y_TD = experts_forward(x_TD, token_idx_A, expert_idx_A, weight_A, weights, gated=True,
                           activation="silu", backend="grouped_mm", lowrank=None)

computes ``y[t] = sum_a weight[a] * expert_{e(a)}(x[t])`` over the assignments a of token t,
where expert e is ``down_e(act(gate_e x) * up_e x)`` (gated) or ``down_e(act(up_e x))``, each
projection optionally plus a low-rank delta ``scaling * B_e A_e`` applied as ``(x A_e^T) B_e^T``
(``W_e + B_e A_e`` is never built). Tokens with no assignment get 0.

Storage (plain stacked, shared base, NF4) only decides where ``ExpertWeights`` come from;
LoRA only adds ``LowRank``; the math is here, once. The ``triton`` backend runs the fused
kernels of ``upcycle_kernels``; with low-rank deltas it hands over to ``grouped_mm`` (the
kernels have no low-rank epilogue yet), or to ``loop`` where ``grouped_mm`` cannot run.
NF4 weights without low-rank deltas stay on ``triton``: its kernels decode NF4 tiles in
registers (forward and the input gradient).

Quantised weights (``QuantizedWeight``: NF4 experts) are never dequantised whole. ``loop``
and ``grouped_mm`` dequantise one block of experts at a time (``DEQUANT_BLOCK_BYTES`` of
dequantised weight, at least one expert; experts without tokens are skipped), run that
block's GEMM and drop it; backward (the input gradient only: the base is frozen) dequantises
again the same way, so autograd keeps no dense copy between forward and backward. Knowing
each block's rows takes the per-expert counts on the host (one device sync per GEMM).

Shape legend:
    T  tokens           D  hidden size         F  expert FFN size
    E  experts          A  assignments         r  LoRA rank
    M  first-projection rows (2F gated, F otherwise)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.activations import ACT2FN

from upcycle.moe.backends import grouped_mm_unsupported
from upcycle.moe.routing import count_per_index


DEQUANT_BLOCK_BYTES = 32 * 2**20
"""Dequantised weight one block of a ``QuantizedWeight`` may take (at least one expert)."""


@dataclass(frozen=True)
class QuantizedWeight:
    """An expert weight [E, R, C] kept quantised: the experts forward dequantises it a block of
    experts at a time (see the module docstring). Frozen: no weight gradient."""

    shape: tuple[int, int, int]
    """[E, R, C] (the dequantised shape)."""
    dtype: torch.dtype
    """The compute dtype the blocks come in."""
    dequantize: Callable[[int, int], Tensor]
    """``(e0, e1)`` -> experts ``e0:e1`` as [e1 - e0, R, C] in ``dtype`` (for a shared base, a stride-0 view)."""
    shared: bool = False
    """All E experts are one stored matrix (a shared base): dequantised once per GEMM, seen E times."""
    nf4: Callable[[], dict] | None = None
    """NF4 storage as the triton kernels read it (they decode tiles in registers): a callable giving
    ``packed`` (uint8 codes), ``absmax`` (fp32 per ``blocksize`` elements: a double-quantised absmax
    decoded, 1/64 of the weight's elements) and ``blocksize``; row-major [E, R, C] ([R, C] if ``shared``).
    None: the triton backend hands NF4 experts to grouped_mm."""

    def expert(self, e: int) -> QuantizedWeight:
        """Expert ``e`` alone, as a [1, R, C] ``QuantizedWeight``."""
        return QuantizedWeight((1, *self.shape[1:]), self.dtype, lambda a, b: self.dequantize(e + a, e + b),
                               self.shared)


@dataclass(frozen=True)
class ExpertWeights:
    """What an experts forward reads, whatever stores it (views are fine: stride 0 on E included)."""

    w_in_EMD: Tensor | QuantizedWeight
    """[E, M, D]: ``gate_up_proj`` (rows :F gate, F: up) or ``up_proj``."""
    w_down_EDF: Tensor | QuantizedWeight
    """[E, D, F]: ``down_proj``."""
    b_in_EM: Tensor | None = None
    b_down_ED: Tensor | None = None


@dataclass(frozen=True)
class LowRank:
    """Per-expert low-rank deltas on both projections (LoRA); B zero means no change."""

    a_in_ERD: Tensor
    b_in_EMR: Tensor
    a_down_ERF: Tensor
    b_down_EDR: Tensor
    scaling: float
    dropout: Callable[[Tensor], Tensor] = lambda t: t
    """Applied to each projection's input before A (LoRA dropout)."""


@functools.lru_cache(maxsize=None)
def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    return ACT2FN[name]


def experts_forward(x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor,
                    weights: ExpertWeights, *, gated: bool, activation: str, backend: str,
                    lowrank: LowRank | None = None, expert_major: bool = False) -> Tensor:
    """x [T, D], assignments [A] -> y [T, D] in x's dtype (see the module docstring).

    ``backend``: a resolved name (``loop``, ``grouped_mm`` or ``triton``). ``expert_major``:
    the assignments come grouped by expert in expert order, A/E each (expert-choice
    routing); the triton kernels then skip their sort. Not checked.
    """
    weights, lowrank = _autocast(x_TD, weights, lowrank)
    w_in, w_down = weights.w_in_EMD, weights.w_down_EDF
    quantized = isinstance(w_in, QuantizedWeight)
    in_registers = quantized and w_in.nf4 is not None and w_down.nf4 is not None
    if backend == "triton" and (lowrank is not None or (quantized and not in_registers)):
        backend = "loop" if grouped_mm_unsupported(w_in.dtype, w_in.shape[-1], w_down.shape[-1]) else "grouped_mm"
    if backend == "triton":
        from upcycle_kernels import moe_experts

        if quantized:  # NF4 tiles decoded in the kernels' registers: no dequantised weight in memory
            w_in, w_down = _nf4_weight(w_in), _nf4_weight(w_down)
        return moe_experts(x_TD, token_idx_A, expert_idx_A, weight_A, w_in, w_down, weights.b_in_EM,
                           weights.b_down_ED, activation=activation, gated=gated, expert_major=expert_major)
    act = activation_fn(activation)

    def activate(h_NM: Tensor) -> Tensor:
        if gated:
            gate_NF, up_NF = h_NM.chunk(2, dim=-1)
            return act(gate_NF) * up_NF
        return act(h_NM)

    run = {"loop": _forward_loop, "grouped_mm": _forward_grouped_mm}[backend]
    return run(x_TD, token_idx_A, expert_idx_A, weight_A, weights, activate, lowrank)


def autocast_off(device_type: str):
    """A context where autocast does not run (a no-op when it is not on for ``device_type``): for the
    few computations that must stay in the dtype their inputs were cast to (the router's float32,
    a LoRA merge's adapter dtype), which autocast would otherwise run in bf16."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _nf4_weight(w: QuantizedWeight):
    """A ``QuantizedWeight``'s NF4 storage as ``upcycle_kernels.NF4Weight`` (the kernels' view of it)."""
    from upcycle_kernels import NF4Weight

    q = w.nf4()
    return NF4Weight.stacked(q["packed"], q["absmax"], *w.shape, w.shared, q["blocksize"], w.dtype)


def _autocast(x_TD: Tensor, weights: ExpertWeights, lowrank: LowRank | None):
    """Under autocast, the experts compute in its dtype as its matmuls do (bf16 on a GPU): the
    custom kernels and grouped_mm are not on autocast's lists, so without this they would run
    in the fp32 of the master weights. The casts are differentiable: gradients reach the masters."""
    device = x_TD.device.type
    if not torch.is_autocast_enabled(device):
        return weights, lowrank
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        # A QuantizedWeight computes in the dtype its storage chose (bf16 on CUDA).
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    weights = ExpertWeights(cast(weights.w_in_EMD), cast(weights.w_down_EDF), cast(weights.b_in_EM),
                            cast(weights.b_down_ED))
    if lowrank is not None:
        lowrank = LowRank(cast(lowrank.a_in_ERD), cast(lowrank.b_in_EMR), cast(lowrank.a_down_ERF),
                          cast(lowrank.b_down_EDR), lowrank.scaling, lowrank.dropout)
    return weights, lowrank


def sort_by_expert(token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor, num_experts: int):
    """Assignments stably sorted by expert, and the count per expert [E]."""
    order_A = torch.argsort(expert_idx_A, stable=True)
    counts_E = count_per_index(expert_idx_A, num_experts)
    return token_idx_A[order_A], expert_idx_A[order_A], weight_A[order_A], counts_E


def _lowrank_term(x_NI: Tensor, a_RI: Tensor, b_OR: Tensor, lr: LowRank, out_dtype: torch.dtype) -> Tensor:
    x_NI = lr.dropout(x_NI.to(a_RI.dtype))
    return (F.linear(F.linear(x_NI, a_RI), b_OR) * lr.scaling).to(out_dtype)


def _per_expert(w: Tensor | QuantizedWeight) -> list:
    if isinstance(w, QuantizedWeight):
        if w.shared:  # one stored matrix: dequantised once for this call, not once per expert and pass
            return [w.dequantize(0, 1)[0]] * w.shape[0]
        return [w.expert(e) for e in range(w.shape[0])]
    return list(w.unbind(0))


def _linear(x_NI: Tensor, w: Tensor | QuantizedWeight, b: Tensor | None) -> Tensor:
    """``x W^T + b`` of one expert (W quantised: dequantised for the call, again in backward)."""
    if isinstance(w, QuantizedWeight):
        y = _QuantizedGroupedLinear.apply(x_NI, w, [x_NI.shape[0]], False)
        return y if b is None else y + b
    return F.linear(x_NI, w, b)


def _forward_loop(x_TD, token_idx_A, expert_idx_A, weight_A, w: ExpertWeights, activate, lr) -> Tensor:
    w_in = w.w_in_EMD
    # float32 (or wider) accumulator: bf16 sums over K experts would round at every add.
    acc = torch.promote_types(torch.float32, w_in.dtype)
    y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
    tok_A, _, w_A, counts_E = sort_by_expert(token_idx_A, expert_idx_A, weight_A, w_in.shape[0])
    # unbind once: indexing w[e] per expert would make autograd build a full [E, ...] zero
    # gradient per expert in backward (O(E^2) work).
    w_in_E, w_down_E = _per_expert(w_in), _per_expert(w.w_down_EDF)
    b_in_E = w.b_in_EM.unbind(0) if w.b_in_EM is not None else None
    b_down_E = w.b_down_ED.unbind(0) if w.b_down_ED is not None else None
    if lr is not None:
        a_in_E, b_in_lr_E = lr.a_in_ERD.unbind(0), lr.b_in_EMR.unbind(0)
        a_down_E, b_down_lr_E = lr.a_down_ERF.unbind(0), lr.b_down_EDR.unbind(0)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        tok_N, w_N = tok_A[start:start + n], w_A[start:start + n]
        start += n
        x_ND = x_TD[tok_N].to(w_in.dtype)
        h_NM = _linear(x_ND, w_in_E[e], None if b_in_E is None else b_in_E[e])
        if lr is not None:
            h_NM = h_NM + _lowrank_term(x_ND, a_in_E[e], b_in_lr_E[e], lr, h_NM.dtype)
        h_NF = activate(h_NM)
        out_ND = _linear(h_NF, w_down_E[e], None if b_down_E is None else b_down_E[e])
        if lr is not None:
            out_ND = out_ND + _lowrank_term(h_NF, a_down_E[e], b_down_lr_E[e], lr, out_ND.dtype)
        y_TD.index_add_(0, tok_N, out_ND.to(acc) * w_N.unsqueeze(-1).to(acc))
    return y_TD.to(x_TD.dtype)


def _lowrank_grouped(x_AI: Tensor, a_ERI: Tensor, b_EOR: Tensor, lr: LowRank, offs_E: Tensor, counts_E: Tensor,
                     out_dtype: torch.dtype) -> Tensor:
    """Per-expert ``(x A_e^T) B_e^T * scaling`` over expert-sorted rows x [A, I] -> [A, O]."""
    x_AI = lr.dropout(x_AI.to(a_ERI.dtype))
    if grouped_mm_unsupported(a_ERI.dtype, x_AI.shape[-1], a_ERI.shape[1]) is None:
        t_AR = grad_contiguous(F.grouped_mm(x_AI, a_ERI.transpose(-2, -1), offs=offs_E))
        d_AO = grad_contiguous(F.grouped_mm(t_AR, b_EOR.transpose(-2, -1), offs=offs_E))
    else:  # rank rows not 16-byte aligned: grouped_mm cannot take them, go expert by expert
        counts = counts_E.tolist()
        a_E, b_E = a_ERI.unbind(0), b_EOR.unbind(0)
        parts = [F.linear(F.linear(x_NI, a_E[e]), b_E[e]) for e, x_NI in enumerate(x_AI.split(counts)) if counts[e]]
        d_AO = torch.cat(parts) if parts else x_AI.new_zeros(0, b_EOR.shape[1])
    return (d_AO * lr.scaling).to(out_dtype)


def _forward_grouped_mm(x_TD, token_idx_A, expert_idx_A, weight_A, w: ExpertWeights, activate, lr) -> Tensor:
    w_in = w.w_in_EMD
    tok_A, exp_A, w_A, counts_E = sort_by_expert(token_idx_A, expert_idx_A, weight_A, w_in.shape[0])
    offs_E = counts_E.cumsum(0).to(torch.int32)
    x_AD = x_TD[tok_A].to(w_in.dtype)
    h_AM = _grouped_linear(x_AD, w_in, offs_E, counts_E)
    if lr is not None:
        h_AM = h_AM + _lowrank_grouped(x_AD, lr.a_in_ERD, lr.b_in_EMR, lr, offs_E, counts_E, h_AM.dtype)
    if w.b_in_EM is not None:
        h_AM = h_AM + w.b_in_EM[exp_A]
    h_AF = activate(h_AM)
    out_AD = _grouped_linear(h_AF, w.w_down_EDF, offs_E, counts_E)
    if lr is not None:
        out_AD = out_AD + _lowrank_grouped(h_AF, lr.a_down_ERF, lr.b_down_EDR, lr, offs_E, counts_E, out_AD.dtype)
    if w.b_down_ED is not None:
        out_AD = out_AD + w.b_down_ED[exp_A]
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    y_TD.index_add_(0, tok_A, out_AD.float() * w_A.unsqueeze(-1).float())
    return y_TD.to(x_TD.dtype)


def _grouped_linear(x_AI: Tensor, w: Tensor | QuantizedWeight, offs_E: Tensor, counts_E: Tensor) -> Tensor:
    """Per expert e, its expert-sorted rows of x [A, I] times ``w[e]^T`` -> [A, O]."""
    if isinstance(w, QuantizedWeight):
        return _QuantizedGroupedLinear.apply(x_AI, w, counts_E.tolist(), True)
    return grad_contiguous(F.grouped_mm(x_AI, w.transpose(-2, -1), offs=offs_E))


def _quantized_matmul(x_NK: Tensor, w: QuantizedWeight, counts: list[int], transpose: bool, grouped: bool) -> Tensor:
    """Expert-sorted rows of x times ``w[e]^T`` (``transpose``: times ``w[e]``), one block of experts dequantised
    at a time. x [N, C] -> [N, R] (``transpose``: x [N, R] -> [N, C]); ``grouped``: grouped_mm per block, else
    one matmul per expert."""
    E, R, C = w.shape
    out = x_NK.new_empty(x_NK.shape[0], C if transpose else R)
    per_expert = R * C * torch.empty(0, dtype=w.dtype).element_size()
    shared_view = w.dequantize(0, E) if w.shared else None  # one matrix: dequantised once for every block
    # A shared base's stride-0 view costs nothing on the CPU: one block. Elsewhere blocks are made contiguous.
    block = E if w.shared and not x_NK.is_cuda else max(1, DEQUANT_BLOCK_BYTES // max(per_expert, 1))
    row = 0
    for e0 in range(0, E, block):
        e1 = min(E, e0 + block)
        rows = counts[e0:e1]
        n = sum(rows)
        if n == 0:  # no token routed to these experts: nothing to dequantise
            continue
        w_BRC = shared_view[e0:e1] if shared_view is not None else w.dequantize(e0, e1)
        if x_NK.is_cuda and w_BRC.stride(0) == 0:
            w_BRC = w_BRC.contiguous()  # CUDA grouped_mm: a stride-0 expert dim is not relied on
        x_blk = x_NK[row:row + n]
        if grouped:
            offs = torch.tensor(rows, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_NK.device)
            y = F.grouped_mm(x_blk, w_BRC if transpose else w_BRC.transpose(-2, -1), offs=offs)
        else:
            parts = [x_e @ w_BRC[i] if transpose else F.linear(x_e, w_BRC[i])
                     for i, x_e in enumerate(x_blk.split(rows)) if rows[i]]
            y = torch.cat(parts)
        out[row:row + n] = y
        row += n
        del w_BRC
    return out


class _QuantizedGroupedLinear(torch.autograd.Function):
    """``_grouped_linear`` for a ``QuantizedWeight``: y = x W_e^T per expert, W dequantised a block at a time in
    forward and again in backward (dx = dy W_e); nothing dense is saved, and W gets no gradient (frozen)."""

    @staticmethod
    def forward(ctx, x_AI: Tensor, w: QuantizedWeight, counts: list[int], grouped: bool) -> Tensor:
        ctx.w, ctx.counts, ctx.grouped = w, counts, grouped
        return _quantized_matmul(x_AI, w, counts, False, grouped)

    @staticmethod
    def backward(ctx, dy_AO: Tensor):
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _quantized_matmul(dy_AO.contiguous(), ctx.w, ctx.counts, True, ctx.grouped)
        return dx, None, None, None


class _GradContiguous(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    grouped_mm's backward rejects gradients with zero strides, which is exactly what
    ``out.sum().backward()`` produces (an expanded scalar). The combine step after each
    GEMM happens to materialise its gradient today; this keeps any rewiring of it safe.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grad_contiguous(x: Tensor) -> Tensor:
    """``x`` itself, whose gradient reaches grouped_mm contiguous (see ``_GradContiguous``)."""
    return _GradContiguous.apply(x) if x.requires_grad else x
