"""Launchers: check shapes, allocate outputs, build the tile schedule, pick the grid.

One function per kernel in ``grouped_gemm.py``; plain torch in, torch out, no autograd.
Assignments are already sorted by expert (``offs_E1`` int32 [E+1] holds the boundaries).
Nothing here syncs with the host: the row-tile grid is sized for the worst case (empty
experts waste no tiles, at most E padding programs exit at once).

Shape legend: see ``grouped_gemm.py`` (T, D, F, M, E, A, P). A weight is a dense tensor or an
``NF4Weight`` (codes and fp32 absmax; the up, scatter and dh kernels decode its tiles in registers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from upcycle_kernels import grouped_gemm as gg
from upcycle_kernels.tuning import interpreting


@dataclass(frozen=True)
class NF4Weight:
    """An NF4 weight as the grouped GEMMs read it (frozen: forward and input-gradient kernels only).

    ``packed``: uint8 codes, two per byte, the high nibble first (``upcycle.adapters.nf4``'s
    layout); ``absmax``: fp32, one per ``blocksize`` elements (double quantisation decoded first);
    ``shape`` and ``strides`` describe the dequantised weight [E, R, C] in elements (stride 0 on
    E: one matrix for every expert); ``dtype`` is the compute dtype the tiles are rounded to.
    """

    packed: Tensor
    absmax: Tensor
    shape: tuple
    strides: tuple
    blocksize: int
    dtype: torch.dtype

    @classmethod
    def stacked(cls, packed: Tensor, absmax: Tensor, num_experts: int, rows: int, cols: int, shared: bool,
                blocksize: int, dtype: torch.dtype) -> NF4Weight:
        """An [E, rows, cols] weight stored row-major ([rows, cols] once, if ``shared``)."""
        n = rows * cols * (1 if shared else num_experts)
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2 or absmax.dtype != torch.float32 \
                or absmax.numel() != -(-n // blocksize):
            raise ValueError(f"NF4Weight: {n} elements need uint8 codes [{(n + 1) // 2}] and fp32 absmax "
                             f"[{-(-n // blocksize)}], got {packed.dtype} {tuple(packed.shape)} and {absmax.dtype} "
                             f"{tuple(absmax.shape)}")
        return cls(packed, absmax, (num_experts, rows, cols), (0 if shared else rows * cols, cols, 1), blocksize,
                   dtype)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def stride(self, dim: int | None = None):
        return self.strides if dim is None else self.strides[dim]

    def transpose(self, a: int, b: int) -> NF4Weight:
        shape, strides = list(self.shape), list(self.strides)
        shape[a], shape[b], strides[a], strides[b] = shape[b], shape[a], strides[b], strides[a]
        return replace(self, shape=tuple(shape), strides=tuple(strides))


def _weight(w) -> tuple:
    """(the weight pointer, the absmax pointer, their constexprs, launch options) of a dense or NF4 weight."""
    if not isinstance(w, NF4Weight):
        return w, w, dict(NF4=False, QBLOCK=1), {}
    # No fp fusion: code * absmax rounds as torch's dequantisation does.
    return w.packed, w.absmax, dict(NF4=True, QBLOCK=w.blocksize), dict(enable_fp_fusion=False)


ROW_TILE_HEIGHTS = (64, 128)
"""The BLOCK_M values ``block_m`` picks on a GPU (the AOT sweep compiles each)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_m(num_rows: int, num_experts: int) -> int:
    """Rows per tile of the row-tiled kernels: a fixed choice (the schedule depends on it)."""
    if interpreting():
        return 16
    short, tall = ROW_TILE_HEIGHTS
    # Tall tiles amortise weight loads; short ones waste less on small experts' ragged ends.
    return tall if num_rows >= 256 * max(num_experts, 1) else short


def tile_schedule(offs_E1: Tensor, block: int, num_rows: int, equal_rows: int | None = None):
    """(tile_expert_P, tile_row_P) int32: the expert and first row of every row tile.

    ``equal_rows``: every expert has exactly that many rows (expert choice), so the schedule
    is plain arithmetic and the grid exact.
    """
    E = offs_E1.numel() - 1
    dev = offs_E1.device
    if equal_rows is not None:
        per = _cdiv(equal_rows, block)
        p = torch.arange(E * per, device=dev, dtype=torch.int32)
        e = p // per
        return e, e * equal_rows + (p % per) * block
    counts_E = offs_E1[1:] - offs_E1[:-1]
    tiles_E = (counts_E + block - 1) // block
    tile_end_E = tiles_E.cumsum(0).to(torch.int32)
    # sum_e ceil(c_e / block) < A / block + E: a bound known without reading the counts.
    p = torch.arange(_cdiv(num_rows, block) + E, device=dev, dtype=torch.int32)
    e = torch.searchsorted(tile_end_E, p, right=True).to(torch.int32)
    valid = e < E
    e_safe = e.clamp(max=E - 1).long()
    row = offs_E1[e_safe] + (p - (tile_end_E[e_safe] - tiles_E[e_safe])) * block
    return torch.where(valid, e, -1).to(torch.int32), torch.where(valid, row, 0).to(torch.int32)


def precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """Every ``tl.dot`` input precision the launchers may pass for operands of ``dtype``."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, so "fp32" means what it means in torch.
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _common(dtype: torch.dtype) -> dict:
    return dict(PRECISION=_precision(dtype), WIDEN=interpreting())


def check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise RuntimeError(f"the triton experts kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                               f"to run them slowly on the CPU), got a tensor on {t.device}")


def _check_sorted(tok_A: Tensor, offs_E1: Tensor, E: int) -> None:
    if tok_A.dim() != 1 or offs_E1.shape != (E + 1,) or offs_E1.dtype != torch.int32:
        raise ValueError(f"need tok_A [A] and int32 offs_E1 [{E + 1}], got {tuple(tok_A.shape)} "
                         f"and {offs_E1.dtype} {tuple(offs_E1.shape)}")


def up_gather(x_TD: Tensor, tok_A: Tensor, offs_E1: Tensor, w_in_EMD: Tensor | NF4Weight, b_in_EM: Tensor | None, *,
              gated: bool, act: int, save_z: bool, equal_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """(h_AF, z_AM): activated hidden rows and (if ``save_z``, else [0, M]) the pre-activations."""
    E, M, D = w_in_EMD.shape
    Fn = M // 2 if gated else M
    _check_sorted(tok_A, offs_E1, E)
    if x_TD.shape[-1] != D or (gated and M % 2) or x_TD.dtype != w_in_EMD.dtype:
        raise ValueError(f"up_gather: x {x_TD.dtype} {tuple(x_TD.shape)} vs w_in {w_in_EMD.dtype} "
                         f"{tuple(w_in_EMD.shape)} (gated={gated})")
    A = tok_A.numel()
    h_AF = torch.empty(A, Fn, dtype=w_in_EMD.dtype, device=x_TD.device)
    z_AM = torch.empty(A if save_z else 0, M, dtype=w_in_EMD.dtype, device=x_TD.device)
    if A == 0 or Fn == 0:
        return h_AF, z_AM
    bm = block_m(A, E)
    tile_e, tile_r = tile_schedule(offs_E1, bm, A, equal_rows)
    w, absmax, nf4, opts = _weight(w_in_EMD)
    dummy = w_in_EMD if not nf4["NF4"] else x_TD
    b = b_in_EM if b_in_EM is not None else dummy  # never read without HAS_BIAS
    z_strides = z_AM.stride() if save_z else (0, 0)
    grid = lambda meta: (tile_e.numel(), _cdiv(Fn, meta["BLOCK_N"]))  # noqa: E731
    gg.up_gather_kernel[grid](
        x_TD, tok_A, w, b, h_AF, z_AM, tile_e, tile_r, offs_E1, absmax,
        Fn, D,
        *x_TD.stride(), *w_in_EMD.stride(), b.stride(0), b.stride(1), *h_AF.stride(), *z_strides,
        GATED=gated, ACT=act, HAS_BIAS=b_in_EM is not None, SAVE_Z=save_z, BLOCK_M=bm, **_common(x_TD.dtype),
        **nf4, **opts,
    )
    return h_AF, z_AM


def scatter_gemm(a_AK: Tensor, tok_A: Tensor, scale_A: Tensor | None, offs_E1: Tensor, w_EKN: Tensor | NF4Weight,
                 b_EN: Tensor | None, num_tokens: int, equal_rows: int | None = None) -> Tensor:
    """out_TN float32: ``out[tok[a]] += scale[a] * (a_AK[a] @ w_EKN[e] + b_EN[e])``.

    ``w_EKN`` may be any strided view (a transpose of the stored weight costs nothing).
    """
    E, K, N = w_EKN.shape
    _check_sorted(tok_A, offs_E1, E)
    if a_AK.shape != (tok_A.numel(), K) or a_AK.dtype != w_EKN.dtype:
        raise ValueError(f"scatter_gemm: a {a_AK.dtype} {tuple(a_AK.shape)} vs w {w_EKN.dtype} {tuple(w_EKN.shape)}")
    out_TN = torch.zeros(num_tokens, N, dtype=torch.float32, device=a_AK.device)
    A = a_AK.shape[0]
    if A == 0 or N == 0:
        return out_TN
    bm = block_m(A, E)
    tile_e, tile_r = tile_schedule(offs_E1, bm, A, equal_rows)
    w, absmax, nf4, opts = _weight(w_EKN)
    b = b_EN if b_EN is not None else (w_EKN[:, 0] if not nf4["NF4"] else a_AK)
    s = scale_A if scale_A is not None else tok_A
    grid = lambda meta: (tile_e.numel(), _cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    gg.scatter_gemm_kernel[grid](
        a_AK, tok_A, s, w, b, out_TN, tile_e, tile_r, offs_E1, absmax,
        N, K,
        *a_AK.stride(), *w_EKN.stride(), *b.stride(), *out_TN.stride(),
        HAS_SCALE=scale_A is not None, HAS_BIAS=b_EN is not None, BLOCK_M=bm, **_common(a_AK.dtype), **nf4, **opts,
    )
    return out_TN


def dh_gather(dy_TD: Tensor, tok_A: Tensor, scale_A: Tensor, offs_E1: Tensor, w_down_EDF: Tensor | NF4Weight,
              b_down_ED: Tensor | None, z_AM: Tensor, *, gated: bool, act: int,
              equal_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """(dz_AM, dscale_A float32): gradients of the pre-activations and of the combine weights."""
    E, D, Fn = w_down_EDF.shape
    _check_sorted(tok_A, offs_E1, E)
    A = tok_A.numel()
    M = 2 * Fn if gated else Fn
    if z_AM.shape != (A, M) or dy_TD.shape[-1] != D or dy_TD.dtype != w_down_EDF.dtype:
        raise ValueError(f"dh_gather: dy {dy_TD.dtype} {tuple(dy_TD.shape)}, z {tuple(z_AM.shape)}, "
                         f"w_down {w_down_EDF.dtype} {tuple(w_down_EDF.shape)}")
    dz_AM = torch.empty(A, M, dtype=w_down_EDF.dtype, device=dy_TD.device)
    dscale_A = torch.zeros(A, dtype=torch.float32, device=dy_TD.device)
    if A == 0 or Fn == 0:
        return dz_AM.zero_(), dscale_A
    bm = block_m(A, E)
    tile_e, tile_r = tile_schedule(offs_E1, bm, A, equal_rows)
    w, absmax, nf4, opts = _weight(w_down_EDF)
    b = b_down_ED if b_down_ED is not None else (w_down_EDF[:, :, 0] if not nf4["NF4"] else dy_TD)
    grid = lambda meta: (tile_e.numel(), _cdiv(Fn, meta["BLOCK_N"]))  # noqa: E731
    gg.dh_gather_kernel[grid](
        dy_TD, tok_A, scale_A, w, b, z_AM, dz_AM, dscale_A, tile_e, tile_r, offs_E1, absmax,
        Fn, D,
        *dy_TD.stride(), *w_down_EDF.stride(), *b.stride(), *z_AM.stride(), *dz_AM.stride(),
        GATED=gated, ACT=act, HAS_BIAS=b_down_ED is not None, BLOCK_M=bm, **_common(dy_TD.dtype), **nf4, **opts,
    )
    return dz_AM, dscale_A


def weight_grad(l_XM: Tensor, r_XN: Tensor, tok_A: Tensor, scale_A: Tensor | None, offs_E1: Tensor, *,
                l_gather: bool, r_gather: bool, with_bias: bool) -> tuple[Tensor, Tensor]:
    """(dW_EMN, db_EM): ``dW[e] = L_e^T R_e`` and ``db[e] = sum of L_e's rows`` (db is [0, M] unless
    ``with_bias``); row a of L is ``scale[a] * l_XM[tok[a] if l_gather else a]``, likewise R."""
    E = offs_E1.numel() - 1
    _check_sorted(tok_A, offs_E1, E)
    MW, NW = l_XM.shape[1], r_XN.shape[1]
    if l_XM.dtype != r_XN.dtype:
        raise ValueError(f"weight_grad: L is {l_XM.dtype} but R is {r_XN.dtype}")
    dw = torch.empty(E, MW, NW, dtype=l_XM.dtype, device=l_XM.device)
    db = torch.empty(E if with_bias else 0, MW, dtype=l_XM.dtype, device=l_XM.device)
    if MW == 0 or NW == 0 or E == 0:
        return dw, db
    grid = lambda meta: (_cdiv(MW, meta["BLOCK_M"]) * _cdiv(NW, meta["BLOCK_N"]), E)  # noqa: E731
    db_strides = db.stride() if with_bias else (0, 0)
    gg.weight_grad_kernel[grid](
        l_XM, r_XN, tok_A, scale_A if scale_A is not None else tok_A, offs_E1, dw, db,
        MW, NW,
        *l_XM.stride(), *r_XN.stride(), *dw.stride(), *db_strides,
        L_GATHER=l_gather, L_SCALE=scale_A is not None, R_GATHER=r_gather, HAS_BIAS=with_bias,
        **_common(l_XM.dtype),
    )
    return dw, db
