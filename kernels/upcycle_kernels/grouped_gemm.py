"""Triton grouped-GEMM kernels for stacked MoE experts (the bottom layer; see ``launch.py``).

Assignments arrive sorted by expert: rows ``offs_E1[e]:offs_E1[e+1]`` of every ``*_A*``
tensor belong to expert e, and ``tok_A`` names each row's token. The token gather is fused
into the loads and the weighted combine into the stores, so no permuted copy of x, of the
output or of their gradients is ever materialised.

Row-tiled kernels (up, scatter, dh) run one program per (row tile P, column tile): row tile
P covers rows ``tile_row_P[P] : +BLOCK_M`` of expert ``tile_expert_P[P]`` (-1: a padding
tile, since the grid is sized for the worst case to avoid a host sync). The weight-gradient
kernel runs one program per (expert, output tile) and loops over that expert's rows.

NF4 weights (``NF4`` constexpr, QLoRA's frozen experts): the forward (up, down) and the input
gradient (dh, dx) kernels can read their weight as NF4 codes instead of a dense tensor:
``w_ptr`` is then the packed codes, ``absmax_ptr`` the fp32 absmax of every ``QBLOCK``
elements (a double-quantised absmax is decoded to fp32 by the caller first, as bitsandbytes
does: 1/64 of the weight's elements), the weight's strides are element strides of the
dequantised [E, R, C] view, and each [BLOCK_K, BLOCK_N] weight tile is decoded in registers
(``nf4.nf4_decode``) and rounded to the compute dtype right before its ``tl.dot``: the same
values a dequantise-then-GEMM reads, without a dequantised copy of the weight in memory.
Dense launches pass the weight pointer for ``absmax_ptr`` (never read).

Shape legend:
    T  tokens        D  hidden size       F  expert FFN size     E  experts
    A  assignments (token, expert) pairs, sorted by expert
    M  rows of the first projection: 2F gated (gate rows :F, up rows F:), F otherwise
    P  row tiles     N, K  output columns and reduction length of a generic GEMM
"""

from __future__ import annotations

import triton
import triton.language as tl

from upcycle_kernels.activations import act_fwd, act_fwd_bwd
from upcycle_kernels.nf4 import nf4_decode, round_to
from upcycle_kernels.tuning import fitting_configs, interpreting, row_tiled_configs, weight_grad_configs

# Autotuning: configs and launch-time pruning live in tuning.py. Each kernel's ``key`` holds the
# shapes and constexprs that change which config wins or fits (PRECISION: tf32 runs on tensor
# cores with one more pipeline stage in flight than ieee fp32, so it takes more shared memory).


if interpreting():
    def _loop_bound(n):
        """A loop bound as a Python int. Triton 3.6's interpreter (and older ones) turns a runtime
        scalar, a [1]-shaped array there, into range()'s bound with int(array), which NumPy >= 2.4
        refuses ("only 0-dimensional arrays can be converted to Python scalars")."""
        return n.handle.data.item() if isinstance(n, tl.tensor) else n
else:
    @triton.jit
    def _loop_bound(n):
        """The identity: inlined, so the compiled loop is the same ``scf.for`` over ``n``."""
        return n


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    if WIDEN:
        # The CPU interpreter multiplies bfloat16 tiles as raw integers; widen there only.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_w(w_ptr, offs, mask, absmax_ptr, DTYPE: tl.constexpr, NF4: tl.constexpr, QBLOCK: tl.constexpr):
    """The weight tile at element offsets ``offs`` (int64): loaded, or decoded from NF4 codes (``w_ptr``) and
    fp32 absmax (one per ``QBLOCK`` elements) and rounded to ``DTYPE``."""
    if NF4:
        w = round_to(nf4_decode(w_ptr, absmax_ptr, absmax_ptr, absmax_ptr, absmax_ptr, offs, mask, QBLOCK, 1, False),
                     DTYPE)
    else:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    return w


@triton.jit
def _row_tile(tile_expert_ptr, tile_row_ptr, offs_ptr, BLOCK_M: tl.constexpr):
    """(expert, rows [BLOCK_M] int64, row mask) of this program's row tile; expert -1 = padding."""
    pid_p = tl.program_id(0)
    e = tl.load(tile_expert_ptr + pid_p)
    row0 = tl.load(tile_row_ptr + pid_p)
    row_end = tl.load(offs_ptr + tl.maximum(e, 0) + 1)
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
    return e, rows, rows < row_end


# ------------------------------------------------------------------ forward: up projection


@triton.autotune(configs=row_tiled_configs(), key=["F", "D", "BLOCK_M", "GATED", "PRECISION", "NF4"],
                 prune_configs_by=fitting_configs("up"))
@triton.jit
def up_gather_kernel(
    x_ptr, tok_ptr, w_ptr, b_ptr, h_ptr, z_ptr,
    tile_expert_ptr, tile_row_ptr, offs_ptr,
    absmax_ptr,
    F, D,
    stride_xt, stride_xd, stride_we, stride_wm, stride_wd, stride_be, stride_bm,
    stride_ha, stride_hf, stride_za, stride_zm,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    NF4: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h_AF = act(x[tok] @ w_gate[e]^T + b) * (x[tok] @ w_up[e]^T + b); z_AM = the pre-activations."""
    e, rows, row_ok = _row_tile(tile_expert_ptr, tile_row_ptr, offs_ptr, BLOCK_M)
    if e < 0:
        return
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd
    # w[e] is [M, D]; read it as [BLOCK_K, BLOCK_N] tiles of its transpose (element offsets: NF4 decodes them).
    wg_offs = e.to(tl.int64) * stride_we + cols[None, :] * stride_wm + ks[:, None] * stride_wd
    wu_offs = wg_offs + F * stride_wm
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, _loop_bound(tl.cdiv(D, BLOCK_K))):
        k_ok = ks < D - k * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = _load_w(w_ptr, wg_offs, w_mask, absmax_ptr, x_ptr.dtype.element_ty, NF4, QBLOCK)
        acc_g = _mma(x, wg, acc_g, PRECISION, WIDEN)
        if GATED:  # gate and up share the x tile: one gather feeds both GEMMs
            wu = _load_w(w_ptr, wu_offs, w_mask, absmax_ptr, x_ptr.dtype.element_ty, NF4, QBLOCK)
            acc_u = _mma(x, wu, acc_u, PRECISION, WIDEN)
            wu_offs += BLOCK_K * stride_wd
        x_ptrs += BLOCK_K * stride_xd
        wg_offs += BLOCK_K * stride_wd
    if HAS_BIAS:
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + cols * stride_bm
        acc_g += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptrs + F * stride_bm, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = act_fwd(acc_g, ACT)
    if GATED:
        h = h * acc_u
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(h_ptr + rows[:, None] * stride_ha + cols[None, :] * stride_hf, h.to(h_ptr.dtype.element_ty), mask=mask)
    if SAVE_Z:
        z_ptrs = z_ptr + rows[:, None] * stride_za + cols[None, :] * stride_zm
        tl.store(z_ptrs, acc_g.to(z_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(z_ptrs + F * stride_zm, acc_u.to(z_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ grouped GEMM + weighted scatter-add


@triton.autotune(configs=row_tiled_configs(), key=["N", "K", "BLOCK_M", "PRECISION", "NF4"], reset_to_zero=["out_ptr"],
                 prune_configs_by=fitting_configs("scatter"))
@triton.jit
def scatter_gemm_kernel(
    a_ptr, tok_ptr, scale_ptr, w_ptr, b_ptr, out_ptr,
    tile_expert_ptr, tile_row_ptr, offs_ptr,
    absmax_ptr,
    N, K,
    stride_aa, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_ot, stride_on,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    NF4: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[tok[a], :] += scale[a] * (a_AK[a] @ w[e] + b[e]) with w[e] read as [K, N] through strides.

    Forward down projection (a = h_AF, w = w_down^T, scale = combine weight) and backward dx
    (a = dz_AM, w = w_in, no scale). Top-K sends a token to several experts, so rows of
    ``out`` (float32) collide across programs: atomic adds.
    """
    e, rows, row_ok = _row_tile(tile_expert_ptr, tile_row_ptr, offs_ptr, BLOCK_M)
    if e < 0:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_aa + ks[None, :] * stride_ak
    w_offs = e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, _loop_bound(tl.cdiv(K, BLOCK_K))):
        k_ok = ks < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _load_w(w_ptr, w_offs, k_ok[:, None] & col_ok[None, :], absmax_ptr, a_ptr.dtype.element_ty, NF4, QBLOCK)
        acc = _mma(a, w, acc, PRECISION, WIDEN)
        a_ptrs += BLOCK_K * stride_ak
        w_offs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b = tl.load(b_ptr + e.to(tl.int64) * stride_be + cols * stride_bn, mask=col_ok, other=0.0)
        acc += b.to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    out_ptrs = out_ptr + tok[:, None] * stride_ot + cols[None, :] * stride_on
    tl.atomic_add(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")


# ------------------------------------------------------------------ backward: through w_down and the activation


@triton.autotune(configs=row_tiled_configs(), key=["F", "D", "BLOCK_M", "GATED", "PRECISION", "NF4"],
                 reset_to_zero=["dscale_ptr"],
                 prune_configs_by=fitting_configs("dh"))
@triton.jit
def dh_gather_kernel(
    dy_ptr, tok_ptr, scale_ptr, w_ptr, b_ptr, z_ptr, dz_ptr, dscale_ptr,
    tile_expert_ptr, tile_row_ptr, offs_ptr,
    absmax_ptr,
    F, D,
    stride_dyt, stride_dyd, stride_we, stride_wd, stride_wf, stride_be, stride_bd,
    stride_za, stride_zm, stride_dza, stride_dzm,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    NF4: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g = dy[tok] @ w_down[e] (unweighted); dscale[a] += <g, h> (+ <dy[tok], b_down[e]>);
    dz = activation backward of scale[a] * g, with h recomputed from the saved z.

    <g_a, h_a> = <dy[tok_a], h_a @ w_down[e]^T>: the combine-weight gradient falls out of the
    dh GEMM's epilogue without recomputing the expert output.
    """
    e, rows, row_ok = _row_tile(tile_expert_ptr, tile_row_ptr, offs_ptr, BLOCK_M)
    if e < 0:
        return
    pid_n = tl.program_id(1)
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    dy_ptrs = dy_ptr + tok[:, None] * stride_dyt + ks[None, :] * stride_dyd
    w_offs = e.to(tl.int64) * stride_we + ks[:, None] * stride_wd + cols[None, :] * stride_wf
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks * stride_bd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, _loop_bound(tl.cdiv(D, BLOCK_K))):
        k_ok = ks < D - k * BLOCK_K
        dy = tl.load(dy_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _load_w(w_ptr, w_offs, k_ok[:, None] & col_ok[None, :], absmax_ptr, dy_ptr.dtype.element_ty, NF4, QBLOCK)
        acc = _mma(dy, w, acc, PRECISION, WIDEN)
        if HAS_BIAS:
            b = tl.load(b_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            bias_dot += tl.sum(dy.to(tl.float32) * b[None, :], axis=1)
            b_ptrs += BLOCK_K * stride_bd
        dy_ptrs += BLOCK_K * stride_dyd
        w_offs += BLOCK_K * stride_wd
    mask = row_ok[:, None] & col_ok[None, :]
    z_ptrs = z_ptr + rows[:, None] * stride_za + cols[None, :] * stride_zm
    gate = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    a, da = act_fwd_bwd(gate, ACT)
    if GATED:
        up = tl.load(z_ptrs + F * stride_zm, mask=mask, other=0.0).to(tl.float32)
        h = a * up
    else:
        h = a
    # The forward fed the down GEMM h rounded to the storage dtype; use that same h.
    h = h.to(dz_ptr.dtype.element_ty).to(tl.float32)
    dscale = tl.sum(acc * h, axis=1)
    if HAS_BIAS:
        dscale += tl.where(pid_n == 0, bias_dot, 0.0)  # the bias term once per row, not per column tile
    tl.atomic_add(dscale_ptr + rows, dscale, mask=row_ok, sem="relaxed")
    dh = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dz_ptrs = dz_ptr + rows[:, None] * stride_dza + cols[None, :] * stride_dzm
    if GATED:
        tl.store(dz_ptrs, (dh * up * da).to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptrs + F * stride_dzm, (dh * a).to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dz_ptrs, (dh * da).to(dz_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ backward: weight gradients


@triton.autotune(configs=weight_grad_configs(), key=["MW", "NW", "PRECISION"],
                 prune_configs_by=fitting_configs("weight_grad"))
@triton.jit
def weight_grad_kernel(
    l_ptr, r_ptr, tok_ptr, scale_ptr, offs_ptr, dw_ptr, db_ptr,
    MW, NW,
    stride_lr, stride_lm, stride_rr, stride_rn, stride_dwe, stride_dwm, stride_dwn, stride_dbe, stride_dbm,
    L_GATHER: tl.constexpr, L_SCALE: tl.constexpr, R_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[e] = L_e^T R_e over expert e's rows, db[e] = column sums of L_e.

    A row of L (or R) is read through ``tok`` when gathered, and L's rows are multiplied by
    ``scale`` when scaled: dW_in = dz^T x[tok]; dW_down = (scale * dy[tok])^T h. An expert
    with no rows writes zeros (its loop runs zero times), so no buffer needs zero-filling.
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_n = tl.cdiv(NW, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = ms < MW, ns < NW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(_loop_bound(start), _loop_bound(end), BLOCK_K):
        rows = tl.arange(0, BLOCK_K).to(tl.int64) + r0  # int64: rows * stride may pass 2**31
        r_okk = rows < end
        if L_GATHER or R_GATHER:
            tok = tl.load(tok_ptr + rows, mask=r_okk, other=0).to(tl.int64)
        l_rows = tok if L_GATHER else rows
        r_rows = tok if R_GATHER else rows
        # L^T tile [BLOCK_M, BLOCK_K], loaded transposed through its strides.
        lt = tl.load(l_ptr + ms[:, None] * stride_lm + l_rows[None, :] * stride_lr,
                     mask=m_ok[:, None] & r_okk[None, :], other=0.0)
        if L_SCALE:
            lt = lt.to(tl.float32) * tl.load(scale_ptr + rows, mask=r_okk, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            db += tl.sum(lt.to(tl.float32), axis=1)
        rt = tl.load(r_ptr + r_rows[:, None] * stride_rr + ns[None, :] * stride_rn,
                     mask=r_okk[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(lt.to(rt.dtype), rt, acc, PRECISION, WIDEN)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_dwe + ms[:, None] * stride_dwm + ns[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        if pid_n == 0:  # every column tile summed the same L rows; one of them writes db
            db_ptrs = db_ptr + e.to(tl.int64) * stride_dbe + ms * stride_dbm
            tl.store(db_ptrs, db.to(db_ptr.dtype.element_ty), mask=m_ok)
