"""Frozen 4-bit (NF4) bases for QLoRA: quantised attention Linears and quantised stacked experts.

    report = quantize_model(model)            # q/k/v/o Linears + every experts module, in place
    print(report["bytes_before"], report["bytes_after"], report["shared_base_saving_bytes"])

* ``NF4Linear``: drop-in for a frozen ``nn.Linear`` (no ``weight`` attribute: ``dequantized_weight()``); forward dequantises the weight to the
  compute dtype (bf16 on CUDA, fp32 elsewhere) and runs ``F.linear``. Backward dequantises
  again instead of saving the dense weight (bitsandbytes' ``MatMul4Bit`` trade: a second
  dequantisation for not keeping every layer's dense weight alive until backward).
* ``NF4StackedExperts``: an experts storage whose ``gate_up_proj`` / ``up_proj`` and
  ``down_proj`` are NF4. The one experts forward gets them as ``QuantizedWeight``s
  (``compute_weights()``) and dequantises one block of experts at a time (at most
  ``upcycle.moe.compute.DEQUANT_BLOCK_BYTES`` of dense weight, experts without tokens
  skipped), in forward and again for the input gradient in backward: no full-precision copy
  of a stack exists at any point of a step, and nothing dense is kept between forward and
  backward. (Before, the whole stack was dequantised per forward, with the experts forward
  checkpointed to avoid keeping it: peak memory one layer's dense experts, and a second
  forward per step.) The ``triton`` backend reads the NF4 codes in its kernels (tiles decoded
  in registers), except with expert LoRA, which it hands to ``grouped_mm``.
* Shared base: experts still exact copies of each other (a fresh upcycle) store ONE
  quantised [M, D] weight, expanded to [E, M, D] as a stride-0 view at forward: E times less
  memory for the experts' base and E times less dequantisation work.

Quantised storage (``{name}_packed``, ``_absmax``, ``_absmax2``, ``_offset``, ``_meta``) is a
set of persistent buffers, so ``state_dict`` / safetensors round-trip it; ``model.to(dtype)``
moves it but never casts it. Biases stay unquantised (their original dtype), frozen.

Shape legend: E experts, D hidden, F expert FFN, M = 2F (gated) or F, T tokens, A assignments.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from upcycle.adapters.nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_range, quantize_nf4
from upcycle.errors import UpcycleError
from upcycle.moe.compute import ExpertWeights, QuantizedWeight
from upcycle.moe.experts import DerivedExpertWeights, ExpertsBase
from upcycle.moe.shared_expert import SharedExpert

__all__ = ["DEFAULT_TARGETS", "NF4Linear", "NF4StackedExperts", "default_compute_dtype", "experts_identical",
           "quantize_model"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_NF4_KEYS = ("packed", "absmax", "absmax2", "offset", "meta")


def default_compute_dtype(device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and round more)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class _NF4Storage(nn.Module):
    """Registers NF4Tensors as persistent buffers and keeps ``.to(dtype)`` from casting them."""

    def _register_nf4(self, name: str, q: NF4Tensor) -> None:
        for key, t in q.state_dict().items():
            self.register_buffer(f"{name}_{key}", t)
        self._nf4_info[name] = (q.shape, q.dtype, q.blocksize)

    def nf4(self, name: str) -> NF4Tensor:
        """The stored NF4Tensor ``name`` (views of the buffers, no copy)."""
        shape, dtype, blocksize = self._nf4_info[name]
        get = self._buffers.get
        return NF4Tensor(get(f"{name}_packed"), get(f"{name}_absmax"), shape, dtype, blocksize,
                         get(f"{name}_absmax2"), get(f"{name}_offset"))

    def _apply(self, fn, recurse=True):
        names = [f"{n}_{k}" for n in self._nf4_info for k in _NF4_KEYS if f"{n}_{k}" in self._buffers]
        before = {n: self._buffers[n] for n in names}
        super()._apply(fn, recurse)
        for n, old in before.items():  # device moves apply; dtype casts would corrupt the codes' constants
            if self._buffers[n].dtype != old.dtype:
                self._buffers[n] = old.to(self._buffers[n].device)
        return self

    @property
    def quantized_nbytes(self) -> int:
        return sum(self.nf4(n).nbytes for n in self._nf4_info)


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T + b with W dequantised in forward and again in backward (never saved dense)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: NF4Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        ctx.q, ctx.dtype = q, dtype
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_nf4(q, dtype), bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ dequantize_nf4(ctx.q, ctx.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_b, None


class NF4Linear(_NF4Storage):
    """Frozen NF4 replacement of ``nn.Linear(in_features, out_features)``: [..., in] -> [..., out], x's dtype."""

    is_quantized = True  # adapters must not merge into it (its weight is not a tensor to update)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self._nf4_info: dict = {}
        self._register_nf4("weight", NF4Tensor.empty((out_features, in_features), dtype, blocksize=blocksize,
                                                     double_quant=double_quant, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize=blocksize,
                double_quant=double_quant, compute_dtype=compute_dtype, dtype=w.dtype, device="meta")
        m._nf4_info = {}
        m._register_nf4("weight", quantize_nf4(w, blocksize, double_quant))
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight [out, in] dequantised (default: its original dtype); a fresh tensor.

        Deliberately not a ``weight`` attribute: code that merges into ``layer.weight`` in place
        must fail loudly here instead of updating a temporary.
        """
        return dequantize_nf4(self.nf4("weight"), dtype)

    def forward(self, x: Tensor) -> Tensor:
        q = self.nf4("weight")
        dtype = self.compute_dtype or default_compute_dtype(q.device)
        bias = None if self.bias is None else self.bias.to(dtype)
        return _NF4Matmul.apply(x.to(dtype), q, bias, dtype).to(x.dtype)

    def extra_repr(self) -> str:
        q = self.nf4("weight")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={q.blocksize}, double_quant={q.double_quant}, bits_per_param={q.bits_per_param:.3f}")


class NF4StackedExperts(_NF4Storage, DerivedExpertWeights, ExpertsBase):
    """Frozen NF4 experts (same forward signature and math; see the module docstring).

    ``shared_base``: one [M, D] / [D, F] quantised weight for all E experts (they were equal).
    ``expert_weights()`` (and the checkpoint-name views) read outside ``dequantized()`` return
    fresh dequantised tensors: writing into them changes nothing (``is_quantized`` tells
    adapters not to merge).
    """

    is_quantized = True

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, gated: bool, activation: str,
                 bias: bool = False, backend: str = "auto", blocksize: int = 64, double_quant: bool = True,
                 shared_base: bool = False, compute_dtype: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self._init_shape(num_experts, hidden_size, ffn_size, gated=gated, activation=activation, bias=bias)
        self.shared_base, self.compute_dtype = shared_base, compute_dtype
        self._nf4_info: dict = {}
        self._dense: ExpertWeights | None = None
        E, M, Fn, D = num_experts, self.in_rows, ffn_size, hidden_size
        lead = () if shared_base else (E,)
        for name, shape in ((self.up_name, (*lead, M, D)), ("down_proj", (*lead, D, Fn))):
            self._register_nf4(name, NF4Tensor.empty(shape, dtype, blocksize=blocksize, double_quant=double_quant,
                                                     device=device))
        if bias:
            # Written into _parameters directly: the class's bias properties (compute-dtype views)
            # would make register_parameter refuse the names, which are the checkpoint's.
            self._parameters[f"{self.up_name}_bias"] = nn.Parameter(
                torch.zeros(E, M, dtype=dtype, device=device), requires_grad=False)
            self._parameters["down_proj_bias"] = nn.Parameter(torch.zeros(E, D, dtype=dtype, device=device),
                                                              requires_grad=False)
        self.backend = backend

    @classmethod
    def from_experts(cls, experts: ExpertsBase, *, blocksize: int = 64, double_quant: bool = True,
                     shared_base: bool | str = "auto", compute_dtype: torch.dtype | None = None) -> NF4StackedExperts:
        """Quantise ``experts``; ``shared_base`` True / False / ``"auto"`` (shared iff all experts are equal)."""
        w = experts.expert_weights()
        w_in, w_down = w.w_in_EMD.detach(), w.w_down_EDF.detach()
        identical = experts_identical(experts)
        if shared_base == "auto":
            shared_base = identical
        elif shared_base is True and not identical:
            raise UpcycleError("shared_base=True needs experts that are exact copies of each other; these differ "
                               "(use shared_base='auto' or False)")
        elif shared_base not in (True, False):
            raise UpcycleError(f"shared_base must be True, False or 'auto', got {shared_base!r}")
        m = cls(experts.num_experts, experts.hidden_size, experts.ffn_size, gated=experts.gated,
                activation=experts.activation, bias=experts.has_bias, backend=experts.backend, blocksize=blocksize,
                double_quant=double_quant, shared_base=shared_base, compute_dtype=compute_dtype, dtype=w_down.dtype,
                device="meta")
        m._nf4_info = {}
        for name, t in ((m.up_name, w_in), ("down_proj", w_down)):
            m._register_nf4(name, quantize_nf4(t[0] if shared_base else t, blocksize, double_quant))
        if experts.has_bias:
            m._parameters[f"{m.up_name}_bias"] = nn.Parameter(w.b_in_EM.detach().clone(), requires_grad=False)
            m._parameters["down_proj_bias"] = nn.Parameter(w.b_down_ED.detach().clone(), requires_grad=False)
        m.backend = experts.backend  # judged again now that the storage is on its real device
        return m

    # ---- what the experts forward reads: dense weights and biases in the compute dtype
    def _compute(self) -> torch.dtype:
        return self.compute_dtype or default_compute_dtype(self.weight_device)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the experts compute in, read without dequantising anything."""
        return self._compute()

    @property
    def weight_device(self) -> torch.device:
        return self._buffers["down_proj_packed"].device

    def _dequant(self, name: str, dtype: torch.dtype) -> Tensor:
        w = dequantize_nf4(self.nf4(name), dtype)
        if not self.shared_base:
            return w
        w = w.unsqueeze(0).expand(self.num_experts, *w.shape)
        # CUDA grouped_mm may not take a stride-0 expert dim; the loop and triton paths use strides.
        if w.is_cuda and self.resolved_backend() == "grouped_mm":
            w = w.contiguous()
        return w

    def expert_weights(self, dtype: torch.dtype | None = None) -> ExpertWeights:
        """The weights dequantised (inside ``dequantized()`` with no ``dtype``: its one copy)."""
        if self._dense is not None and dtype is None:
            return self._dense
        dtype = dtype or self._compute()
        bias = [self._parameters[n].to(dtype) if self.has_bias else None
                for n in (f"{self.up_name}_bias", "down_proj_bias")]
        return ExpertWeights(self._dequant(self.up_name, dtype), self._dequant("down_proj", dtype), *bias)

    def compute_weights(self) -> ExpertWeights:
        """NF4 weights as ``QuantizedWeight``s (dequantised block by block inside the compute); inside
        ``dequantized()``: its one dense copy."""
        if self._dense is not None:
            return self._dense
        dtype = self._compute()
        bias = [self._parameters[n].to(dtype) if self.has_bias else None
                for n in (f"{self.up_name}_bias", "down_proj_bias")]
        return ExpertWeights(self._quantized(self.up_name, dtype), self._quantized("down_proj", dtype), *bias)

    def _quantized(self, name: str, dtype: torch.dtype) -> QuantizedWeight:
        q = self.nf4(name)
        E = self.num_experts
        R, C = q.shape[-2:]
        if self.shared_base:
            def dequantize(e0: int, e1: int) -> Tensor:
                return dequantize_nf4(q, dtype).unsqueeze(0).expand(e1 - e0, R, C)
        else:
            def dequantize(e0: int, e1: int) -> Tensor:
                return dequantize_nf4_range(q, e0 * R * C, e1 * R * C, dtype).view(e1 - e0, R, C)
        def kernel_args() -> dict:  # for the triton kernels: per forward (autograd keeps the fp32 absmax for dx)
            return dict(packed=q.packed, absmax=q.absmax_fp32(), blocksize=q.blocksize)
        return QuantizedWeight((E, R, C), dtype, dequantize, self.shared_base, kernel_args)

    def dense_weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(w_in [E, M, D], down [E, D, F]) dequantised (the ones ``forward`` uses, if inside it)."""
        w = self.expert_weights(dtype)
        return w.w_in_EMD, w.w_down_EDF

    @contextmanager
    def dequantized(self, dtype: torch.dtype | None = None):
        """Inside, ``expert_weights()`` is ONE dequantised copy (compute dtype).

        Outside, every read dequantises afresh: code that reads the weights several times per
        step should run inside this, or ``run_dense``.
        """
        outer = self._dense
        self._dense = outer or self.expert_weights(dtype or self._compute())
        try:
            yield self._dense
        finally:
            self._dense = outer

    def run_dense(self, fn, *args):
        """``fn(*args)`` inside ``dequantized()``; with grad enabled, checkpointed (non-reentrant):
        backward rebuilds the dense weights instead of autograd keeping them from the forward.
        Gradients reach tensors ``fn`` captures (LoRA weights) as well as ``args``. (For code that
        wants the whole dense stack; ``forward`` does not.)"""
        def run(*a):
            with self.dequantized():
                return fn(*a)
        if torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False)
        return run(*args)

    def extra_repr(self) -> str:
        q = self.nf4("down_proj")
        return (super().extra_repr() + f", blocksize={q.blocksize}, double_quant={q.double_quant}, "
                f"shared_base={self.shared_base}")


def experts_identical(experts: ExpertsBase) -> bool:
    """True if every expert's weights equal expert 0's exactly (a fresh upcycle)."""
    if isinstance(experts, NF4StackedExperts):
        return experts.shared_base
    with torch.no_grad():
        for w in (experts.w_in_EMD, experts.down_proj):
            if any(not torch.equal(w[e], w[0]) for e in range(1, w.shape[0])):
                return False
    return True


def _matches(name: str, targets) -> bool:
    parts = name.split(".")
    # A Linear already wrapped by an adapter sits at ``<target>.base_layer`` (PEFT's layout).
    return parts[-1] in targets or (len(parts) > 1 and parts[-1] == "base_layer" and parts[-2] in targets)


def quantize_model(model: nn.Module, *, targets=DEFAULT_TARGETS, experts: bool = True,
                   shared_base: bool | str = "auto", blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None) -> dict:
    """Replace target ``nn.Linear``s (by last name component) and every ``StackedExperts`` by NF4, in place;
    with ``experts``, also the projections of every shared expert (``SharedExpert``).

    Returns a memory report (bytes of the quantised weights only; biases, norms, embeddings
    unchanged): ``bytes_before`` / ``bytes_after`` in all and per kind, and
    ``shared_base_saving_bytes``: what per-expert quantisation of the shared experts would
    have cost more.
    """
    targets = tuple(targets)
    rep = dict(num_linear=0, num_experts_modules=0, num_shared_base=0, linear_bytes_before=0,
               linear_bytes_after=0, experts_bytes_before=0, experts_bytes_after=0, shared_base_saving_bytes=0,
               params_quantized=0)
    for name, module in list(model.named_modules()):
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # A shared expert's projections are the MoE layer's always-on expert: quantised with the experts.
        in_shared_expert = experts and isinstance(parent, SharedExpert)
        if type(module) is nn.Linear and (_matches(name, targets) or in_shared_expert):
            new = NF4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant,
                                        compute_dtype=compute_dtype)
            rep["num_linear"] += 1
            rep["linear_bytes_before"] += module.weight.nbytes
            rep["linear_bytes_after"] += new.quantized_nbytes
            rep["params_quantized"] += module.weight.numel()
        elif experts and isinstance(module, ExpertsBase) and not isinstance(module, NF4StackedExperts):
            new = NF4StackedExperts.from_experts(module, blocksize=blocksize, double_quant=double_quant,
                                                 shared_base=shared_base, compute_dtype=compute_dtype)
            rep["num_experts_modules"] += 1
            rep["experts_bytes_before"] += module.w_in_EMD.nbytes + module.down_proj.nbytes
            rep["experts_bytes_after"] += new.quantized_nbytes
            rep["params_quantized"] += module.w_in_EMD.numel() + module.down_proj.numel()
            if new.shared_base:
                rep["num_shared_base"] += 1
                unshared = sum(NF4Tensor.empty(w.shape, blocksize=blocksize, double_quant=double_quant,
                                               device="meta").nbytes for w in (module.w_in_EMD, module.down_proj))
                rep["shared_base_saving_bytes"] += unshared - new.quantized_nbytes
        else:
            continue
        setattr(parent, child, new)
    if rep["num_linear"] + rep["num_experts_modules"] == 0:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UpcycleError(f"quantize_model found nothing to quantise: no nn.Linear named {', '.join(targets)} "
                           f"and no experts; Linear names here: {', '.join(linears) or 'none'}")
    rep["bytes_before"] = rep["linear_bytes_before"] + rep["experts_bytes_before"]
    rep["bytes_after"] = rep["linear_bytes_after"] + rep["experts_bytes_after"]
    return rep
