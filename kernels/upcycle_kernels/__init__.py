"""upcycle_kernels: the experts' compute kernels, installed from ``kernels/upcycle_kernels``.

The Triton grouped-GEMM kernels (the ``triton`` experts backend) live here. The pure
PyTorch paths they are tested against are the ``loop`` and ``grouped_mm`` backends of
``upcycle.moe.experts``; nothing here is imported unless the ``triton`` backend is used.
"""
