"""Experts of which only a subset trains (expert-specialised fine-tuning, ESFT): two stacks, one forward.

    experts = SubsetExperts.from_experts(block.experts, [0, 5, 17])   # those train, the rest are frozen
    block.experts = experts
    ...train...
    block.experts = experts.merged()                                   # a plain StackedExperts again

A stacked parameter [E, M, D] cannot be trainable for some rows only: a gradient mask would
still leave the frozen rows to AdamW's weight decay and give them optimizer state. So the
chosen experts move into their own ``StackedExperts`` (``trained``, [k, M, D], trainable)
and the others into a frozen one (``frozen``, [E-k, M, D]); no row is stored twice. The
forward splits the assignments between the two and runs the one experts forward
(``upcycle.moe.compute``) on each, with the expert ids renumbered into each stack:
``y = experts_forward(trained part) + experts_forward(frozen part)``, exact because a token's
output is a sum over its assignments (only the order of that fp32 sum changes: the parts hand
back fp32 sums, rounded to x's dtype once, as the plain experts round). Expert-major
assignments (expert choice) stay expert-major in each part. Splitting reads the assignment
count of each part: one host sync per forward on CUDA.

Parameter names: ``<experts>.trained.gate_up_proj`` [k, M, D] ..., ``<experts>.frozen.*``;
the checkpoint layout comes back with ``merged()``. ``expert_ids`` lists the trained experts
in ``trained``'s row order (ascending).

Shape legend: E experts, k trained experts, D hidden, F expert FFN, M = 2F (gated) or F, A assignments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from upcycle.errors import UpcycleError
from upcycle.moe.compute import ExpertWeights, LowRank
from upcycle.moe.experts import ExpertsBase, StackedExperts

__all__ = ["SubsetExperts", "check_expert_ids"]


def check_expert_ids(ids, num_experts: int, where: str) -> list[int]:
    """``ids`` as a sorted list of distinct ints in [0, E); UpcycleError naming ``where`` otherwise."""
    try:
        out = sorted({int(i) for i in ids})
    except (TypeError, ValueError):
        raise UpcycleError(f"{where}: expert ids must be integers, got {ids!r}") from None
    if len(out) != len(list(ids)) or any(not 0 <= i < num_experts for i in out):
        raise UpcycleError(f"{where}: expert ids must be distinct and in [0, {num_experts}), got {list(ids)}")
    return out


def _stacked(like: ExpertsBase, w: ExpertWeights, trainable: bool, backend: str) -> StackedExperts:
    """A ``StackedExperts`` shaped like ``like`` whose parameters are (detached) ``w``."""
    m = StackedExperts(w.w_down_EDF.shape[0], like.hidden_size, like.ffn_size, gated=like.gated,
                       activation=like.activation, bias=like.has_bias, backend=backend,
                       dtype=w.w_down_EDF.dtype, device="meta")
    tensors = {m.up_name: w.w_in_EMD, "down_proj": w.w_down_EDF}
    if like.has_bias:
        tensors.update({f"{m.up_name}_bias": w.b_in_EM, "down_proj_bias": w.b_down_ED})
    for name, t in tensors.items():
        m.register_parameter(name, nn.Parameter(t.detach(), requires_grad=trainable))
    m.backend = backend  # judged again on the real device
    return m


def _stack(src: StackedExperts, rows: list[int], trainable: bool) -> StackedExperts | None:
    """A ``StackedExperts`` holding copies of ``src``'s experts ``rows`` (None if there are none)."""
    if not rows:
        return None
    w = src.expert_weights()
    idx = torch.tensor(rows, device=w.w_down_EDF.device)
    with torch.no_grad():
        rows_w = ExpertWeights(*(None if t is None else t.index_select(0, idx)
                                 for t in (w.w_in_EMD, w.w_down_EDF, w.b_in_EM, w.b_down_ED)))
    return _stacked(src, rows_w, trainable, src.backend)


class SubsetExperts(ExpertsBase):
    """E experts of which ``expert_ids`` train and the rest stay frozen (see the module docstring)."""

    def __init__(self, experts: StackedExperts, expert_ids):
        super().__init__()
        if type(experts) is not StackedExperts:
            raise UpcycleError(f"training a subset of the experts needs plain StackedExperts, got "
                               f"{type(experts).__name__} (quantised or shared bases train through LoRA)")
        E = experts.num_experts
        self._init_shape(E, experts.hidden_size, experts.ffn_size, gated=experts.gated,
                         activation=experts.activation, bias=experts.has_bias)
        self.expert_ids = check_expert_ids(expert_ids, E, "SubsetExperts")
        chosen = set(self.expert_ids)
        self.frozen_ids = [e for e in range(E) if e not in chosen]
        self.trained = _stack(experts, self.expert_ids, True)
        self.frozen = _stack(experts, self.frozen_ids, False)
        # Expert id -> (in the trained stack?, its row there or in the frozen stack).
        dev = experts.weight_device
        slot_E = torch.empty(E, dtype=torch.long)
        slot_E[self.expert_ids] = torch.arange(len(self.expert_ids))
        slot_E[self.frozen_ids] = torch.arange(len(self.frozen_ids))
        trained_E = torch.zeros(E, dtype=torch.bool)
        trained_E[self.expert_ids] = True
        self.register_buffer("slot_E", slot_E.to(dev), persistent=False)
        self.register_buffer("trained_E", trained_E.to(dev), persistent=False)
        self._backend = experts.backend

    @classmethod
    def from_experts(cls, experts: StackedExperts, expert_ids) -> SubsetExperts:
        return cls(experts, expert_ids)

    def parts(self) -> list[StackedExperts]:
        return [p for p in (self.trained, self.frozen) if p is not None]

    # ---- backend, dtype, device: those of the two stacks (they agree)
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        for p in self.parts():
            p.backend = name
        self._backend = name

    def resolved_backend(self) -> str:
        return self.parts()[0].resolved_backend()

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.parts()[0].weight_dtype

    @property
    def weight_device(self) -> torch.device:
        return self.parts()[0].weight_device

    def expert_weights(self) -> ExpertWeights:
        """All E experts in expert order: a fresh tensor per weight (differentiable w.r.t. ``trained``)."""
        parts = [(p.expert_weights(), ids) for p, ids in ((self.trained, self.expert_ids),
                                                           (self.frozen, self.frozen_ids)) if p is not None]

        def gather(field: str) -> Tensor | None:
            first = getattr(parts[0][0], field)
            if first is None:
                return None
            out = first.new_empty(self.num_experts, *first.shape[1:])
            for w, ids in parts:
                out = out.index_copy(0, torch.tensor(ids, device=out.device), getattr(w, field))
            return out

        return ExpertWeights(gather("w_in_EMD"), gather("w_down_EDF"), gather("b_in_EM"), gather("b_down_ED"))

    def merged(self) -> StackedExperts:
        """A plain ``StackedExperts`` of all E experts (trained rows as they are now), trainable like before."""
        return _stacked(self, self.expert_weights(), True, self._backend)

    def forward(self, x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor, *,
                expert_major: bool = False, lowrank: LowRank | None = None) -> Tensor:
        """As ``ExpertsBase.forward``: each stack runs its own experts' assignments."""
        if lowrank is not None:
            raise UpcycleError("SubsetExperts trains its chosen experts fully; LoRA on a subset of the experts "
                               "wraps the plain experts (LoraExperts.keep_experts)")
        trained_A = self.trained_E[expert_idx_A]
        # Each part computes in its weights' dtype as before (the compute casts x to it), but hands
        # back its float32 sum: rounding each part to a bf16 x's dtype and adding them would round
        # twice (one bf16 step off in about a fifth of the outputs), where plain experts round once.
        x32_TD = x_TD.float()
        y_TD = None
        for part, sel_A in ((self.trained, trained_A), (self.frozen, ~trained_A)):
            if part is None:
                continue
            idx_A = sel_A.nonzero().squeeze(1)  # stable: each part keeps the assignments' order
            y = part(x32_TD, token_idx_A[idx_A], self.slot_E[expert_idx_A[idx_A]], weight_A[idx_A],
                     expert_major=expert_major)
            y_TD = y if y_TD is None else y_TD + y
        return y_TD.to(x_TD.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", trained={len(self.expert_ids)}/{self.num_experts}"
