"""NF4 dequantisation kernel (kernel -> launcher), and the tile decoder the grouped GEMMs share with it.

The torch reference is ``upcycle.adapters.nf4``.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_nf4.py -k triton

One program writes ``BLOCK`` consecutive output elements: it reads their packed byte (the
even element is the high nibble), turns the 4-bit code into its NF4 value (a select tree on
the 16 constants) and multiplies by the block's absmax, which with double quantisation is itself decoded from its
8-bit code: ``code8[q] * absmax2 + offset``. All in fp32, then one rounding to the output
dtype; fp fusion is off so the multiply-add stays two roundings, as in torch, and the result
equals the torch path bit for bit.

Shape legend:
    N  elements      B  absmax blocks (``BLOCKSIZE`` elements)      C  blocks of ``DQ_BLOCKSIZE`` absmax
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from upcycle_kernels.tuning import interpreting

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEQUANT_BLOCK = 1024
"""Output elements per program."""


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` to nearest even, as torch rounds: bf16 by hand (the interpreter's
    fp32 -> bf16 cast truncates, and even its "rtne" mode rounds half up), the others by a cast."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DTYPE)
    return out


NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""The 16 NF4 values (QLoRA's; ``upcycle.adapters.nf4.NF4_CODE``, checked equal by the tests), as the
literals of ``_nf4_value``."""


@triton.jit
def _nf4_value(nib):
    """The NF4 value of 4-bit codes (int32), fp32: a select tree over the code's bits on ``NF4_VALUES``'
    literals, in registers (a gather from a table in memory would be staged through shared memory
    element by element in a pipelined GEMM loop)."""
    b0, b1, b2, b3 = (nib & 1) != 0, (nib & 2) != 0, (nib & 4) != 0, (nib & 8) != 0
    v0 = tl.where(b0, -0.6961928009986877, -1.0)
    v1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    v2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    v3 = tl.where(b0, 0.0, -0.09105003625154495)
    v4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    v5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    v6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    v7 = tl.where(b0, 1.0, 0.7229568362236023)
    w0, w1 = tl.where(b1, v1, v0), tl.where(b1, v3, v2)
    w2, w3 = tl.where(b1, v5, v4), tl.where(b1, v7, v6)
    return tl.where(b3, tl.where(b2, w3, w2), tl.where(b2, w1, w0)).to(tl.float32)


@triton.jit
def nf4_decode(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code8_ptr, offs, mask,
               BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 values of the NF4 elements at flat offsets ``offs`` (any shape; int64): ``NF4[nibble] *
    absmax[offs // BLOCKSIZE]``, the absmax itself ``code8[q] * absmax2 + offset`` when double-quantised
    (fp32 absmax otherwise). Masked elements read 0. Compiled without fp fusion, the products and the
    sum round as torch's do."""
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    val = _nf4_value(nib)
    blk = offs // BLOCKSIZE
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code8_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // DQ_BLOCKSIZE, mask=mask,
                                                                       other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return val * scale


@triton.jit
def nf4_dequant_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code8_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: a stacked expert weight can exceed 2**31 elements
    offs_N = pid * BLOCK + tl.arange(0, BLOCK)
    mask_N = offs_N < n
    out_N = nf4_decode(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code8_ptr, offs_N, mask_N,
                       BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT)
    tl.store(out_ptr + offs_N, round_to(out_N, out_ptr.dtype.element_ty), mask=mask_N)


def dequantize_nf4_triton(packed: Tensor, absmax: Tensor, absmax2: Tensor | None, offset: Tensor | None,
                          shape, blocksize: int, dq_blocksize: int, code8: Tensor | None,
                          dtype: torch.dtype) -> Tensor:
    """Launcher: packed uint8 [ceil(N/2)], absmax fp32 [B] (or uint8 [B] + absmax2 fp32 [C] +
    offset fp32 [] + code8 fp32 [256]) -> Tensor ``shape`` in ``dtype``. The 16 NF4 values are the
    kernel's constants (``NF4_VALUES``, ``upcycle.adapters.nf4.NF4_CODE``'s)."""
    n = math.prod(shape)
    double = absmax2 is not None
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"the NF4 dequant kernel writes float32, bfloat16 or float16, not {dtype}")
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed codes must be uint8 [{(n + 1) // 2}], got {packed.dtype} {tuple(packed.shape)}")
    nb = -(-n // blocksize)
    if absmax.numel() != nb or absmax.dtype != (torch.uint8 if double else torch.float32):
        raise ValueError(f"absmax must be {'uint8' if double else 'float32'} [{nb}], got {absmax.dtype} "
                         f"{tuple(absmax.shape)}")
    if double and (offset is None or code8 is None or absmax2.numel() != -(-nb // dq_blocksize)):
        raise ValueError("double quantisation needs absmax2 [ceil(B / dq_blocksize)], offset and code8")
    for t in (packed, absmax, absmax2, offset, code8):
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise RuntimeError(f"the NF4 dequant kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    # Unused pointers (single quantisation) still need a tensor: pass absmax, never read.
    absmax2 = absmax2 if double else absmax
    offset = offset if double else absmax
    code8 = code8 if double else absmax
    grid = (triton.cdiv(n, DEQUANT_BLOCK),)
    nf4_dequant_kernel[grid](packed.contiguous(), absmax.contiguous(), absmax2.contiguous(), offset, code8,
                             out, n, BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double,
                             BLOCK=DEQUANT_BLOCK, enable_fp_fusion=False)
    return out
