"""Frozen 4-bit (NF4) bases for QLoRA: quantised attention Linears and quantised stacked experts.

    report = quantize_model(model)            # q/k/v/o Linears + every StackedExperts, in place
    print(report["bytes_before"], report["bytes_after"], report["shared_base_saving_bytes"])

* ``NF4Linear``: drop-in for a frozen ``nn.Linear`` (no ``weight`` attribute: ``dequantized_weight()``); forward dequantises the weight to the
  compute dtype (bf16 on CUDA, fp32 elsewhere) and runs ``F.linear``. Backward dequantises
  again instead of saving the dense weight (bitsandbytes' ``MatMul4Bit`` trade: a second
  dequantisation for not keeping every layer's dense weight alive until backward).
* ``NF4StackedExperts``: a ``StackedExperts`` whose ``gate_up_proj`` / ``up_proj`` and
  ``down_proj`` are NF4. Per forward the whole stacked weight is dequantised to the compute
  dtype and the unchanged ``loop`` / ``grouped_mm`` / ``triton`` math runs on it. Memory
  trade-off: the dense copy exists only during the layer's forward (one layer's dense experts
  at a time, ``E * (M + D) * F`` elements), and in training the experts forward is
  checkpointed, so the copy is rebuilt in backward instead of being kept for it (one extra
  dequantisation + experts forward per step; no layer keeps its dense weights).
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
from transformers.activations import ACT2FN

from upcycle.adapters.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from upcycle.errors import UpcycleError
from upcycle.moe.experts import DerivedExpertWeights, StackedExperts, resolve_backend

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


class NF4StackedExperts(_NF4Storage, DerivedExpertWeights, StackedExperts):
    """Frozen NF4 ``StackedExperts`` (same forward signature and math; see the module docstring).

    ``shared_base``: one [M, D] / [D, F] quantised weight for all E experts (they were equal).
    ``w_in_EMD`` / ``down_proj`` read outside ``dequantized()`` return fresh dequantised
    tensors: writing into them changes nothing (``is_quantized`` tells adapters not to merge).
    """

    is_quantized = True

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, gated: bool, activation: str,
                 bias: bool = False, backend: str = "auto", blocksize: int = 64, double_quant: bool = True,
                 shared_base: bool = False, compute_dtype: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        nn.Module.__init__(self)  # not StackedExperts.__init__: it would allocate the dense weights
        if activation not in ACT2FN:
            raise UpcycleError(f"unknown activation {activation!r}; transformers knows: {', '.join(sorted(ACT2FN))}")
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.gated, self.activation, self.has_bias = gated, activation, bias
        self.act_fn = ACT2FN[activation]
        self.shared_base, self.compute_dtype = shared_base, compute_dtype
        self._nf4_info: dict = {}
        self._dense: tuple[Tensor, Tensor] | None = None
        self._up_name = "gate_up_proj" if gated else "up_proj"
        E, M, Fn, D = num_experts, (2 if gated else 1) * ffn_size, ffn_size, hidden_size
        lead = () if shared_base else (E,)
        for name, shape in ((self._up_name, (*lead, M, D)), ("down_proj", (*lead, D, Fn))):
            self._register_nf4(name, NF4Tensor.empty(shape, dtype, blocksize=blocksize, double_quant=double_quant,
                                                     device=device))
        if bias:
            # Written into _parameters directly: the class's bias properties (compute-dtype casts)
            # would make register_parameter refuse the names, which are the checkpoint's.
            self._parameters[f"{self._up_name}_bias"] = nn.Parameter(
                torch.zeros(E, M, dtype=dtype, device=device), requires_grad=False)
            self._parameters["down_proj_bias"] = nn.Parameter(torch.zeros(E, D, dtype=dtype, device=device),
                                                              requires_grad=False)
        self.backend = backend

    @classmethod
    def from_experts(cls, experts: StackedExperts, *, blocksize: int = 64, double_quant: bool = True,
                     shared_base: bool | str = "auto", compute_dtype: torch.dtype | None = None) -> NF4StackedExperts:
        """Quantise ``experts``; ``shared_base`` True / False / ``"auto"`` (shared iff all experts are equal)."""
        w_in, w_down = experts.w_in_EMD.detach(), experts.down_proj.detach()
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
        for name, w in ((m._up_name, w_in), ("down_proj", w_down)):
            m._register_nf4(name, quantize_nf4(w[0] if shared_base else w, blocksize, double_quant))
        if experts.has_bias:
            m._parameters[f"{m._up_name}_bias"] = nn.Parameter(experts.b_in_EM.detach().clone(), requires_grad=False)
            m._parameters["down_proj_bias"] = nn.Parameter(experts.down_proj_bias.detach().clone(),
                                                           requires_grad=False)
        m.backend = experts.backend  # judged again now that the storage is on its real device
        return m

    # ---- what StackedExperts' math reads: dense weights and biases in the compute dtype
    def _compute(self) -> torch.dtype:
        return self.compute_dtype or default_compute_dtype(self._buffers["down_proj_packed"].device)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the experts compute in, read without dequantising anything."""
        return self._compute()

    def _dequant(self, name: str, dtype: torch.dtype) -> Tensor:
        w = dequantize_nf4(self.nf4(name), dtype)
        if not self.shared_base:
            return w
        w = w.unsqueeze(0).expand(self.num_experts, *w.shape)
        # CUDA grouped_mm may not take a stride-0 expert dim; the loop and triton paths use strides.
        if w.is_cuda and self.resolved_backend() == "grouped_mm":
            w = w.contiguous()
        return w

    def dense_weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(w_in [E, M, D], down [E, D, F]) dequantised (the ones ``forward`` uses, if inside it)."""
        if self._dense is not None and dtype is None:
            return self._dense
        dtype = dtype or self._compute()
        return self._dequant(self._up_name, dtype), self._dequant("down_proj", dtype)

    @property
    def w_in_EMD(self) -> Tensor:
        return self.dense_weights()[0]

    @property
    def down_proj(self) -> Tensor:
        return self.dense_weights()[1]


    def _bias(self, name: str) -> Tensor:
        if name not in self._parameters:
            raise AttributeError(f"these experts have no {name}")
        return self._parameters[name].to(self._dense[0].dtype if self._dense is not None else self._compute())

    @property
    def b_in_EM(self) -> Tensor | None:
        return self._bias(f"{self._up_name}_bias") if self.has_bias else None

    @property
    def gate_up_proj_bias(self) -> Tensor:
        return self._bias("gate_up_proj_bias")

    @property
    def up_proj_bias(self) -> Tensor:
        return self._bias("up_proj_bias")

    @property
    def down_proj_bias(self) -> Tensor:
        return self._bias("down_proj_bias")

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        device = self._buffers["down_proj_packed"].device
        if device.type != "cuda" and torch.cuda.is_available() or device.type == "meta":
            device = None
        resolve_backend(name, self._compute(), self.hidden_size, self.ffn_size, device=device,
                        activation=self.activation)
        self._backend = name

    def resolved_backend(self) -> str:
        return resolve_backend(self._backend, self._compute(), self.hidden_size, self.ffn_size,
                               device=self._buffers["down_proj_packed"].device, activation=self.activation)

    def reset_parameters(self) -> None:
        """Nothing to initialise: the quantised weights come from ``from_experts`` or a state dict."""

    @contextmanager
    def dequantized(self, dtype: torch.dtype | None = None):
        """Inside, ``w_in_EMD`` / ``down_proj`` / the biases are ONE dequantised copy (compute dtype).

        Outside, every read of those properties dequantises afresh: code that reads them
        several times per step (an adapter's forward) should run inside this, or ``run_dense``.
        """
        outer = self._dense
        self._dense = outer or self.dense_weights(dtype or self._compute())
        try:
            yield self._dense
        finally:
            self._dense = outer

    def run_dense(self, fn, *args):
        """``fn(*args)`` inside ``dequantized()``; with grad enabled, checkpointed (non-reentrant):
        backward rebuilds the dense weights instead of autograd keeping them from the forward.
        Gradients reach tensors ``fn`` captures (LoRA weights) as well as ``args``."""
        def run(*a):
            with self.dequantized():
                return fn(*a)
        if torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False)
        return run(*args)

    def forward(self, x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor, *,
                expert_major: bool = False) -> Tensor:
        """As ``StackedExperts.forward``: x [T, D] -> y [T, D] in x's dtype."""
        def run(x, tok, exp, w):
            return StackedExperts.forward(self, x, tok, exp, w, expert_major=expert_major)
        return self.run_dense(run, x_TD, token_idx_A, expert_idx_A, weight_A)

    def extra_repr(self) -> str:
        q = self.nf4("down_proj")
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
                f"gated={self.gated}, activation={self.activation!r}, bias={self.has_bias}, "
                f"backend={self._backend!r}, blocksize={q.blocksize}, double_quant={q.double_quant}, "
                f"shared_base={self.shared_base}")


def experts_identical(experts: StackedExperts) -> bool:
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
    """Replace target ``nn.Linear``s (by last name component) and every ``StackedExperts`` by NF4, in place.

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
        if type(module) is nn.Linear and _matches(name, targets):
            new = NF4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant,
                                        compute_dtype=compute_dtype)
            rep["num_linear"] += 1
            rep["linear_bytes_before"] += module.weight.nbytes
            rep["linear_bytes_after"] += new.quantized_nbytes
            rep["params_quantized"] += module.weight.numel()
        elif experts and isinstance(module, StackedExperts) and not isinstance(module, NF4StackedExperts):
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
                           f"and no StackedExperts; Linear names here: {', '.join(linears) or 'none'}")
    rep["bytes_before"] = rep["linear_bytes_before"] + rep["experts_bytes_before"]
    rep["bytes_after"] = rep["linear_bytes_after"] + rep["experts_bytes_after"]
    return rep
