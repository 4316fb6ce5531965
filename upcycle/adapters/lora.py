"""LoRA layers, designed like PEFT's: wrap the base layer, add ``lora_A`` / ``lora_B``, ``scaling``.

* ``LoraLinear`` wraps an ``nn.Linear``: ``y = base(x) + B(A(dropout(x))) * scaling``.
* ``LoraExperts`` wraps any experts storage (plain, shared base, NF4): one A, B pair per
  expert for each of its two projections, handed to the base's forward as low-rank deltas
  ``(x A_e^T) B_e^T * scaling`` on the tokens routed to expert e. ``W_e + B_e A_e`` is never
  built in the forward (that would cost E full weight copies).

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
from torch import Tensor, nn

from upcycle.adapters.config import check_rank
from upcycle.errors import UpcycleError
from upcycle.moe.compute import LowRank, autocast_off
from upcycle.moe.experts import ExpertsBase

_HALF = (torch.float16, torch.bfloat16)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or rsLoRA's ``alpha / sqrt(r)`` (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF or not dtype.is_floating_point else dtype


class LoraLinear(nn.Module):
    """``nn.Linear`` plus a low-rank update; keys ``<name>.lora_A.weight`` [r, D_in], ``lora_B.weight`` [D_out, r].

    The base layer is kept (frozen) as ``base_layer``, as PEFT keeps it. Any module with
    ``in_features`` / ``out_features`` and a float ``weight`` [D_out, D_in] can be wrapped;
    one without a float weight (a quantised Linear) works but cannot ``merge``.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        check_rank(r, alpha, dropout)
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
        """``B A * scaling`` [D_out, D_in], in the adapter dtype (even under autocast, which would run it in bf16)."""
        with autocast_off(self.lora_A.weight.device.type):
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
    """Stacked experts plus per-expert LoRA on both projections; a drop-in for the experts it wraps.

    Parameters (B zero at init):
        ``lora_A_in``   [E, r, D]    ``lora_B_in``   [E, M, r]   (gate_up_proj / up_proj)
        ``lora_A_down`` [E, r, F]    ``lora_B_down`` [E, D, r]   (down_proj)

    The base (any ``ExpertsBase`` storage: plain, shared, NF4) runs its usual forward with
    these as low-rank deltas (``upcycle.moe.compute``): one code path for every backend.

    Expert-specialised fine-tuning (``keep_experts(ids)``): only experts ``ids`` keep an
    adapter; the parameters shrink to their k rows ([k, r, D] ...) and the forward hands the
    base [E, ...] deltas that are zero for every other expert (built per forward: r-sized, cheap).
    """

    def __init__(self, base: ExpertsBase, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        check_rank(r, alpha, dropout)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.base_layer = base.requires_grad_(False)
        E, M, D, Fn = base.num_experts, base.in_rows, base.hidden_size, base.ffn_size
        kw = dict(device=base.weight_device, dtype=dtype or _adapter_dtype(base.weight_dtype))
        self.lora_A_in = nn.Parameter(torch.empty(E, r, D, **kw))
        self.lora_B_in = nn.Parameter(torch.empty(E, M, r, **kw))
        self.lora_A_down = nn.Parameter(torch.empty(E, r, Fn, **kw))
        self.lora_B_down = nn.Parameter(torch.empty(E, D, r, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.expert_ids: list[int] | None = None
        """The experts that have an adapter, in the parameters' row order (None: all E)."""
        self.reset_lora_parameters()

    @property
    def num_adapted(self) -> int:
        """Experts with an adapter: rows of the LoRA parameters (E unless ``keep_experts`` was called)."""
        return self.lora_A_in.shape[0]

    def keep_experts(self, expert_ids) -> None:
        """Keep the adapters of experts ``expert_ids`` only (their current values); the others' deltas are 0."""
        from upcycle.moe.subset import check_expert_ids

        if self.merged:
            raise UpcycleError("cannot restrict a merged expert adapter: unmerge it first")
        if self.expert_ids is not None:
            raise UpcycleError("keep_experts was called already: these experts are a subset of the layer's")
        ids = check_expert_ids(expert_ids, self.num_experts, "keep_experts")
        idx = torch.tensor(ids, device=self.lora_A_in.device)
        for name in ("lora_A_in", "lora_B_in", "lora_A_down", "lora_B_down"):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.detach().index_select(0, idx), requires_grad=old.requires_grad))
        self.expert_ids = ids
        self.register_buffer("_ids", idx, persistent=False)

    def _all_experts(self, t: Tensor) -> Tensor:
        """[k, ...] -> [E, ...] with zeros for the experts without an adapter (differentiable)."""
        if self.expert_ids is None:
            return t
        return t.new_zeros(self.num_experts, *t.shape[1:]).index_copy(0, self._ids, t)

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
        subset = "" if self.expert_ids is None else f", experts={self.num_adapted}/{self.num_experts}"
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}{subset}"

    def lowrank(self) -> LowRank:
        """The deltas the base's forward adds (``W_e + scaling B_e A_e``, never built)."""
        full = self._all_experts
        return LowRank(full(self.lora_A_in), full(self.lora_B_in), full(self.lora_A_down), full(self.lora_B_down),
                       self.scaling, self.lora_dropout)

    def delta_weights(self) -> tuple[Tensor, Tensor]:
        """``(B_in A_in, B_down A_down) * scaling`` of the adapted experts: [k, M, D] and [k, D, F]
        (k = E unless ``keep_experts``; rows in ``expert_ids`` order), adapter dtype (merge only; even under
        autocast, which would run the products in bf16)."""
        with autocast_off(self.lora_A_in.device.type):
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
            if self.expert_ids is None:
                b.w_in_EMD.add_(d_in.to(b.w_in_EMD.dtype), alpha=sign)
                b.down_proj.add_(d_down.to(b.down_proj.dtype), alpha=sign)
            else:  # only the adapted experts' rows change (the others stay bit for bit)
                b.w_in_EMD.index_add_(0, self._ids, d_in.to(b.w_in_EMD.dtype), alpha=sign)
                b.down_proj.index_add_(0, self._ids, d_down.to(b.down_proj.dtype), alpha=sign)

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
        """Same contract as ``ExpertsBase.forward``: x [T, D], assignments [A] -> y [T, D]."""
        return self.base_layer(x_TD, token_idx_A, expert_idx_A, weight_A, expert_major=expert_major,
                               lowrank=None if self.merged else self.lowrank())
