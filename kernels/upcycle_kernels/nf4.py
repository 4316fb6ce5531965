"""NF4 dequantisation kernel (kernel -> launcher); the torch reference is ``upcycle.adapters.nf4``.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_nf4.py -k triton

One program writes ``BLOCK`` consecutive output elements: it reads their packed byte (the
even element is the high nibble), looks the 4-bit code up in the 16-entry NF4 table and
multiplies by the block's absmax, which with double quantisation is itself decoded from its
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
def nf4_dequant_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code4_ptr, code8_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: a stacked expert weight can exceed 2**31 elements
    offs_N = pid * BLOCK + tl.arange(0, BLOCK)
    mask_N = offs_N < n
    byte_N = tl.load(packed_ptr + offs_N // 2, mask=mask_N, other=0).to(tl.int32)
    nib_N = tl.where(offs_N % 2 == 0, byte_N >> 4, byte_N & 15)
    val_N = tl.load(code4_ptr + nib_N, mask=mask_N, other=0.0)
    blk_N = offs_N // BLOCKSIZE
    if DOUBLE_QUANT:
        q_N = tl.load(absmax_ptr + blk_N, mask=mask_N, other=0).to(tl.int32)
        scale_N = tl.load(code8_ptr + q_N, mask=mask_N, other=0.0) * tl.load(
            absmax2_ptr + blk_N // DQ_BLOCKSIZE, mask=mask_N, other=0.0)
        scale_N = scale_N + tl.load(offset_ptr)
    else:
        scale_N = tl.load(absmax_ptr + blk_N, mask=mask_N, other=0.0)
    out_N = val_N * scale_N
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand (torch's rule): the interpreter's fp32 -> bf16 cast
        # truncates, and even its "rtne" mode rounds half up; the bits then agree everywhere.
        bits_N = out_N.to(tl.uint32, bitcast=True)
        bits_N = bits_N + 0x7FFF + ((bits_N >> 16) & 1)
        out_N = (bits_N >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out_N = out_N.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_N, out_N, mask=mask_N)


def dequantize_nf4_triton(packed: Tensor, absmax: Tensor, absmax2: Tensor | None, offset: Tensor | None,
                          shape, blocksize: int, dq_blocksize: int, code4: Tensor, code8: Tensor | None,
                          dtype: torch.dtype) -> Tensor:
    """Launcher: packed uint8 [ceil(N/2)], absmax fp32 [B] (or uint8 [B] + absmax2 fp32 [C] +
    offset fp32 [] + code8 fp32 [256]), code4 fp32 [16] -> Tensor ``shape`` in ``dtype``."""
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
    for t in (packed, absmax, absmax2, offset, code4, code8):
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise RuntimeError(f"the NF4 dequant kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    # Unused pointers (single quantisation) still need a tensor: pass absmax, never read.
    absmax2 = absmax2 if double else absmax
    offset = offset if double else absmax
    code8 = code8 if double else code4
    grid = (triton.cdiv(n, DEQUANT_BLOCK),)
    nf4_dequant_kernel[grid](packed.contiguous(), absmax.contiguous(), absmax2.contiguous(), offset, code4, code8,
                             out, n, BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double,
                             BLOCK=DEQUANT_BLOCK, enable_fp_fusion=False)
    return out
