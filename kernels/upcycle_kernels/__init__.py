"""upcycle_kernels: the experts' compute kernels (installed from ``kernels/upcycle_kernels``).

``reference`` holds the pure-PyTorch oracle that every faster backend is tested against.
"""
