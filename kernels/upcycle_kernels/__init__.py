"""upcycle_kernels: the experts' compute kernels, installed from ``kernels/upcycle_kernels``.

The Triton grouped-GEMM kernels (the ``triton`` experts backend) live here. The pure
PyTorch paths they are tested against are the ``loop`` and ``grouped_mm`` backends of
``upcycle.moe.experts``; nothing here is imported unless the ``triton`` backend is used.

Layers, each calling only the one below (DESIGN.md section 5):

* ``grouped_gemm``: the ``@triton.jit`` kernels and their autotune configs
* ``launch``: shape checks, allocation, tile schedule, grid
* ``ops``: ``torch.library`` custom ops (``upcycle_kernels::experts_*``) with fake impls
* ``autograd``: ``MoEExpertsFunction`` and the entry point ``moe_experts``

To run the kernels without a GPU set ``TRITON_INTERPRET=1`` before triton is imported
(slow: small shapes only).
"""

from upcycle_kernels.activations import ACTIVATIONS, activation_code
from upcycle_kernels.autograd import (
    SUPPORTED_DTYPES,
    MoEExpertsFunction,
    MoEExpertsNF4Function,
    expert_offsets,
    moe_experts,
    unsupported,
)
from upcycle_kernels.launch import NF4Weight
from upcycle_kernels.tuning import interpreting

__all__ = [
    "ACTIVATIONS",
    "MoEExpertsFunction",
    "MoEExpertsNF4Function",
    "NF4Weight",
    "SUPPORTED_DTYPES",
    "activation_code",
    "expert_offsets",
    "interpreting",
    "moe_experts",
    "unsupported",
]
