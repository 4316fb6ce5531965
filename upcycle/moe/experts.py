"""Stacked experts: E copies of one MLP shape, stored as 3-D tensors, run by a chosen backend.

Parameter names and layouts follow transformers v5 (they are the checkpoint contract):
gated ``gate_up_proj`` [E, 2F, D] (rows :F gate, F: up) and ``down_proj`` [E, D, F];
non-gated ``up_proj`` [E, F, D] and ``down_proj`` [E, D, F]; optional ``*_bias``.

Backends (one entry point, ``StackedExperts.forward``):

* ``loop``: the readable reference, one expert at a time.
* ``grouped_mm``: ``torch.nn.functional.grouped_mm`` over expert-sorted tokens (CPU and CUDA).
* ``triton``: the fused grouped-GEMM kernels of ``upcycle_kernels`` (CUDA; on the CPU only
  under ``TRITON_INTERPRET=1``, for tests). Imported only when this backend runs.
* ``auto``: the fastest one that supports the device, dtype and shapes: ``triton`` on CUDA,
  else ``grouped_mm``, else ``loop``.

Shape legend:
    T  tokens           D  hidden size         F  expert FFN size
    E  experts          A  assignments (token, expert) pairs
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from upcycle.errors import UpcycleError
from upcycle.moe.router import count_per_index

EXPERT_BACKENDS = ("auto", "loop", "grouped_mm", "triton")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_unsupported(dtype: torch.dtype, hidden: int, ffn: int) -> str | None:
    """Why ``grouped_mm`` cannot run these experts, or None if it can."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (needs torch >= 2.9)"
    if dtype not in _GROUPED_MM_DTYPES:
        return f"grouped_mm supports float32, bfloat16 and float16, not {str(dtype).removeprefix('torch.')}"
    # Every operand row (D or F elements, forward and backward) must start on a 16-byte boundary.
    per_row = 16 // dtype.itemsize
    if hidden % per_row or ffn % per_row:
        return (f"grouped_mm needs hidden and FFN sizes that are multiples of {per_row} in "
                f"{str(dtype).removeprefix('torch.')}, got hidden={hidden}, ffn={ffn}")
    return None


def triton_unsupported(dtype: torch.dtype, activation: str, device=None) -> str | None:
    """Why the ``triton`` backend cannot run these experts, or None if it can.

    ``device`` None skips the device check (weights not yet where they will run).
    """
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device is not None and torch.device(device).type != "cuda" and not interpreting:
        return (f"triton needs CUDA (the expert weights are on {torch.device(device).type}); "
                "set TRITON_INTERPRET=1 to run its kernels slowly on the CPU")
    try:  # only here: machines that never run triton never import it
        import upcycle_kernels
    except Exception as e:  # not only ImportError: a triton without a usable driver can fail to import otherwise
        return f"cannot import the triton kernels (upcycle_kernels): {e}"
    return upcycle_kernels.unsupported(dtype, activation)


def resolve_backend(name: str, dtype: torch.dtype, hidden: int, ffn: int, *, device=None,
                    activation: str = "silu") -> str:
    """The backend that will actually run: validates ``name`` and resolves ``auto``.

    ``device``: where the expert weights are (None: unknown yet, so ``auto`` takes the CPU
    rule and an explicit ``triton`` is not judged on its device).
    """
    if name not in EXPERT_BACKENDS:
        raise UpcycleError(f"unknown experts backend {name!r}; valid: {', '.join(EXPERT_BACKENDS)}")
    if name == "triton":
        why = triton_unsupported(dtype, activation, device)
        if why:
            raise UpcycleError(f"experts backend 'triton' cannot run here: {why}")
        return name
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if name == "auto" and on_cuda and triton_unsupported(dtype, activation, device) is None:
        return "triton"
    why = grouped_mm_unsupported(dtype, hidden, ffn)
    if name == "grouped_mm" and why:
        raise UpcycleError(f"experts backend 'grouped_mm' cannot run here: {why}")
    if name == "auto":
        # torch.compile's meta check of grouped_mm accepts bf16 only (eager CPU takes fp32 too).
        if why is None and dtype != torch.bfloat16 and torch.compiler.is_compiling():
            why = "grouped_mm under torch.compile needs bfloat16"
        return "loop" if why else "grouped_mm"
    return name


class StackedExperts(nn.Module):
    """E MLPs of one shape: ``y[t] = sum_a weight[a] * expert[expert_idx[a]](x[t])`` over a with token t."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_size: int,
        *,
        gated: bool,
        activation: str,
        bias: bool = False,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if activation not in ACT2FN:
            raise UpcycleError(f"unknown activation {activation!r}; transformers knows: {', '.join(sorted(ACT2FN))}")
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.gated, self.activation, self.has_bias = gated, activation, bias
        self.act_fn = ACT2FN[activation]
        E, D, Fn = num_experts, hidden_size, ffn_size
        kw = dict(dtype=dtype, device=device)
        up_rows = 2 * Fn if gated else Fn
        up_name = "gate_up_proj" if gated else "up_proj"
        self.register_parameter(up_name, nn.Parameter(torch.empty(E, up_rows, D, **kw)))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fn, **kw))
        if bias:
            self.register_parameter(f"{up_name}_bias", nn.Parameter(torch.empty(E, up_rows, **kw)))
            self.down_proj_bias = nn.Parameter(torch.empty(E, D, **kw))
        self.reset_parameters()
        self.backend = backend

    # One name for the first projection whichever layout: gate_up_proj or up_proj.
    @property
    def w_in_EMD(self) -> Tensor:
        return self.gate_up_proj if self.gated else self.up_proj

    @property
    def b_in_EM(self) -> Tensor | None:
        if not self.has_bias:
            return None
        return self.gate_up_proj_bias if self.gated else self.up_proj_bias

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        # Resolving now makes an unusable explicit choice fail at load, not mid-training. CPU
        # weights on a CUDA machine usually move later (``model.cuda()``): their device is
        # judged at forward instead.
        device = self.down_proj.device
        if device.type != "cuda" and torch.cuda.is_available():
            device = None
        resolve_backend(name, self.down_proj.dtype, self.hidden_size, self.ffn_size, device=device,
                        activation=self.activation)
        self._backend = name

    def resolved_backend(self) -> str:
        """The backend ``forward`` runs now (``auto`` resolved for the current device and dtype)."""
        return resolve_backend(self._backend, self.down_proj.dtype, self.hidden_size, self.ffn_size,
                               device=self.down_proj.device, activation=self.activation)

    def reset_parameters(self) -> None:
        # Like nn.Linear, per expert: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for w in (self.w_in_EMD, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1]) if w.shape[-1] else 0.0
            with torch.no_grad():
                w.uniform_(-bound, bound)
        if self.has_bias:
            nn.init.zeros_(self.b_in_EM)
            nn.init.zeros_(self.down_proj_bias)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
                f"gated={self.gated}, activation={self.activation!r}, bias={self.has_bias}, "
                f"backend={self._backend!r}")

    def forward(self, x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor, *,
                expert_major: bool = False) -> Tensor:
        """x [T, D], assignments [A] -> y [T, D] in x's dtype; tokens with no assignment get 0.

        ``expert_major``: the assignments come grouped by expert in expert order, A/E each
        (expert-choice routing); the triton backend then skips its sort. Not checked.
        """
        backend = self.resolved_backend()
        if backend == "triton":
            return self._forward_triton(x_TD, token_idx_A, expert_idx_A, weight_A, expert_major)
        run = {"loop": self._forward_loop, "grouped_mm": self._forward_grouped_mm}[backend]
        return run(x_TD, token_idx_A, expert_idx_A, weight_A)

    def _activate(self, h_NM: Tensor) -> Tensor:
        if self.gated:
            gate_NF, up_NF = h_NM.chunk(2, dim=-1)
            return self.act_fn(gate_NF) * up_NF
        return self.act_fn(h_NM)

    def _sort_by_expert(self, token_idx_A: Tensor, expert_idx_A: Tensor, weight_A: Tensor):
        order_A = torch.argsort(expert_idx_A, stable=True)
        counts_E = count_per_index(expert_idx_A, self.num_experts)
        return token_idx_A[order_A], expert_idx_A[order_A], weight_A[order_A], counts_E

    def _forward_loop(self, x_TD, token_idx_A, expert_idx_A, weight_A) -> Tensor:
        w_in, b_in = self.w_in_EMD, self.b_in_EM
        # float32 (or wider) accumulator: bf16 sums over K experts would round at every add.
        acc = torch.promote_types(torch.float32, w_in.dtype)
        y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
        tok_A, _, w_A, counts_E = self._sort_by_expert(token_idx_A, expert_idx_A, weight_A)
        # unbind once: indexing w[e] per expert would make autograd build a full [E, ...]
        # zero gradient per expert in backward (O(E^2) work).
        w_in_E, w_down_E = w_in.unbind(0), self.down_proj.unbind(0)
        b_in_E = b_in.unbind(0) if b_in is not None else None
        b_down_E = self.down_proj_bias.unbind(0) if self.has_bias else None
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            tok_N, w_N = tok_A[start:start + n], w_A[start:start + n]
            start += n
            x_ND = x_TD[tok_N].to(w_in.dtype)
            h_NF = self._activate(F.linear(x_ND, w_in_E[e], None if b_in_E is None else b_in_E[e]))
            out_ND = F.linear(h_NF, w_down_E[e], None if b_down_E is None else b_down_E[e])
            y_TD.index_add_(0, tok_N, out_ND.to(acc) * w_N.unsqueeze(-1).to(acc))
        return y_TD.to(x_TD.dtype)

    def _forward_grouped_mm(self, x_TD, token_idx_A, expert_idx_A, weight_A) -> Tensor:
        w_in, b_in = self.w_in_EMD, self.b_in_EM
        tok_A, exp_A, w_A, counts_E = self._sort_by_expert(token_idx_A, expert_idx_A, weight_A)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        x_AD = x_TD[tok_A].to(w_in.dtype)
        h_AM = _grad_contiguous(F.grouped_mm(x_AD, w_in.transpose(-2, -1), offs=offs_E))
        if b_in is not None:
            h_AM = h_AM + b_in[exp_A]
        h_AF = self._activate(h_AM)
        out_AD = _grad_contiguous(F.grouped_mm(h_AF, self.down_proj.transpose(-2, -1), offs=offs_E))
        if self.has_bias:
            out_AD = out_AD + self.down_proj_bias[exp_A]
        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        y_TD.index_add_(0, tok_A, out_AD.float() * w_A.unsqueeze(-1).float())
        return y_TD.to(x_TD.dtype)

    def _forward_triton(self, x_TD, token_idx_A, expert_idx_A, weight_A, expert_major: bool) -> Tensor:
        from upcycle_kernels import moe_experts

        return moe_experts(x_TD, token_idx_A, expert_idx_A, weight_A, self.w_in_EMD, self.down_proj, self.b_in_EM,
                           self.down_proj_bias if self.has_bias else None, activation=self.activation,
                           gated=self.gated, expert_major=expert_major)


class DerivedExpertWeights:
    """For StackedExperts subclasses whose first projection is derived, not stored (NF4,
    shared base): exposes it under its checkpoint name through ``w_in_EMD``."""

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


class _GradContiguous(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    grouped_mm's backward rejects gradients with zero strides, which is exactly what
    ``out.sum().backward()`` produces (an expanded scalar). The combine step after each
    GEMM happens to materialise its gradient today; this keeps any rewiring of it safe.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _grad_contiguous(x: Tensor) -> Tensor:
    return _GradContiguous.apply(x) if x.requires_grad else x
