"""Autotune configs of the grouped-GEMM kernels, and which of them fit the GPU they run on.

Each kernel's autotune list is a named function here. At launch, ``prune_*`` drops the
configs whose shared memory would exceed what one block may use on the running device
(``torch.cuda.get_device_properties(...).shared_memory_per_block_optin``), so triton never
compiles a config that cannot launch there. Whether a config fits is decided by
``shared_memory_bytes``, a model of what the triton compiler allocates;
``python -m upcycle_kernels.aot`` compiles every config for sm_80 / sm_90 / sm_100 on the
CPU and fails when that model and the compiler disagree.

Shape legend: see ``grouped_gemm.py``.
"""

from __future__ import annotations

import functools
import os

import triton

MAX_REGISTERS = 255
"""Registers one thread may hold on every NVIDIA GPU since sm_50 (more spill to local memory)."""

SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                           100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024}
"""Shared memory one block may opt into, by compute capability (CUDA programming guide, table
"technical specifications per compute capability"; an SM has 1 KB more, kept by the driver).
Used where no device can be asked: the AOT sweep. At launch the device itself is asked."""


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------ autotune configs
# Keyed on the problem shape (each kernel's ``key``). Under the interpreter there is exactly
# one small config: autotuning there would time meaningless CPU runs of every config.


def _cfg(bn, bk, warps, stages, bm=None):
    meta = {"BLOCK_N": bn, "BLOCK_K": bk}
    if bm is not None:
        meta["BLOCK_M"] = bm
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def row_tiled_configs():
    """Configs for the row-tiled kernels; BLOCK_M is fixed by the launcher's tile schedule."""
    if interpreting():
        return [_cfg(32, 32, 1, 1)]
    return [_cfg(bn, bk, w, s) for bn, bk, w, s in
            [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3), (64, 64, 8, 4), (128, 32, 8, 4)]]


def weight_grad_configs():
    """Configs for the per-expert ``L^T R`` kernel (BLOCK_K runs over the expert's rows)."""
    if interpreting():
        return [_cfg(32, 16, 1, 1, bm=32)]
    return [_cfg(bn, bk, w, s, bm=bm) for bm, bn, bk, w, s in
            [(64, 64, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
             (128, 128, 64, 8, 3), (128, 64, 64, 4, 3)]]


# ------------------------------------------------------------------ which configs fit


def shared_memory_bytes(kernel: str, block_m: int, block_n: int, block_k: int, num_stages: int, elem_bytes: int, *,
                        gated: bool, tensor_cores: bool, capability: int, nf4: bool = False) -> int:
    """An upper bound of the shared memory (bytes, dynamic + static) one program of ``kernel`` takes.

    The row-tiled kernels (``up``, ``scatter``, ``dh``) pipeline their K loop: a stage holds
    the row tile [BLOCK_M, BLOCK_K] and the weight tile [BLOCK_K, BLOCK_N] (two of them for a
    gated up projection). With wgmma / tcgen05 (sm_90+, 16-bit or tf32 operands) triton keeps
    ``num_stages`` stages in flight; with cp.async (sm_80, and fp32 at ieee precision, which
    runs on the FMA units) one fewer. sm_90+ adds 1 KB of static shared memory and barriers.
    ``weight_grad``'s loop, whose bounds come from memory, is not pipelined: ``num_stages``
    copies of its two tiles bound what it stages, loosely (the AOT sweep shows how loosely).
    ``nf4``: the weight tiles are decoded from NF4 codes (``grouped_gemm._load_w``): what the
    compiler stages per weight-tile element is then the fp32 absmax gather, ``num_stages - 1``
    times, plus one decoded tile in the compute dtype (fitted to the sm_80 / sm_90 compiles of
    triton 3.9: exact for bf16 in every config; the row tile is staged as for dense weights).
    ``python -m upcycle_kernels.aot`` checks the bound against every config it compiles.
    """
    extra = 1024 + 64 if capability >= 90 else 0
    if kernel == "weight_grad":
        return num_stages * (block_m * block_k + block_k * block_n) * elem_bytes + extra
    weights = 2 if kernel == "up" and gated else 1
    stages = max(num_stages if capability >= 90 and tensor_cores else num_stages - 1, 1)
    if nf4:
        per_weight_element = 4 * weights * max(num_stages - 1, 1) + elem_bytes
        return stages * block_m * block_k * elem_bytes + per_weight_element * block_k * block_n + extra
    return stages * (block_m * block_k + weights * block_k * block_n) * elem_bytes + extra


def config_shared_bytes(kernel: str, cfg, meta: dict, elem_bytes: int, capability: int) -> int:
    """``shared_memory_bytes`` of an autotune config under a launch's constexprs ``meta``."""
    k = {**meta, **cfg.kwargs}
    return shared_memory_bytes(kernel, k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], cfg.num_stages, elem_bytes,
                               gated=bool(k.get("GATED", False)),
                               tensor_cores=not (elem_bytes == 4 and k.get("PRECISION") == "ieee"),
                               capability=capability, nf4=bool(k.get("NF4", False)))


@functools.lru_cache(maxsize=None)
def device_limits(index: int) -> tuple[int, int]:
    """(compute capability as 90, shared memory one block may opt into) of CUDA device ``index``."""
    import torch

    props = torch.cuda.get_device_properties(index)
    cap = props.major * 10 + props.minor
    return cap, getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY_PER_BLOCK.get(cap, 48 * 1024)


def fitting_configs(kernel: str):
    """``prune_configs_by`` for ``kernel``'s autotuner: drops the configs that do not fit the device.

    The first argument of every kernel is its A operand (x, a, dy or L), whose width sets the
    tile bytes. If nothing fits (a GPU with far less shared memory), the smallest config is
    kept and triton's own out-of-resources error names the problem.
    """

    def prune(configs, named_args, **meta):
        if interpreting() or len(configs) < 2:
            return configs
        first = next(iter(named_args.values()))
        cap, limit = device_limits(first.device.index if first.device.index is not None else 0)
        size = {c: config_shared_bytes(kernel, c, meta, first.element_size(), cap) for c in configs}
        return [c for c in configs if size[c] <= limit] or [min(configs, key=size.get)]

    return {"early_config_prune": prune}
