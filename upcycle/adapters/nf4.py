"""NF4 block-wise 4-bit quantisation with double quantisation, as QLoRA / bitsandbytes define it.

    q = quantize_nf4(w, blocksize=64, double_quant=True)   # ~4.127 bits per parameter
    w_hat = dequantize_nf4(q)                             # same shape, w's dtype

Format (bit-compatible with ``bitsandbytes.functional.quantize_4bit(w, blocksize=64,
quant_type="nf4", compress_statistics=True)``):

* the flattened weight is cut into blocks of ``blocksize`` (last block may be short); each
  block keeps its fp32 ``absmax``; every value ``x * (1 / absmax)`` (full blocks; the short
  last block divides, as bitsandbytes does) goes to the nearest of the 16 NF4 code values,
  the midpoints between consecutive codes computed in fp32 and a value exactly on one taking
  the lower code (bitsandbytes' ``bucketize`` rule and its CUDA decision tree ``x > t``);
* two codes per byte, the first element in the high nibble;
* double quantisation: ``offset = absmax.mean()``; ``absmax - offset`` quantised to 8 bits
  in blocks of 256 with bitsandbytes' signed dynamic map (same nearest rule), keeping an fp32
  absmax per 256 block. Dequantised absmax = ``code8[q] * absmax2 + offset`` (two fp32 roundings).

Bits per parameter: ``4 + 32/64 = 4.5`` single, ``4 + 8/64 + 32/(64*256) ~ 4.127`` double.

Shape legend:
    N  elements of the weight      B  blocks of ``blocksize``      C  blocks of 256 absmax
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from upcycle.errors import UpcycleError

__all__ = ["DQ_BLOCKSIZE", "NF4_CODE", "NF4Tensor", "dequantize_nf4", "dequantize_nf4_range", "dynamic_code",
           "dynamic_map", "nf4_code", "quantize_nf4"]

# The QLoRA paper's NF4 values (bitsandbytes' table, fp32), sorted: code i is the 4-bit index.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
DQ_BLOCKSIZE = 256
_FP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# ``meta`` tensor: what a state dict needs besides the data (dtype as an index here).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


_CODES: dict = {}


def _cached(name: str, make, device) -> Tensor:
    # One copy per device: a per-call host-to-device copy of a code table would cost every forward.
    key = (name, str(torch.device(device) if device is not None else "cpu"))
    if key not in _CODES:
        _CODES[key] = make().to(key[1])
    return _CODES[key]


def nf4_code(device=None) -> Tensor:
    """The 16 NF4 values, fp32 [16] (cached per device: do not modify)."""
    return _cached("nf4", lambda: torch.tensor(NF4_CODE, dtype=torch.float32), device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """bitsandbytes' ``create_dynamic_map``, replicated operation for operation: fp32 [256], sorted.

    Dynamic exponent + fraction: for exponent i the positive values are the midpoints of
    ``linspace(0.1, 1)`` scaled by ``10**(i - 6)``; plus 0 and 1. Its smallest value is
    -0.99297 (not -1): quantised values near -1 take that code.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_code(device=None) -> Tensor:
    """The signed 8-bit dynamic map used for the absmax constants, fp32 [256] (cached per device)."""
    return _cached("dynamic", dynamic_map, device)


def quantize_blockwise(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Nearest-``code`` index of every element, per block of ``blocksize`` scaled by its absmax.

    x any shape (flattened) -> (idx_N int64, absmax_B fp32). ``code`` sorted fp32. The rule of
    bitsandbytes' torch backend (its CUDA kernels agree except for ties at exact midpoints):
    full blocks multiply by ``1 / max(absmax, 1e-38)``, the short last block divides; clamp to
    [-1, 1]; ``bucketize`` on fp32 midpoints (a tie goes to the lower code).
    """
    x_N = x.reshape(-1).float()
    n = x_N.numel()
    rem = n % blocksize
    full = n - rem
    x_BK = x_N[:full].reshape(-1, blocksize)
    absmax_B = x_BK.abs().amax(dim=-1) if full else x_N.new_zeros(0)
    scaled_N = torch.clamp(x_BK * (1.0 / absmax_B.clamp(min=1e-38).unsqueeze(-1)), -1, 1).reshape(-1)
    if rem:
        am = x_N[full:].abs().max()
        absmax_B = torch.cat([absmax_B, am.unsqueeze(0)])
        scaled_N = torch.cat([scaled_N, torch.clamp(x_N[full:] / am.clamp(min=1e-38), -1, 1)])
    mid = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled_N, mid.to(scaled_N.device)), absmax_B


def dequantize_blockwise(idx: Tensor, absmax_B: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """``code[idx] * absmax`` per block, fp32 [N] (the short last block too)."""
    v_N = code.to(idx.device)[idx.reshape(-1).long()]
    scale_N = absmax_B.repeat_interleave(blocksize)[: v_N.numel()]
    return v_N * scale_N


@dataclass
class NF4Tensor:
    """A weight in NF4: packed codes plus the (possibly double-quantised) absmax constants.

    Every field is a tensor or a plain value; ``state_dict()`` turns it into tensors only
    (safetensors-ready) and ``from_state_dict`` back.
    """

    packed: Tensor
    """uint8 [ceil(N/2)]: two 4-bit codes per byte, element 2i in the high nibble."""
    absmax: Tensor
    """fp32 [B] per-block absmax, or uint8 [B] 8-bit codes of ``absmax - offset`` if double-quantised."""
    shape: torch.Size
    """Shape of the original weight."""
    dtype: torch.dtype
    """dtype of the original weight (``dequantize_nf4``'s default output dtype)."""
    blocksize: int = 64
    """Elements per absmax block."""
    absmax2: Tensor | None = None
    """fp32 [C]: absmax of every 256 quantised absmax (double quantisation only)."""
    offset: Tensor | None = None
    """fp32 []: mean of the absmax, subtracted before quantising them (double quantisation only)."""

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.packed, self.absmax, self.absmax2, self.offset) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data (packed codes and constants; not the 16/256-entry code tables)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / max(self.numel, 1)

    def absmax_fp32(self) -> Tensor:
        """fp32 [B] absmax, dequantised from its 8-bit codes if double-quantised."""
        if not self.double_quant:
            return self.absmax
        a_B = dequantize_blockwise(self.absmax, self.absmax2, dynamic_code(self.device), DQ_BLOCKSIZE)
        return a_B + self.offset

    def to(self, device) -> NF4Tensor:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return NF4Tensor(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                         move(self.absmax2), move(self.offset))

    def meta(self) -> Tensor:
        """int64 [4 + ndim]: blocksize, double-quant flag, dtype index, ndim, *shape."""
        return torch.tensor([self.blocksize, int(self.double_quant), _DTYPE_CODES[self.dtype], len(self.shape),
                             *self.shape], dtype=torch.int64)

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Tensors only: ``{prefix}packed``, ``absmax``, ``meta`` and (double quant) ``absmax2``, ``offset``."""
        out = {"packed": self.packed, "absmax": self.absmax, "absmax2": self.absmax2, "offset": self.offset,
               "meta": self.meta()}
        return {prefix + k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], prefix: str = "") -> NF4Tensor:
        meta = sd[prefix + "meta"].tolist()
        blocksize, double, dtype_code, ndim = meta[:4]
        return cls(sd[prefix + "packed"], sd[prefix + "absmax"], torch.Size(meta[4:4 + ndim]),
                   _CODE_DTYPES[dtype_code], blocksize,
                   sd[prefix + "absmax2"] if double else None, sd[prefix + "offset"] if double else None)

    @classmethod
    def empty(cls, shape, dtype: torch.dtype = torch.float32, *, blocksize: int = 64, double_quant: bool = True,
              device=None) -> NF4Tensor:
        """Storage of the right sizes, contents undefined (to ``load_state_dict`` into)."""
        n = math.prod(shape)
        nb = -(-n // blocksize)
        kw = dict(device=device)
        if double_quant:
            return cls(torch.empty((n + 1) // 2, dtype=torch.uint8, **kw), torch.empty(nb, dtype=torch.uint8, **kw),
                       torch.Size(shape), dtype, blocksize,
                       torch.empty(-(-nb // DQ_BLOCKSIZE), dtype=torch.float32, **kw),
                       torch.empty((), dtype=torch.float32, **kw))
        return cls(torch.empty((n + 1) // 2, dtype=torch.uint8, **kw), torch.empty(nb, dtype=torch.float32, **kw),
                   torch.Size(shape), dtype, blocksize)

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, bits_per_param={self.bits_per_param:.4f}, device={self.device})")


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """w (any shape, floating) -> NF4Tensor; codes and constants equal bitsandbytes' NF4."""
    if not isinstance(w, Tensor) or w.dtype not in _FP_DTYPES:
        raise UpcycleError(f"quantize_nf4 needs a floating tensor (fp32/bf16/fp16/fp64), "
                           f"got {getattr(w, 'dtype', type(w).__name__)}")
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise UpcycleError(f"quantize_nf4 needs an even blocksize >= 2, got {blocksize!r}")
    if w.numel() == 0:
        raise UpcycleError("quantize_nf4 got an empty tensor")
    w = w.detach()
    idx_N, absmax_B = quantize_blockwise(w, nf4_code(w.device), blocksize)
    if idx_N.numel() % 2:
        # bitsandbytes pads the scaled values with a 0.0 before coding: the pad nibble is 7.
        idx_N = torch.cat([idx_N, idx_N.new_full((1,), NF4_CODE.index(0.0))])
    q8_N = idx_N.to(torch.uint8)
    packed = (q8_N[0::2] << 4) | q8_N[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax_B, w.shape, w.dtype, blocksize)
    offset = absmax_B.mean()
    qabs_B, absmax2_C = quantize_blockwise(absmax_B - offset, dynamic_code(w.device), DQ_BLOCKSIZE)
    return NF4Tensor(packed, qabs_B.to(torch.uint8), w.shape, w.dtype, blocksize, absmax2_C, offset)


def dequantize_nf4_range(q: NF4Tensor, start: int, stop: int, dtype: torch.dtype | None = None, *,
                         backend: str = "auto") -> Tensor:
    """Elements ``start:stop`` of the flattened weight, dequantised: the same bits as
    ``dequantize_nf4(q).flatten()[start:stop]``, reading only the codes and constants they need
    (what a block of experts of a stacked weight dequantises). ``backend`` as ``dequantize_nf4``'s;
    the triton kernel takes ranges that start on a constants boundary (a byte, an absmax block,
    and with double quantisation a block of 256 absmax: every expert of a usual stack), torch any."""
    dtype = dtype or q.dtype
    if not 0 <= start <= stop <= q.numel:
        raise UpcycleError(f"dequantize_nf4_range: [{start}, {stop}) is not inside the {q.numel} elements")
    dev, bs, n = q.device, q.blocksize, stop - start
    step = bs * (DQ_BLOCKSIZE if q.double_quant else 1)
    if backend != "torch" and n and start % step == 0 and start % 2 == 0 and (
            backend == "triton" or (q.device.type == "cuda" and _triton_dequant() is not None)):
        b0, b1, c0 = start // bs, -(-stop // bs), start // step
        part = NF4Tensor(q.packed[start // 2:(stop + 1) // 2], q.absmax[b0:b1], torch.Size([n]), q.dtype, bs,
                         None if q.absmax2 is None else q.absmax2[c0:-(-b1 // DQ_BLOCKSIZE)], q.offset)
        return dequantize_nf4(part, dtype, backend="triton")
    first = start % 2
    # One lookup per byte: its two NF4 values (high nibble first), fp32.
    v_N = _nf4_pairs(dev)[q.packed[start // 2:(stop + 1) // 2].long()].reshape(-1)[first:first + n]
    b0, b1 = start // bs, -(-stop // bs)
    if q.double_quant:  # the same two fp32 roundings as absmax_fp32(): code8[q] * absmax2, then + offset
        blk_B = torch.arange(b0, b1, device=dev) // DQ_BLOCKSIZE
        absmax_B = dynamic_code(dev)[q.absmax[b0:b1].long()] * q.absmax2[blk_B] + q.offset
    else:
        absmax_B = q.absmax[b0:b1]
    lo = start - b0 * bs
    if lo == 0 and n % bs == 0:  # whole blocks (a block of experts, usually): broadcast, no per-element scale
        return (v_N.view(-1, bs) * absmax_B.unsqueeze(-1)).view(-1).to(dtype)
    return (v_N * absmax_B.repeat_interleave(bs)[lo:lo + n]).to(dtype)


def _nf4_pairs(device=None) -> Tensor:
    """fp32 [256, 2]: the NF4 values of a packed byte's high and low nibble (cached per device)."""
    def make():
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        b = torch.arange(256)
        return torch.stack([code[b >> 4], code[b & 15]], dim=-1)
    return _cached("nf4_pairs", make, device)


def _dequantize_torch(q: NF4Tensor, dtype: torch.dtype) -> Tensor:
    return dequantize_nf4_range(q, 0, q.numel, dtype).reshape(q.shape)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, *, backend: str = "auto") -> Tensor:
    """NF4Tensor -> Tensor of ``q.shape`` in ``dtype`` (default: the original dtype).

    Values are computed in fp32 (``code * absmax``) and rounded once to ``dtype``, exactly as
    bitsandbytes does. ``backend``: ``torch``, ``triton`` (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``), or ``auto`` (triton on CUDA when it imports, else torch); both
    give the same bits.
    """
    dtype = dtype or q.dtype
    if backend not in ("auto", "torch", "triton"):
        raise UpcycleError(f"unknown dequantize backend {backend!r}; valid: auto, torch, triton")
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" and _triton_dequant() is not None else "torch"
    if backend == "torch":
        return _dequantize_torch(q, dtype)
    fn = _triton_dequant()
    if fn is None:
        raise UpcycleError("dequantize backend 'triton' needs the upcycle_kernels package (triton)")
    return fn(q.packed, q.absmax, q.absmax2, q.offset, q.shape, q.blocksize, DQ_BLOCKSIZE,
              dynamic_code(q.device) if q.double_quant else None, dtype)


_TRITON_DEQUANT: list = []


def _triton_dequant():
    """The triton launcher, or None where triton cannot be imported (looked up once)."""
    if not _TRITON_DEQUANT:
        try:
            from upcycle_kernels.nf4 import dequantize_nf4_triton
        except Exception:  # a triton without a usable driver can fail with other errors than ImportError
            dequantize_nf4_triton = None
        _TRITON_DEQUANT.append(dequantize_nf4_triton)
    return _TRITON_DEQUANT[0]
