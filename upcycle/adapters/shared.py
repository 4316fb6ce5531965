"""Shared base for fresh experts: E identical experts stored once, seen as E zero-copy views.

A fresh upcycle (``expert_noise=0``) has E exact copies of the dense MLP per MoE layer. Under
LoRA the base is frozen, so the copies stay equal: ``SharedStackedExperts`` keeps ONE
``w_in`` [M, D] and ``w_down`` [D, F] (+ ``b_in`` [M], ``b_down`` [D]) and hands the one
experts forward (loop, grouped_mm, triton; ``upcycle.moe.compute``) ``expand(E, ...)`` views
of them (stride 0 on the expert dim), also under the checkpoint names (``gate_up_proj`` /
``up_proj``, ``down_proj``, their biases); the per-expert LoRA A / B make the experts differ. E times less memory for the base
weights of each upcycled layer.

    shared = SharedStackedExperts.from_experts(block.experts)   # UpcycleError unless identical
    apply_lora(model, LoraConfig(shared_base="auto"))             # the default: shares where it can
    shared_base_report(model)                                     # bytes before / after

Backends and the stride-0 views: the ``loop`` backend (``unbind``) and CPU ``grouped_mm``
(forward and backward) take them as they are; the triton kernels take per-expert strides
(the NF4 shared base already relies on it). An explicit CUDA ``grouped_mm`` backend gets
contiguous copies (as ``NF4StackedExperts`` does; its stride-0 support is not relied on): one
layer's [E, M, D] per forward there, kept for backward. Not checked on a GPU yet: LoRA with the
CUDA ``triton``/``auto`` backend runs the grouped_mm path on the stride-0 views
(torch checks only the last two strides, and takes the batch stride from the tensor).

Merging: ``merge_lora`` / ``merge_and_unload`` un-share first (``unshare_experts``: each
shared base becomes a plain ``StackedExperts`` with materialised per-expert weights, then
the per-expert updates are added); the memory saving is gone after a merge (the experts are
no longer equal), and ``unmerge`` leaves them unshared. Writing into the views in place
(``LoraExperts.merge()`` called directly) is refused by torch ("more than one element of the
written-to tensor refers to a single memory location"): merge through ``merge_lora``.
``unload_lora`` gives the shared bases back as they are (same outputs; ``unshare_experts`` to
materialise them).

Checkpoint contract: ``state_dict()`` shows the usual ``gate_up_proj`` [E, M, D] ... keys (as
expanded views) and ``load_state_dict`` takes them back (refusing experts that differ), so a
model with shared bases saves and loads like one without.

The shared weights are frozen parameters (``requires_grad=False``; a forward with them
trainable is an UpcycleError: training them would tie all experts' updates together).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from upcycle.adapters.qlora import NF4StackedExperts, experts_identical
from upcycle.errors import UpcycleError
from upcycle.moe.compute import ExpertWeights
from upcycle.moe.experts import DerivedExpertWeights, ExpertsBase, StackedExperts

__all__ = ["SharedStackedExperts", "share_experts", "shared_base_report", "unshare_experts"]


class SharedStackedExperts(DerivedExpertWeights, ExpertsBase):
    """Experts whose E members are one frozen weight (see the module docstring).

    Own parameters: ``w_in`` [M, D], ``w_down`` [D, F], with bias ``b_in`` [M], ``b_down`` [D].
    """

    is_shared_base = True

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, gated: bool, activation: str,
                 bias: bool = False, backend: str = "auto", dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self._init_shape(num_experts, hidden_size, ffn_size, gated=gated, activation=activation, bias=bias)
        M = self.in_rows
        kw = dict(dtype=dtype, device=device)
        self.w_in = nn.Parameter(torch.zeros(M, hidden_size, **kw), requires_grad=False)
        self.w_down = nn.Parameter(torch.zeros(hidden_size, ffn_size, **kw), requires_grad=False)
        if bias:
            self.b_in = nn.Parameter(torch.zeros(M, **kw), requires_grad=False)
            self.b_down = nn.Parameter(torch.zeros(hidden_size, **kw), requires_grad=False)
        self.register_state_dict_post_hook(_expand_state_dict)
        self._register_load_state_dict_pre_hook(_shrink_state_dict, with_module=True)
        self.backend = backend

    @classmethod
    def from_experts(cls, experts: StackedExperts) -> SharedStackedExperts:
        """One shared copy of ``experts`` (a clone: the original may be freed); UpcycleError unless all are equal."""
        if isinstance(experts, SharedStackedExperts):
            return experts
        if isinstance(experts, NF4StackedExperts) or getattr(experts, "is_quantized", False):
            raise UpcycleError("SharedStackedExperts takes unquantised StackedExperts; NF4 experts share their "
                               "base with NF4StackedExperts.from_experts(shared_base=...)")
        if not isinstance(experts, StackedExperts):
            raise UpcycleError(f"SharedStackedExperts.from_experts needs StackedExperts, got {type(experts).__name__}")
        if not experts_identical(experts):
            raise UpcycleError("a shared base needs experts that are exact copies of each other (a fresh upcycle, "
                               "expert_noise=0); these differ (use shared_base='auto' or False)")
        w_in = experts.w_in_EMD.detach()
        m = cls(experts.num_experts, experts.hidden_size, experts.ffn_size, gated=experts.gated,
                activation=experts.activation, bias=experts.has_bias, backend=experts.backend, dtype=w_in.dtype,
                device="meta")
        m.w_in = nn.Parameter(w_in[0].clone(), requires_grad=False)
        m.w_down = nn.Parameter(experts.down_proj.detach()[0].clone(), requires_grad=False)
        if experts.has_bias:
            b_in, b_down = experts.b_in_EM.detach(), experts.down_proj_bias.detach()
            if any(not torch.equal(b[e], b[0]) for b in (b_in, b_down) for e in range(1, b.shape[0])):
                raise UpcycleError("a shared base needs experts that are exact copies of each other; their biases "
                                   "differ (use shared_base='auto' or False)")
            m.b_in = nn.Parameter(b_in[0].clone(), requires_grad=False)
            m.b_down = nn.Parameter(b_down[0].clone(), requires_grad=False)
        m.backend = experts.backend  # judged again on the real device
        return m

    def unshared(self) -> StackedExperts:
        """A plain ``StackedExperts`` with E materialised copies (same values, backend, device, dtype)."""
        m = StackedExperts(self.num_experts, self.hidden_size, self.ffn_size, gated=self.gated,
                           activation=self.activation, bias=self.has_bias, backend=self._backend,
                           dtype=self.w_in.dtype, device="meta")
        with torch.no_grad():
            for ckpt, own in _own_keys(self).items():
                t = getattr(self, own)
                copies = t.unsqueeze(0).expand(self.num_experts, *t.shape).clone(memory_format=torch.contiguous_format)
                m.register_parameter(ckpt, nn.Parameter(copies, requires_grad=False))
        m.backend = self._backend
        return m

    # ---- the weights, as zero-copy [E, ...] views
    def _view(self, t: Tensor) -> Tensor:
        if t.requires_grad and torch.is_grad_enabled():
            raise UpcycleError("a shared expert base is frozen (training it would tie every expert's update): "
                               "call unshare_experts(model) before training the experts fully")
        v = t.unsqueeze(0).expand(self.num_experts, *t.shape)
        if v.dim() == 3 and v.is_cuda and self.resolved_backend() == "grouped_mm":
            v = v.contiguous()  # CUDA grouped_mm: stride-0 expert dim not relied on (see the module docstring)
        return v

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self._view(self.w_in), self._view(self.w_down),
                             self._view(self.b_in) if self.has_bias else None,
                             self._view(self.b_down) if self.has_bias else None)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.w_down.dtype

    @property
    def weight_device(self) -> torch.device:
        return self.w_down.device

    @property
    def base_nbytes(self) -> int:
        """Bytes of the stored base weights (and biases)."""
        return sum(p.nbytes for p in self.parameters(recurse=False))

    @property
    def unshared_nbytes(self) -> int:
        """Bytes the same experts take unshared (E copies)."""
        return self.base_nbytes * self.num_experts

    def extra_repr(self) -> str:
        return super().extra_repr() + ", shared_base=True"


def _own_keys(m: SharedStackedExperts) -> dict[str, str]:
    """Checkpoint key -> own parameter name."""
    keys = {m.up_name: "w_in", "down_proj": "w_down"}
    if m.has_bias:
        keys.update({f"{m.up_name}_bias": "b_in", "down_proj_bias": "b_down"})
    return keys


def _expand_state_dict(module: SharedStackedExperts, state_dict, prefix, local_metadata) -> None:
    for ckpt, own in _own_keys(module).items():
        t = state_dict.pop(prefix + own, None)
        if t is not None:
            state_dict[prefix + ckpt] = t.unsqueeze(0).expand(module.num_experts, *t.shape)


def _shrink_state_dict(module: SharedStackedExperts, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    for ckpt, own in _own_keys(module).items():
        t = state_dict.get(prefix + ckpt)
        if t is None or t.dim() == getattr(module, own).dim():
            continue
        if any(not torch.equal(t[e], t[0]) for e in range(1, t.shape[0])):
            raise UpcycleError(f"{prefix}{ckpt}: the experts in this state dict differ, a shared base cannot hold "
                               "them (load into plain StackedExperts)")
        state_dict[prefix + own] = state_dict.pop(prefix + ckpt)[0]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def share_experts(model: nn.Module, shared_base: bool | str = "auto") -> int:
    """Replace every unquantised ``StackedExperts`` in ``model`` by a ``SharedStackedExperts`` where they
    are identical (``"auto"``); True: all must be (else UpcycleError, before changing anything); False:
    none. Returns how many modules are shared now."""
    if shared_base not in (True, False, "auto"):
        raise UpcycleError(f"shared_base must be True, False or 'auto', got {shared_base!r}")
    if shared_base is False:
        return 0
    todo = [(n, m) for n, m in model.named_modules()
            if type(m) is StackedExperts]  # not NF4 (shares on its own), not already shared
    plan = []
    for name, m in todo:
        if experts_identical(m):
            plan.append(name)
        elif shared_base is True:
            raise UpcycleError(f"shared_base=True but the experts of {name} are not exact copies of each other "
                               "(a trained or noised upcycle); use shared_base='auto' or False")
    for name in plan:
        _replace(model, name, SharedStackedExperts.from_experts(model.get_submodule(name)))
    return sum(isinstance(m, SharedStackedExperts) for m in model.modules())


def unshare_experts(model: nn.Module) -> int:
    """Replace every ``SharedStackedExperts`` in ``model`` (also inside LoRA wrappers) by a plain
    ``StackedExperts`` with materialised per-expert weights; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, SharedStackedExperts)]
    for name in names:
        _replace(model, name, model.get_submodule(name).unshared())
    return len(names)


def shared_base_report(model: nn.Module) -> dict:
    """Bytes of the unquantised expert base weights (and biases): ``bytes_before`` (E copies per layer,
    as unshared) and ``bytes_after`` (as stored now), ``saved_bytes``, ``num_experts_modules``,
    ``num_shared``. NF4 experts are not counted here (``quantize_model`` reports them)."""
    rep = dict(num_experts_modules=0, num_shared=0, bytes_before=0, bytes_after=0)
    for m in model.modules():
        if isinstance(m, SharedStackedExperts):
            rep["num_shared"] += 1
            rep["bytes_before"] += m.unshared_nbytes
            rep["bytes_after"] += m.base_nbytes
        elif type(m) is StackedExperts:
            n = sum(p.nbytes for p in m.parameters(recurse=False))
            rep["bytes_before"] += n
            rep["bytes_after"] += n
        else:
            continue
        rep["num_experts_modules"] += 1
    rep["saved_bytes"] = rep["bytes_before"] - rep["bytes_after"]
    return rep


def format_shared_base_report(rep: dict) -> str:
    """One line for ``trainable_summary``."""
    ratio = rep["bytes_before"] / rep["bytes_after"] if rep["bytes_after"] else 1.0
    return (f"expert base: {rep['bytes_before']:,} -> {rep['bytes_after']:,} bytes "
            f"({rep['num_shared']}/{rep['num_experts_modules']} layers shared, {ratio:.1f}x less)")
