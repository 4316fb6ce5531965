"""``torch.library`` custom ops over the launchers, each with a fake impl for torch.compile.

The ops are opaque to the compiler (it cannot look inside a Triton launch that allocates
its outputs); the fake impls tell it the output shapes and dtypes, so a compiled model
traces straight through the experts instead of breaking the graph. Optional arguments a
schema cannot express as None in outputs come back as empty tensors (e.g. ``z`` with
``save_z=False``, ``db`` without bias).

Shape legend: see ``grouped_gemm.py`` (T, D, F, M, E, A).
"""

from __future__ import annotations

import torch
from torch import Tensor

from upcycle_kernels import launch


@torch.library.custom_op("upcycle_kernels::experts_up", mutates_args=())
def experts_up(x_TD: Tensor, tok_A: Tensor, offs_E1: Tensor, w_in_EMD: Tensor, b_in_EM: Tensor | None,
               gated: bool, act: int, save_z: bool, equal_rows: int | None) -> tuple[Tensor, Tensor]:
    """(h_AF, z_AM) of the gathered up projection with the activation fused."""
    return launch.up_gather(x_TD, tok_A, offs_E1, w_in_EMD, b_in_EM, gated=gated, act=act, save_z=save_z,
                            equal_rows=equal_rows)


@experts_up.register_fake
def _(x_TD, tok_A, offs_E1, w_in_EMD, b_in_EM, gated, act, save_z, equal_rows):
    A, M = tok_A.shape[0], w_in_EMD.shape[1]
    Fn = M // 2 if gated else M
    return x_TD.new_empty(A, Fn, dtype=w_in_EMD.dtype), x_TD.new_empty(A if save_z else 0, M, dtype=w_in_EMD.dtype)


@torch.library.custom_op("upcycle_kernels::experts_down", mutates_args=())
def experts_down(h_AF: Tensor, tok_A: Tensor, weight_A: Tensor, offs_E1: Tensor, w_down_EDF: Tensor,
                 b_down_ED: Tensor | None, num_tokens: int, equal_rows: int | None) -> Tensor:
    """y_TD float32 = sum over assignments of weight * (h @ w_down[e]^T + b_down[e]), scattered to tokens."""
    return launch.scatter_gemm(h_AF, tok_A, weight_A, offs_E1, w_down_EDF.transpose(1, 2), b_down_ED, num_tokens,
                               equal_rows)


@experts_down.register_fake
def _(h_AF, tok_A, weight_A, offs_E1, w_down_EDF, b_down_ED, num_tokens, equal_rows):
    return h_AF.new_empty(num_tokens, w_down_EDF.shape[1], dtype=torch.float32)


@torch.library.custom_op("upcycle_kernels::experts_dh", mutates_args=())
def experts_dh(dy_TD: Tensor, tok_A: Tensor, weight_A: Tensor, offs_E1: Tensor, w_down_EDF: Tensor,
               b_down_ED: Tensor | None, z_AM: Tensor, gated: bool, act: int,
               equal_rows: int | None) -> tuple[Tensor, Tensor]:
    """(dz_AM, dweight_A float32): backward through the down projection and the activation."""
    return launch.dh_gather(dy_TD, tok_A, weight_A, offs_E1, w_down_EDF, b_down_ED, z_AM, gated=gated, act=act,
                            equal_rows=equal_rows)


@experts_dh.register_fake
def _(dy_TD, tok_A, weight_A, offs_E1, w_down_EDF, b_down_ED, z_AM, gated, act, equal_rows):
    return torch.empty_like(z_AM), dy_TD.new_empty(tok_A.shape[0], dtype=torch.float32)


@torch.library.custom_op("upcycle_kernels::experts_dx", mutates_args=())
def experts_dx(dz_AM: Tensor, tok_A: Tensor, offs_E1: Tensor, w_in_EMD: Tensor, num_tokens: int,
               equal_rows: int | None) -> Tensor:
    """dx_TD float32 = dz @ w_in[e], scatter-added to tokens."""
    return launch.scatter_gemm(dz_AM, tok_A, None, offs_E1, w_in_EMD, None, num_tokens, equal_rows)


@experts_dx.register_fake
def _(dz_AM, tok_A, offs_E1, w_in_EMD, num_tokens, equal_rows):
    return dz_AM.new_empty(num_tokens, w_in_EMD.shape[2], dtype=torch.float32)


@torch.library.custom_op("upcycle_kernels::experts_weight_grad", mutates_args=())
def experts_weight_grad(l_XM: Tensor, r_XN: Tensor, tok_A: Tensor, scale_A: Tensor | None, offs_E1: Tensor,
                        l_gather: bool, r_gather: bool, with_bias: bool) -> tuple[Tensor, Tensor]:
    """(dW_EMN, db_EM): per-expert ``L^T R`` and row sums of L (db is [0, M] without bias)."""
    return launch.weight_grad(l_XM, r_XN, tok_A, scale_A, offs_E1, l_gather=l_gather, r_gather=r_gather,
                              with_bias=with_bias)


@experts_weight_grad.register_fake
def _(l_XM, r_XN, tok_A, scale_A, offs_E1, l_gather, r_gather, with_bias):
    E = offs_E1.shape[0] - 1
    return (l_XM.new_empty(E, l_XM.shape[1], r_XN.shape[1]),
            l_XM.new_empty(E if with_bias else 0, l_XM.shape[1]))


# ------------------------------------------------------------------ NF4 weights (frozen: forward and input gradient)
# The weight arrives as its codes (uint8, two per byte) and fp32 absmax per ``blocksize`` elements
# (``launch.NF4Weight``), plus its dequantised [E, R, C] shape (``shared``: one [R, C] matrix for
# every expert); the compute dtype is the activations'.


def _nf4(packed, absmax, shape, shared, blocksize, dtype) -> launch.NF4Weight:
    E, R, C = shape
    return launch.NF4Weight.stacked(packed, absmax, E, R, C, shared, blocksize, dtype)


@torch.library.custom_op("upcycle_kernels::experts_up_nf4", mutates_args=())
def experts_up_nf4(x_TD: Tensor, tok_A: Tensor, offs_E1: Tensor, packed: Tensor, absmax: Tensor, shape_EMD: list[int],
                   shared: bool, blocksize: int, b_in_EM: Tensor | None, gated: bool, act: int, save_z: bool,
                   equal_rows: int | None) -> tuple[Tensor, Tensor]:
    """``experts_up`` with w_in [E, M, D] in NF4."""
    w = _nf4(packed, absmax, shape_EMD, shared, blocksize, x_TD.dtype)
    return launch.up_gather(x_TD, tok_A, offs_E1, w, b_in_EM, gated=gated, act=act, save_z=save_z,
                            equal_rows=equal_rows)


@experts_up_nf4.register_fake
def _(x_TD, tok_A, offs_E1, packed, absmax, shape_EMD, shared, blocksize, b_in_EM, gated, act, save_z, equal_rows):
    A, M = tok_A.shape[0], shape_EMD[1]
    Fn = M // 2 if gated else M
    return x_TD.new_empty(A, Fn), x_TD.new_empty(A if save_z else 0, M)


@torch.library.custom_op("upcycle_kernels::experts_down_nf4", mutates_args=())
def experts_down_nf4(h_AF: Tensor, tok_A: Tensor, weight_A: Tensor, offs_E1: Tensor, packed: Tensor, absmax: Tensor,
                     shape_EDF: list[int], shared: bool, blocksize: int, b_down_ED: Tensor | None, num_tokens: int,
                     equal_rows: int | None) -> Tensor:
    """``experts_down`` with w_down [E, D, F] in NF4."""
    w = _nf4(packed, absmax, shape_EDF, shared, blocksize, h_AF.dtype)
    return launch.scatter_gemm(h_AF, tok_A, weight_A, offs_E1, w.transpose(1, 2), b_down_ED, num_tokens, equal_rows)


@experts_down_nf4.register_fake
def _(h_AF, tok_A, weight_A, offs_E1, packed, absmax, shape_EDF, shared, blocksize, b_down_ED, num_tokens,
      equal_rows):
    return h_AF.new_empty(num_tokens, shape_EDF[1], dtype=torch.float32)


@torch.library.custom_op("upcycle_kernels::experts_dh_nf4", mutates_args=())
def experts_dh_nf4(dy_TD: Tensor, tok_A: Tensor, weight_A: Tensor, offs_E1: Tensor, packed: Tensor, absmax: Tensor,
                   shape_EDF: list[int], shared: bool, blocksize: int, b_down_ED: Tensor | None, z_AM: Tensor,
                   gated: bool, act: int, equal_rows: int | None) -> tuple[Tensor, Tensor]:
    """``experts_dh`` with w_down [E, D, F] in NF4."""
    w = _nf4(packed, absmax, shape_EDF, shared, blocksize, dy_TD.dtype)
    return launch.dh_gather(dy_TD, tok_A, weight_A, offs_E1, w, b_down_ED, z_AM, gated=gated, act=act,
                            equal_rows=equal_rows)


@experts_dh_nf4.register_fake
def _(dy_TD, tok_A, weight_A, offs_E1, packed, absmax, shape_EDF, shared, blocksize, b_down_ED, z_AM, gated, act,
      equal_rows):
    return torch.empty_like(z_AM), dy_TD.new_empty(tok_A.shape[0], dtype=torch.float32)


@torch.library.custom_op("upcycle_kernels::experts_dx_nf4", mutates_args=())
def experts_dx_nf4(dz_AM: Tensor, tok_A: Tensor, offs_E1: Tensor, packed: Tensor, absmax: Tensor, shape_EMD: list[int],
                   shared: bool, blocksize: int, num_tokens: int, equal_rows: int | None) -> Tensor:
    """``experts_dx`` with w_in [E, M, D] in NF4."""
    w = _nf4(packed, absmax, shape_EMD, shared, blocksize, dz_AM.dtype)
    return launch.scatter_gemm(dz_AM, tok_A, None, offs_E1, w, None, num_tokens, equal_rows)


@experts_dx_nf4.register_fake
def _(dz_AM, tok_A, offs_E1, packed, absmax, shape_EMD, shared, blocksize, num_tokens, equal_rows):
    return dz_AM.new_empty(num_tokens, shape_EMD[2], dtype=torch.float32)
