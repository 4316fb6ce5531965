"""The experts forward/backward as one ``torch.autograd.Function``, and its entry point ``moe_experts``.

Forward: sort assignments by expert (skipped for expert-major input), then two kernels:
up (gather + GEMM + bias + activation) and down (GEMM + bias + combine weight + scatter-add).
Saved for backward: the pre-activations z_AM and the activated h_AF (memory instead of a
recompute GEMM: h feeds dW_down, z the activation derivative).

Backward: four kernel launches, no gathered or permuted copies of x or dy:
  dz, dweight = dh(dy[tok] @ w_down[e]; <., h>; activation backward)
  dx          = scatter(dz @ w_in[e])
  dW_in, db_in     = per expert  dz^T x[tok]
  dW_down, db_down = per expert  (weight * dy[tok])^T h

NF4 weights (``MoEExpertsNF4Function``): the same forward with both weights read as NF4 codes;
backward is the dh and dx launches only (no weight or bias gradient: a frozen QLoRA base).

Shape legend: see ``grouped_gemm.py`` (T, D, F, M, E, A).
"""

from __future__ import annotations

import torch
from torch import Tensor

from upcycle_kernels import launch, ops
from upcycle_kernels.activations import activation_code

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MoEExpertsFunction(torch.autograd.Function):
    """y_TD = sum_a weight[a] * expert[e_a](x[tok_a]) over expert-sorted assignments."""

    @staticmethod
    def forward(ctx, x_TD, tok_A, offs_E1, weight_A, w_in_EMD, b_in_EM, w_down_EDF, b_down_ED,
                gated: bool, act: int, equal_rows: int | None, save_z: bool):
        h_AF, z_AM = ops.experts_up(x_TD, tok_A, offs_E1, w_in_EMD, b_in_EM, gated, act, save_z, equal_rows)
        y_TD = ops.experts_down(h_AF, tok_A, weight_A, offs_E1, w_down_EDF, b_down_ED, x_TD.shape[0], equal_rows)
        ctx.save_for_backward(x_TD, tok_A, offs_E1, weight_A, w_in_EMD, b_in_EM, w_down_EDF, b_down_ED, z_AM, h_AF)
        ctx.gated, ctx.act, ctx.equal_rows = gated, act, equal_rows
        return y_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, tok_A, offs_E1, weight_A, w_in, b_in, w_down, b_down, z_AM, h_AF = ctx.saved_tensors
        need = ctx.needs_input_grad
        # contiguous(): out.sum().backward() hands in an expanded (stride-0) gradient.
        dy_TD = dy_TD.to(w_down.dtype).contiguous()
        dz_AM, dweight_A = ops.experts_dh(dy_TD, tok_A, weight_A, offs_E1, w_down, b_down, z_AM, ctx.gated,
                                          ctx.act, ctx.equal_rows)
        dx = dw_in = db_in = dw_down = db_down = None
        if need[0]:
            dx = ops.experts_dx(dz_AM, tok_A, offs_E1, w_in, x_TD.shape[0], ctx.equal_rows).to(x_TD.dtype)
        if need[4] or need[5]:
            dw_in, db_in = ops.experts_weight_grad(dz_AM, x_TD, tok_A, None, offs_E1, False, True, b_in is not None)
        if need[6] or need[7]:
            dw_down, db_down = ops.experts_weight_grad(dy_TD, h_AF, tok_A, weight_A, offs_E1, True, False,
                                                       b_down is not None)
        dweight = dweight_A.to(weight_A.dtype) if need[3] else None
        return (dx, None, None, dweight, dw_in, db_in if need[5] else None, dw_down,
                db_down if need[7] else None, None, None, None, None)


def _nf4_args(w: launch.NF4Weight) -> tuple:
    """An ``NF4Weight`` as the NF4 ops take it: codes, constants, shape, shared, blocksize."""
    return (w.packed, w.absmax, list(w.shape), w.strides[0] == 0, w.blocksize)


class MoEExpertsNF4Function(torch.autograd.Function):
    """``MoEExpertsFunction`` over frozen NF4 weights: the same forward, read from codes and constants;
    backward gives the gradients of x and of the combine weights only (the weights and biases are frozen)."""

    @staticmethod
    def forward(ctx, x_TD, tok_A, offs_E1, weight_A, w_in: launch.NF4Weight, b_in_EM, w_down: launch.NF4Weight,
                b_down_ED, gated: bool, act: int, equal_rows: int | None, save_z: bool):
        q_in, q_down = _nf4_args(w_in), _nf4_args(w_down)
        h_AF, z_AM = ops.experts_up_nf4(x_TD, tok_A, offs_E1, *q_in, b_in_EM, gated, act, save_z, equal_rows)
        y_TD = ops.experts_down_nf4(h_AF, tok_A, weight_A, offs_E1, *q_down, b_down_ED, x_TD.shape[0], equal_rows)
        ctx.save_for_backward(tok_A, offs_E1, weight_A, b_down_ED, z_AM)
        ctx.q_in, ctx.q_down = q_in, q_down  # the frozen storage itself: nothing dense is kept
        ctx.gated, ctx.act, ctx.equal_rows, ctx.num_tokens, ctx.dtype = gated, act, equal_rows, x_TD.shape[0], x_TD.dtype
        return y_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, dy_TD):
        tok_A, offs_E1, weight_A, b_down, z_AM = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy_TD = dy_TD.to(ctx.dtype).contiguous()  # out.sum().backward() hands in an expanded gradient
        dz_AM, dweight_A = ops.experts_dh_nf4(dy_TD, tok_A, weight_A, offs_E1, *ctx.q_down, b_down, z_AM, ctx.gated,
                                              ctx.act, ctx.equal_rows)
        dx = None
        if need[0]:
            dx = ops.experts_dx_nf4(dz_AM, tok_A, offs_E1, *ctx.q_in, ctx.num_tokens, ctx.equal_rows).to(ctx.dtype)
        dweight = dweight_A.to(weight_A.dtype) if need[3] else None
        return dx, None, None, dweight, None, None, None, None, None, None, None, None


def expert_offsets(expert_idx_A: Tensor, num_experts: int) -> Tensor:
    """int32 [E+1]: row boundaries of each expert after a stable sort by expert."""
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=expert_idx_A.device)
    counts_E.scatter_add_(0, expert_idx_A, torch.ones_like(expert_idx_A, dtype=torch.int32))
    return torch.nn.functional.pad(counts_E.cumsum(0, dtype=torch.int32), (1, 0))


def unsupported(dtype: torch.dtype, activation: str) -> str | None:
    """Why the triton kernels cannot run experts of this dtype and activation, or None."""
    if dtype not in SUPPORTED_DTYPES:
        name = str(dtype).removeprefix("torch.")
        return f"the triton experts kernels support float32, bfloat16 and float16, not {name}"
    try:
        activation_code(activation)
    except ValueError as e:
        return str(e)
    return None


def moe_experts(x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor,
                w_in_EMD: Tensor | launch.NF4Weight, w_down_EDF: Tensor | launch.NF4Weight,
                b_in_EM: Tensor | None = None, b_down_ED: Tensor | None = None, *,
                activation: str, gated: bool, expert_major: bool = False) -> Tensor:
    """y_TD = sum over assignments a of weight[a] * expert[expert_idx[a]](x[token_idx[a]]), in x's dtype.

    Experts: ``down(act(gate(x)) * up(x))`` when ``gated`` (w_in rows :F gate, F: up), else
    ``down(act(up(x)))``; weights [E, M, D] / [E, D, F], optional biases [E, M] / [E, D].
    ``expert_major``: the assignments are already grouped by expert, A/E each, in expert
    order (what expert-choice routing returns), so no sort is needed. The caller vouches for
    it: checking would need a device sync.
    Differentiable w.r.t. x, weight_A, both weights and both biases; with ``NF4Weight``s (both
    projections, QLoRA's frozen base), w.r.t. x and weight_A only, every tile decoded in registers.
    """
    nf4 = isinstance(w_in_EMD, launch.NF4Weight)
    if nf4 != isinstance(w_down_EDF, launch.NF4Weight):
        raise ValueError("moe_experts: both projections are NF4 or neither is")
    why = unsupported(w_in_EMD.dtype, activation)
    if why:
        raise ValueError(why)
    launch.check_device(x_TD, w_in_EMD.packed if nf4 else w_in_EMD)
    E, M, D = w_in_EMD.shape
    A = token_idx_A.numel()
    Fn = M // 2 if gated else M
    if w_down_EDF.shape != (E, D, Fn) or x_TD.shape[-1] != D or x_TD.dim() != 2:
        raise ValueError(f"moe_experts: x {tuple(x_TD.shape)}, w_in {tuple(w_in_EMD.shape)}, "
                         f"w_down {tuple(w_down_EDF.shape)} do not fit (gated={gated})")
    out_dtype = x_TD.dtype
    x_TD = x_TD.to(w_in_EMD.dtype)  # like the loop backend: compute in the weights' dtype
    if expert_major:
        if A % E:
            raise ValueError(f"expert_major assignments need the same count per expert; {A} is not a multiple of {E}")
        equal_rows = A // E
        offs_E1 = torch.arange(E + 1, device=x_TD.device, dtype=torch.int32) * equal_rows
        tok_A, w_A = token_idx_A, weight_A
    else:
        equal_rows = None
        order_A = torch.argsort(expert_idx_A, stable=True)
        offs_E1 = expert_offsets(expert_idx_A, E)
        tok_A, w_A = token_idx_A[order_A], weight_A[order_A]  # weight's gradient un-sorts through the index
    # Backward needs the pre-activations only if something is differentiated (decided here:
    # grad mode is always off inside Function.forward).
    tensors = (x_TD, weight_A) if nf4 else (x_TD, weight_A, w_in_EMD, b_in_EM, w_down_EDF, b_down_ED)
    save_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    fn = MoEExpertsNF4Function if nf4 else MoEExpertsFunction
    y_TD = fn.apply(x_TD.contiguous() if x_TD.stride(-1) != 1 else x_TD, tok_A.contiguous(), offs_E1,
                    w_A.float().contiguous(), w_in_EMD, b_in_EM, w_down_EDF, b_down_ED, gated,
                    activation_code(activation), equal_rows, save_z)
    return y_TD.to(out_dtype)
