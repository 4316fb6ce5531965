"""LoRA layers, designed like PEFT's: wrap the base layer, add ``lora_A`` / ``lora_B``, ``scaling``.

* ``LoraLinear`` wraps an ``nn.Linear``: ``y = base(x) + B(A(dropout(x))) * scaling``.
* ``LoraExperts`` wraps a ``StackedExperts``: one A, B pair per expert for each of its two
  projections, applied as ``(x A_e^T) B_e^T * scaling`` on the tokens routed to expert e.
  ``W_e + B_e A_e`` is never built in the forward (that would cost E full weight copies).

A starts kaiming-uniform (PEFT's default), B at zero, so a fresh adapter is a no-op.
``scaling = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). ``merge()`` adds ``B A * scaling`` into
the base weights, ``unmerge()`` takes it out again. Adapters on a bf16/fp16 base are kept in
float32 (PEFT's ``autocast_adapter_dtype``): their small updates would round away in bf16.

Shape legend:
    T  tokens           D  hidden size         F  expert FFN size
    E  experts          A  assignments         r  LoRA rank
    M  first-projection rows (2F gated, F otherwise)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.errors import UpcycleError
from upcycle.moe.experts import StackedExperts, _grad_contiguous, grouped_mm_unsupported

_HALF = (torch.float16, torch.bfloat16)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or rsLoRA's ``alpha / sqrt(r)`` (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF or not dtype.is_floating_point else dtype


def _check_rank(r: int, alpha: float, dropout: float) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UpcycleError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise UpcycleError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise UpcycleError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoraLinear(nn.Module):
    """``nn.Linear`` plus a low-rank update; keys ``<name>.lora_A.weight`` [r, D_in], ``lora_B.weight`` [D_out, r].

    The base layer is kept (frozen) as ``base_layer``, as PEFT keeps it. Any module with
    ``in_features`` / ``out_features`` and a float ``weight`` [D_out, D_in] can be wrapped;
    one without a float weight (a quantised Linear) works but cannot ``merge``.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        _check_rank(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.base_layer = base.requires_grad_(False)
        # A quantised base (NF4Linear without bias) holds only buffers, in uint8: take its
        # device from those and its dtype from the dtype it computes in.
        ref = next(base.parameters(), None)
        ref = ref if ref is not None else next(base.buffers(), None)
        device = ref.device if ref is not None else None
        if ref is not None and ref.dtype.is_floating_point:
            base_dtype = ref.dtype
        else:
            base_dtype = getattr(base, "compute_dtype", None) or torch.float32
        dtype = dtype or _adapter_dtype(base_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"

    def delta_weight(self) -> Tensor:
        """``B A * scaling`` [D_out, D_in], in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _base_weight(self) -> Tensor:
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, Tensor) or not w.dtype.is_floating_point:
            raise UpcycleError(f"cannot merge LoRA into a {type(self.base_layer).__name__}: it has no float weight "
                               "(dequantise the base first)")
        return w

    def merge(self) -> None:
        """Add the update into the base weight; forward then runs the base layer alone."""
        if self.merged:
            return
        w = self._base_weight()
        with torch.no_grad():
            w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to rounding in the base dtype)."""
        if not self.merged:
            return
        w = self._base_weight()
        with torch.no_grad():
            w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling
        return result + delta.to(result.dtype)


class LoraExperts(nn.Module):
    """Stacked experts plus per-expert LoRA on both projections; a drop-in for ``StackedExperts``.

    Parameters (B zero at init):
        ``lora_A_in``   [E, r, D]    ``lora_B_in``   [E, M, r]   (gate_up_proj / up_proj)
        ``lora_A_down`` [E, r, F]    ``lora_B_down`` [E, D, r]   (down_proj)

    Backends: ``loop`` runs expert by expert; ``grouped_mm`` runs the base GEMMs and the two
    low-rank GEMMs of each projection with ``torch.nn.functional.grouped_mm`` (the low-rank
    ones expert by expert when r is not a multiple of 16 bytes' worth of elements).
    ``triton`` falls back to the ``grouped_mm`` path (same sorted layout; the fused kernels
    have no LoRA epilogue yet), and to ``loop`` where ``grouped_mm`` cannot run.
    """

    def __init__(self, base: StackedExperts, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        _check_rank(r, alpha, dropout)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.base_layer = base.requires_grad_(False)
        w_in = base.w_in_EMD
        E, M, D = w_in.shape
        Fn = base.down_proj.shape[-1]
        kw = dict(device=w_in.device, dtype=dtype or _adapter_dtype(w_in.dtype))
        self.lora_A_in = nn.Parameter(torch.empty(E, r, D, **kw))
        self.lora_B_in = nn.Parameter(torch.empty(E, M, r, **kw))
        self.lora_A_down = nn.Parameter(torch.empty(E, r, Fn, **kw))
        self.lora_B_down = nn.Parameter(torch.empty(E, D, r, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # kaiming_uniform(a=sqrt(5)) of an [r, fan_in] matrix is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per expert.
        with torch.no_grad():
            for a in (self.lora_A_in, self.lora_A_down):
                bound = 1.0 / math.sqrt(a.shape[-1])
                a.uniform_(-bound, bound)
            self.lora_B_in.zero_()
            self.lora_B_down.zero_()

    # What MoEBlock and the rest of the package read from ``block.experts``.
    num_experts = property(lambda self: self.base_layer.num_experts)
    hidden_size = property(lambda self: self.base_layer.hidden_size)
    ffn_size = property(lambda self: self.base_layer.ffn_size)
    gated = property(lambda self: self.base_layer.gated)
    activation = property(lambda self: self.base_layer.activation)
    has_bias = property(lambda self: self.base_layer.has_bias)

    @property
    def backend(self) -> str:
        return self.base_layer.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.base_layer.backend = name

    def resolved_backend(self) -> str:
        return self.base_layer.resolved_backend()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"

    def delta_weights(self) -> tuple[Tensor, Tensor]:
        """``(B_in A_in, B_down A_down) * scaling``: [E, M, D] and [E, D, F], adapter dtype (merge only)."""
        return (torch.bmm(self.lora_B_in, self.lora_A_in) * self.scaling,
                torch.bmm(self.lora_B_down, self.lora_A_down) * self.scaling)

    def _apply_delta(self, sign: float) -> None:
        b = self.base_layer
        if getattr(b, "is_quantized", False):  # its weights are views dequantised on the fly
            raise UpcycleError("cannot merge LoRA into quantised (NF4) experts: merge into the unquantised base")
        if b.down_proj.stride(0) == 0:  # E views of one shared weight: an in-place add would hit all experts
            raise UpcycleError("cannot merge LoRA into a shared expert base in place: use merge_lora(model), "
                               "which un-shares it first")
        d_in, d_down = self.delta_weights()
        with torch.no_grad():
            b.w_in_EMD.add_(d_in.to(b.w_in_EMD.dtype), alpha=sign)
            b.down_proj.add_(d_down.to(b.down_proj.dtype), alpha=sign)

    def merge(self) -> None:
        if not self.merged:
            self._apply_delta(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    def forward(self, x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor, *,
                expert_major: bool = False) -> Tensor:
        """Same contract as ``StackedExperts.forward``: x [T, D], assignments [A] -> y [T, D]."""
        base = self.base_layer
        if self.merged:
            return base(x_TD, token_idx_A, expert_idx_A, weight_A, expert_major=expert_major)
        backend = base.resolved_backend()
        # NF4 bases name their dtype: reading ``down_proj`` there would dequantise the whole stack.
        dtype = getattr(base, "weight_dtype", None) or base.down_proj.dtype
        if backend != "loop" and grouped_mm_unsupported(dtype, base.hidden_size, base.ffn_size):
            backend = "loop"
        run = self._forward_loop if backend == "loop" else self._forward_grouped_mm
        if hasattr(base, "run_dense"):  # quantised base: dequantise once per forward, not per read
            return base.run_dense(run, x_TD, token_idx_A, expert_idx_A, weight_A)
        return run(x_TD, token_idx_A, expert_idx_A, weight_A)

    def _lora(self, x_NI: Tensor, a_RI: Tensor, b_OR: Tensor, out_dtype: torch.dtype) -> Tensor:
        x_NI = self.lora_dropout(x_NI.to(a_RI.dtype))
        return (F.linear(F.linear(x_NI, a_RI), b_OR) * self.scaling).to(out_dtype)

    def _forward_loop(self, x_TD, token_idx_A, expert_idx_A, weight_A) -> Tensor:
        base = self.base_layer
        w_in, b_in = base.w_in_EMD, base.b_in_EM
        acc = torch.promote_types(torch.float32, w_in.dtype)
        y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
        tok_A, _, w_A, counts_E = base._sort_by_expert(token_idx_A, expert_idx_A, weight_A)
        # unbind once (see StackedExperts._forward_loop: per-expert indexing is O(E^2) in backward)
        w_in_E, w_down_E = w_in.unbind(0), base.down_proj.unbind(0)
        b_in_E = b_in.unbind(0) if b_in is not None else None
        b_down_E = base.down_proj_bias.unbind(0) if base.has_bias else None
        a_in_E, b_in_lora_E = self.lora_A_in.unbind(0), self.lora_B_in.unbind(0)
        a_down_E, b_down_lora_E = self.lora_A_down.unbind(0), self.lora_B_down.unbind(0)
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            tok_N, w_N = tok_A[start:start + n], w_A[start:start + n]
            start += n
            x_ND = x_TD[tok_N].to(w_in.dtype)
            h_NM = F.linear(x_ND, w_in_E[e], None if b_in_E is None else b_in_E[e])
            h_NF = base._activate(h_NM + self._lora(x_ND, a_in_E[e], b_in_lora_E[e], h_NM.dtype))
            out_ND = F.linear(h_NF, w_down_E[e], None if b_down_E is None else b_down_E[e])
            out_ND = out_ND + self._lora(h_NF, a_down_E[e], b_down_lora_E[e], out_ND.dtype)
            y_TD.index_add_(0, tok_N, out_ND.to(acc) * w_N.unsqueeze(-1).to(acc))
        return y_TD.to(x_TD.dtype)

    def _lora_grouped(self, x_AI: Tensor, a_ERI: Tensor, b_EOR: Tensor, offs_E: Tensor, counts: list[int],
                      out_dtype: torch.dtype) -> Tensor:
        """Per-expert ``(x A_e^T) B_e^T * scaling`` over expert-sorted rows x [A, I] -> [A, O]."""
        x_AI = self.lora_dropout(x_AI.to(a_ERI.dtype))
        if grouped_mm_unsupported(a_ERI.dtype, x_AI.shape[-1], self.r) is None:
            t_AR = _grad_contiguous(F.grouped_mm(x_AI, a_ERI.transpose(-2, -1), offs=offs_E))
            d_AO = _grad_contiguous(F.grouped_mm(t_AR, b_EOR.transpose(-2, -1), offs=offs_E))
        else:  # rank rows not 16-byte aligned: grouped_mm cannot take them, go expert by expert
            a_E, b_E = a_ERI.unbind(0), b_EOR.unbind(0)
            parts = [F.linear(F.linear(x_NI, a_E[e]), b_E[e]) for e, x_NI in enumerate(x_AI.split(counts)) if counts[e]]
            d_AO = torch.cat(parts) if parts else x_AI.new_zeros(0, b_EOR.shape[1])
        return (d_AO * self.scaling).to(out_dtype)

    def _forward_grouped_mm(self, x_TD, token_idx_A, expert_idx_A, weight_A) -> Tensor:
        base = self.base_layer
        w_in, b_in = base.w_in_EMD, base.b_in_EM
        tok_A, exp_A, w_A, counts_E = base._sort_by_expert(token_idx_A, expert_idx_A, weight_A)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        counts = counts_E.tolist()
        x_AD = x_TD[tok_A].to(w_in.dtype)
        h_AM = _grad_contiguous(F.grouped_mm(x_AD, w_in.transpose(-2, -1), offs=offs_E))
        h_AM = h_AM + self._lora_grouped(x_AD, self.lora_A_in, self.lora_B_in, offs_E, counts, h_AM.dtype)
        if b_in is not None:
            h_AM = h_AM + b_in[exp_A]
        h_AF = base._activate(h_AM)
        out_AD = _grad_contiguous(F.grouped_mm(h_AF, base.down_proj.transpose(-2, -1), offs=offs_E))
        out_AD = out_AD + self._lora_grouped(h_AF, self.lora_A_down, self.lora_B_down, offs_E, counts, out_AD.dtype)
        if base.has_bias:
            out_AD = out_AD + base.down_proj_bias[exp_A]
        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        y_TD.index_add_(0, tok_A, out_AD.float() * w_A.unsqueeze(-1).float())
        return y_TD.to(x_TD.dtype)
