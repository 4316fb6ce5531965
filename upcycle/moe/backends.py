"""Which experts backend runs: names, what each needs, and the ``auto`` rule.

* ``loop``: the readable reference, one expert at a time (any dtype, any device).
* ``grouped_mm``: ``torch.nn.functional.grouped_mm`` over expert-sorted tokens (CPU and CUDA).
* ``triton``: the fused grouped-GEMM kernels of ``upcycle_kernels`` (CUDA; on the CPU only
  under ``TRITON_INTERPRET=1``, for tests). Imported only when this backend is asked for.
* ``auto``: ``triton`` on CUDA, else ``grouped_mm`` where dtype and shapes allow, else ``loop``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from upcycle.errors import UpcycleError

EXPERT_BACKENDS = ("auto", "loop", "grouped_mm", "triton")
log = logging.getLogger("upcycle")
_TOLD: set[str] = set()
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


def _kernels_lack(activation: str) -> bool:
    try:
        import upcycle_kernels
    except Exception:  # no usable triton: not an activation question
        return False
    return activation not in upcycle_kernels.ACTIVATIONS


def check_backend_name(name: str) -> None:
    if name not in EXPERT_BACKENDS:
        raise UpcycleError(f"unknown experts backend {name!r}; valid: {', '.join(EXPERT_BACKENDS)}")


def resolve_backend(name: str, dtype: torch.dtype, hidden: int, ffn: int, *, device=None,
                    activation: str = "silu") -> str:
    """The backend that will actually run: validates ``name`` and resolves ``auto``.

    ``device``: where the expert weights are (None: unknown yet, so ``auto`` takes the CPU
    rule and an explicit ``triton`` is not judged on its device).
    """
    check_backend_name(name)
    if name == "triton":
        why = triton_unsupported(dtype, activation, device)
        fusable = triton_unsupported(dtype, "silu", device) is None  # all else fine: only the activation is new
        if why and fusable and _kernels_lack(activation) and grouped_mm_unsupported(dtype, hidden, ffn) is None:
            # An activation the kernels do not fuse is no reason to stop: the next-fastest path runs it.
            if activation not in _TOLD:
                _TOLD.add(activation)
                log.info("the triton experts kernels do not fuse activation %r: those experts run on grouped_mm",
                         activation)
            return "grouped_mm"
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
