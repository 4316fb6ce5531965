"""Expert weight storage: E MLPs of one shape, and the module that runs them.

``ExpertsBase`` holds what every storage shares: the shape, the backend choice, and
``forward``, which hands the weights to the one ``experts_forward`` (``compute.py``). A
storage only says where its weights come from (``expert_weights()``):

* ``StackedExperts`` (here): plain 3-D parameters, the checkpoint layout;
* ``SharedStackedExperts`` (``upcycle.adapters.shared``): one frozen copy seen as E views;
* ``NF4StackedExperts`` (``upcycle.adapters.qlora``): 4-bit, dequantised a block of experts at a
  time inside the compute (``compute_weights()``: ``QuantizedWeight``s).

Parameter names and layouts follow transformers v5 (they are the checkpoint contract):
gated ``gate_up_proj`` [E, 2F, D] (rows :F gate, F: up) and ``down_proj`` [E, D, F];
non-gated ``up_proj`` [E, F, D] and ``down_proj`` [E, D, F]; optional ``*_bias``.

Shape legend:
    T  tokens           D  hidden size         F  expert FFN size
    E  experts          A  assignments (token, expert) pairs
    M  first-projection rows (2F gated, F otherwise)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from upcycle.errors import UpcycleError
from upcycle.moe.backends import resolve_backend
from upcycle.moe.compute import ExpertWeights, LowRank, experts_forward


class ExpertsBase(nn.Module):
    """E experts of one MLP shape: ``y[t] = sum_a weight[a] * expert[expert_idx[a]](x[t])`` over a with token t.

    Subclasses call ``_init_shape`` and provide ``expert_weights()``, ``weight_dtype`` (the
    dtype the experts compute in) and ``weight_device``.
    """

    def _init_shape(self, num_experts: int, hidden_size: int, ffn_size: int, *, gated: bool, activation: str,
                    bias: bool) -> None:
        if activation not in ACT2FN:
            raise UpcycleError(f"unknown activation {activation!r}; transformers knows: {', '.join(sorted(ACT2FN))}")
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.gated, self.activation, self.has_bias = gated, activation, bias
        self.up_name = "gate_up_proj" if gated else "up_proj"
        """Checkpoint name of the first projection."""
        self._backend = "auto"

    @property
    def in_rows(self) -> int:
        """M: rows of the first projection (2F gated, F otherwise)."""
        return 2 * self.ffn_size if self.gated else self.ffn_size

    def expert_weights(self) -> ExpertWeights:
        raise NotImplementedError

    def compute_weights(self) -> ExpertWeights:
        """What ``forward`` hands the experts compute: ``expert_weights()``, unless the storage has a
        cheaper form the compute understands (NF4: ``QuantizedWeight``s, never dequantised whole)."""
        return self.expert_weights()

    @property
    def weight_dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def weight_device(self) -> torch.device:
        raise NotImplementedError

    # ---- the backend, resolved against the weights' dtype and device
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        # Resolving now makes an unusable explicit choice fail at load, not mid-training. CPU
        # weights on a CUDA machine usually move later (``model.cuda()``), and meta weights
        # are not real yet: their device is judged at forward instead.
        device = self.weight_device
        if device.type == "meta" or (device.type != "cuda" and torch.cuda.is_available()):
            device = None
        resolve_backend(name, self.weight_dtype, self.hidden_size, self.ffn_size, device=device,
                        activation=self.activation)
        self._backend = name

    def resolved_backend(self) -> str:
        """The backend ``forward`` runs now (``auto`` resolved for the current device and dtype)."""
        return resolve_backend(self._backend, self.weight_dtype, self.hidden_size, self.ffn_size,
                               device=self.weight_device, activation=self.activation)

    def forward(self, x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor, *,
                expert_major: bool = False, lowrank: LowRank | None = None) -> Tensor:
        """x [T, D], assignments [A] -> y [T, D] in x's dtype; tokens with no assignment get 0.

        ``expert_major``: assignments grouped by expert, A/E each (expert choice; not checked).
        ``lowrank``: per-expert LoRA deltas on both projections (``LoraExperts`` passes them).
        """
        return experts_forward(x_TD, token_idx_A, expert_idx_A, weight_A, self.compute_weights(), gated=self.gated,
                               activation=self.activation, backend=self.resolved_backend(), lowrank=lowrank,
                               expert_major=expert_major)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
                f"gated={self.gated}, activation={self.activation!r}, bias={self.has_bias}, "
                f"backend={self._backend!r}")


class DerivedExpertWeights:
    """For storages whose weights are derived, not stored under their checkpoint names (NF4,
    shared base): the checkpoint names as read-only views of ``expert_weights()``."""

    @property
    def w_in_EMD(self) -> Tensor:
        return self.expert_weights().w_in_EMD

    @property
    def down_proj(self) -> Tensor:
        return self.expert_weights().w_down_EDF

    @property
    def b_in_EM(self) -> Tensor | None:
        return self.expert_weights().b_in_EM

    @property
    def gate_up_proj(self) -> Tensor:
        if not self.gated:
            raise AttributeError("non-gated experts have up_proj, not gate_up_proj")
        return self.w_in_EMD

    @property
    def up_proj(self) -> Tensor:
        if self.gated:
            raise AttributeError("gated experts have gate_up_proj, not up_proj")
        return self.w_in_EMD

    def _bias_view(self, gated_name: bool | None) -> Tensor:
        b = self.expert_weights()
        if not self.has_bias or (gated_name is not None and gated_name != self.gated):
            raise AttributeError("these experts have no such bias")
        return b.b_in_EM if gated_name is not None else b.b_down_ED

    gate_up_proj_bias = property(lambda self: self._bias_view(True))
    up_proj_bias = property(lambda self: self._bias_view(False))
    down_proj_bias = property(lambda self: self._bias_view(None))


class StackedExperts(ExpertsBase):
    """Plain storage: ``gate_up_proj`` / ``up_proj`` [E, M, D], ``down_proj`` [E, D, F] (+ biases) as parameters."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, gated: bool, activation: str,
                 bias: bool = False, backend: str = "auto", dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self._init_shape(num_experts, hidden_size, ffn_size, gated=gated, activation=activation, bias=bias)
        E, D, M = num_experts, hidden_size, self.in_rows
        kw = dict(dtype=dtype, device=device)
        self.register_parameter(self.up_name, nn.Parameter(torch.empty(E, M, D, **kw)))
        self.down_proj = nn.Parameter(torch.empty(E, D, ffn_size, **kw))
        if bias:
            self.register_parameter(f"{self.up_name}_bias", nn.Parameter(torch.empty(E, M, **kw)))
            self.down_proj_bias = nn.Parameter(torch.empty(E, D, **kw))
        self.reset_parameters()
        self.backend = backend

    # One name for the first projection whichever layout: gate_up_proj or up_proj.
    @property
    def w_in_EMD(self) -> Tensor:
        return getattr(self, self.up_name)

    @property
    def b_in_EM(self) -> Tensor | None:
        return getattr(self, f"{self.up_name}_bias") if self.has_bias else None

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w_in_EMD, self.down_proj, self.b_in_EM,
                             self.down_proj_bias if self.has_bias else None)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.down_proj.dtype

    @property
    def weight_device(self) -> torch.device:
        return self.down_proj.device

    def reset_parameters(self) -> None:
        # Like nn.Linear, per expert: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for w in (self.w_in_EMD, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1]) if w.shape[-1] else 0.0
            with torch.no_grad():
                w.uniform_(-bound, bound)
        if self.has_bias:
            nn.init.zeros_(self.b_in_EM)
            nn.init.zeros_(self.down_proj_bias)
