"""Ahead-of-time compile for real GPUs on the CPU (``upcycle_kernels.aot``), and what it relies on.

    python -m pytest -q tests/test_aot.py

The sweep itself runs in a subprocess: this process has TRITON_INTERPRET=1 (conftest.py),
under which the kernels are interpreter functions that no GPU compiler accepts. The whole
default sweep (``python -m upcycle_kernels.aot``) takes minutes; CI runs ``--quick``.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

upcycle_kernels = pytest.importorskip("upcycle_kernels", reason="triton is not installed")

from upcycle_kernels import aot_specs, launch, tuning  # noqa: E402


def _nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _nvidia_backend(), reason="triton has no NVIDIA backend here")
COMPILER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@needs_compiler
def test_quick_sweep_compiles_every_kernel_and_config_for_sm80_and_sm90(tmp_path, monkeypatch):
    report = tmp_path / "aot.json"
    run = subprocess.run([sys.executable, "-m", "upcycle_kernels.aot", "--quick", "--arch", "sm_80", "sm_90",
                          "--json", str(report)], env=COMPILER_ENV, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(report.read_text())
    rows = res["rows"]
    assert res["problems"] == [] and all(r["ok"] for r in rows)
    # Every kernel, every autotune config (the GPU lists, not this process's interpreter ones), both targets.
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    n_configs = {"up": len(tuning.row_tiled_configs()), "scatter": len(tuning.row_tiled_configs()),
                 "dh": len(tuning.row_tiled_configs()), "weight_grad": len(tuning.weight_grad_configs()), "nf4": 1}
    for kernel in aot_specs.KERNELS:
        for target in ("sm_80", "sm_90"):
            done = {r["config_index"] for r in rows if r["kernel"] == kernel and r["target"] == target}
            assert done == set(range(n_configs[kernel])), (kernel, target)
    # The tensor-core instruction of each target, read from the PTX: wgmma on Hopper, mma.sync on Ampere.
    gemm = [r for r in rows if r["kernel"] != "nf4"]
    assert {r["mma"] for r in gemm if r["target"] == "sm_90"} == {"wgmma"}
    assert {r["mma"] for r in gemm if r["target"] == "sm_80"} == {"mma.sync"}
    assert all(0 < r["regs"] <= tuning.MAX_REGISTERS for r in rows)
    # A config over a target's shared memory is one launch-time pruning drops there (NF4's gated up
    # projection 128x64 w8 s3 on sm_80: 176 KB of 163).
    assert all(r["shared"] <= r["limit"] or not r["kept"] for r in rows)
    assert [(r["kernel"], r["config"], r["target"]) for r in rows if r["shared"] > r["limit"]] == [
        ("up", "128x64 w8 s3", "sm_80")]
    # One table row per (kernel, config, target).
    assert len(res["table"]) == len({(r["kernel"], r["config_index"], r["target"]) for r in rows})
    assert "| up | 64x32 w4 s4 | sm_90 |" in run.stdout


@needs_compiler
def test_aot_refuses_the_interpreter_and_bad_layers():
    run = subprocess.run([sys.executable, "-m", "upcycle_kernels.aot", "--quick"], capture_output=True, text=True,
                         env={**COMPILER_ENV, "TRITON_INTERPRET": "1"}, timeout=120)
    assert run.returncode == 2 and "unset TRITON_INTERPRET" in run.stderr
    run = subprocess.run([sys.executable, "-m", "upcycle_kernels.aot", "--layer", "bf16:gated:silu"],
                         capture_output=True, text=True, env=COMPILER_ENV, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: --layer 'bf16:gated:silu': expected DTYPE:")


def test_layer_specs_are_the_launches_of_one_training_step():
    specs = aot_specs.layer_specs("bf16:gated:no-bias:silu:128")
    assert [(s.kernel, s.site) for s in specs] == [("up", "fwd"), ("up", "fwd"), ("scatter", "down"),
                                                   ("scatter", "dx"), ("dh", "bwd"), ("weight_grad", "w_in"),
                                                   ("weight_grad", "w_down")]
    assert {dict(s.constexprs).get("SAVE_Z") for s in specs if s.kernel == "up"} == {True, False}
    assert len(aot_specs.layer_specs("fp32:plain:bias:gelu")) == 2 * 5 + 2  # both tile heights


_SAME_KEY = textwrap.dedent("""
    # Compile one specialisation per kernel twice: as the AOT sweep does, and through the JIT's own
    # specialisation (warmup against a stand-in sm_90 driver). The same cache key means the sweep
    # compiled exactly what a launch compiles, and that a sweep on a GPU machine fills its cache.
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import driver
    from upcycle_kernels import aot_specs

    class Sm90:
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0

    DT = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32, "*i64": torch.int64,
          "*i32": torch.int32, "*u8": torch.uint8}
    for kernel in aot_specs.KERNELS:
        for spec in aot_specs.specs(kernel, "quick"):
            fn, configs = aot_specs.kernel_and_configs(kernel)
            cfg = configs[0]
            opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dict(spec.options))
            sig, const, attrs = aot_specs.signature(fn, spec, cfg)
            aot = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                 target=GPUTarget("cuda", 90, 32), options=opts)
            kw = {**dict(spec.constexprs), **cfg.kwargs}
            ptrs, ints = dict(spec.ptrs), dict(spec.ints)
            args = [DT[ptrs[n]] if n in ptrs else ints[n] for n in fn.arg_names if n not in kw]
            saved, driver._active = driver._active, Sm90()
            try:
                jit = fn.warmup(*args, grid=(1,), **opts, **kw)
            finally:
                driver._active = saved
            print(kernel, spec.label, aot.hash == jit.hash)
""")


@needs_compiler
def test_aot_compiles_exactly_what_the_jit_compiles():
    run = subprocess.run([sys.executable, "-c", _SAME_KEY], env=COMPILER_ENV, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) >= len(aot_specs.KERNELS) and all(ln.endswith("True") for ln in lines), run.stdout


# ---------------------------------------------------------------- the AOT list is what the launchers launch


def _key(kernel: str, constexprs: dict, ptrs: dict, ints: dict) -> tuple:
    """What makes a launch a distinct specialisation, less what only the interpreter or the shape decides
    (BLOCK_M: 16 under the interpreter, from ROW_TILE_HEIGHTS on a GPU; WIDEN; divisibility by 16)."""
    c = {k: v for k, v in constexprs.items() if k not in ("BLOCK_M", "WIDEN", "BLOCK_N", "BLOCK_K")}
    unit = tuple(sorted(k for k, v in ints.items() if v == 1))
    return kernel, tuple(sorted(c.items())), tuple(sorted(ptrs.items())), unit


class _Recorder:
    """Stands in for a ``@triton.jit`` / autotuned kernel: records each launch, then makes it."""

    NAMES = {"up_gather_kernel": "up", "scatter_gemm_kernel": "scatter", "dh_gather_kernel": "dh",
             "weight_grad_kernel": "weight_grad", "nf4_dequant_kernel": "nf4"}

    def __init__(self, attr, kernel, log):
        self.name, self.kernel, self.log = self.NAMES[attr], kernel, log

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            fn = self.kernel
            while hasattr(fn, "fn"):  # autotuner -> jitted (or interpreted) function -> Python function
                fn = fn.fn
            arg_names = list(inspect.signature(fn).parameters)
            names = [n for n in arg_names if n not in kwargs]
            ptrs = {n: "*" + aot_specs.DTYPE_NAMES[a.dtype] for n, a in zip(names, args) if isinstance(a, torch.Tensor)}
            ints = {n: a for n, a in zip(names, args) if not isinstance(a, torch.Tensor)}
            consts = {k: v for k, v in kwargs.items() if k in arg_names}
            self.log.append(_key(self.name, consts, ptrs, ints))
            return self.kernel[grid](*args, **kwargs)

        return launch_


def test_every_launch_is_in_the_aot_sweeps_domain(monkeypatch):
    from upcycle_kernels import grouped_gemm as gg
    from upcycle_kernels import nf4

    import upcycle

    log: list[tuple] = []
    proxy = types.SimpleNamespace(**{a: _Recorder(a, getattr(gg, a), log) for a in _Recorder.NAMES if hasattr(gg, a)})
    monkeypatch.setattr(launch, "gg", proxy)
    monkeypatch.setattr(nf4, "nf4_dequant_kernel", _Recorder("nf4_dequant_kernel", nf4.nf4_dequant_kernel, log))
    g = torch.Generator().manual_seed(0)
    T, D, Fn, E = 10, 24, 40, 4
    cases = [(torch.bfloat16, True, False, "silu", False), (torch.float32, False, True, "gelu", False),
             (torch.float16, True, True, "gelu_new", True), (torch.bfloat16, False, False, "relu", True)]
    for dtype, gated, bias, act, ec in cases:
        M = 2 * Fn if gated else Fn
        x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
        w_in = torch.randn(E, M, D, generator=g).to(dtype).requires_grad_()
        w_down = torch.randn(E, D, Fn, generator=g).to(dtype).requires_grad_()
        b_in = torch.randn(E, M, generator=g).to(dtype).requires_grad_() if bias else None
        b_down = torch.randn(E, D, generator=g).to(dtype).requires_grad_() if bias else None
        if ec:  # expert-major: every expert takes 5 tokens
            tok = torch.randperm(T, generator=g)[:5].repeat(E)
            exp = torch.arange(E).repeat_interleave(5)
        else:
            tok, exp = torch.arange(T).repeat_interleave(2), torch.randint(0, E, (2 * T,), generator=g)
        w = torch.rand(tok.numel(), generator=g).requires_grad_()
        y = upcycle_kernels.moe_experts(x, tok, exp, w, w_in, w_down, b_in, b_down, activation=act, gated=gated,
                                        expert_major=ec)
        y.float().sum().backward()
        with torch.no_grad():  # inference: no saved pre-activations
            upcycle_kernels.moe_experts(x, tok, exp, w, w_in, w_down, activation=act, gated=gated)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True  # fp32 -> "tf32"
    try:
        upcycle_kernels.moe_experts(torch.randn(T, D, generator=g), torch.arange(T),
                                    torch.randint(0, E, (T,), generator=g), torch.rand(T, generator=g),
                                    torch.randn(E, 2 * Fn, D, generator=g), torch.randn(E, D, Fn, generator=g),
                                    activation="silu", gated=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for double in (True, False):
            upcycle.dequantize_nf4(upcycle.quantize_nf4(torch.randn(9, 70, generator=g).to(dtype), double_quant=double),
                                   backend="triton")
    # NF4 experts (QLoRA's frozen base) on the triton backend: the kernels decode the weights' tiles.
    from upcycle.adapters.qlora import NF4StackedExperts
    from upcycle.moe import StackedExperts

    for dtype, gated, bias, double in ((torch.bfloat16, True, False, True), (torch.float32, False, True, False)):
        ex = StackedExperts(E, D, Fn, gated=gated, activation="silu", bias=bias)
        q = NF4StackedExperts.from_experts(ex, double_quant=double, compute_dtype=dtype)
        q.backend = "triton"
        x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
        tok, exp = torch.arange(T).repeat_interleave(2), torch.randint(0, E, (2 * T,), generator=g)
        q(x, tok, exp, torch.rand(2 * T, generator=g).requires_grad_()).float().sum().backward()
    domain = {_key(s.kernel, dict(s.constexprs), dict(s.ptrs), dict(s.ints))
              for k in aot_specs.KERNELS for s in aot_specs.specs(k, "full")}
    launched = set(log)
    assert {k[0] for k in launched} == set(aot_specs.KERNELS)
    missing = sorted(map(str, launched - domain))
    assert not missing, "launches the AOT sweep does not know:\n" + "\n".join(missing)
    # And the sweep's base specialisations are ones the launchers really make.
    for kernel in aot_specs.KERNELS:
        base = aot_specs.specs(kernel, "quick")[0]
        assert _key(base.kernel, dict(base.constexprs), dict(base.ptrs), dict(base.ints)) in launched, base.label


def test_block_m_on_a_gpu_is_one_of_the_compiled_heights(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    heights = {launch.block_m(rows, experts) for rows in (1, 100, 8192, 10**6) for experts in (1, 8, 128)}
    assert heights == set(launch.ROW_TILE_HEIGHTS)


# ---------------------------------------------------------------- launch-time pruning


def _prune(kernel, dtype, cap, limit, monkeypatch, **meta):
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "device_limits", lambda index: (cap, limit))
    configs = tuning.weight_grad_configs() if kernel == "weight_grad" else tuning.row_tiled_configs()
    prune = tuning.fitting_configs(kernel)["early_config_prune"]
    kept = prune(configs, {"x_ptr": torch.empty(0, dtype=dtype)}, **meta)
    return configs, kept


def test_configs_that_do_not_fit_are_pruned_per_device_and_dtype(monkeypatch):
    # What the AOT sweep finds on sm_80 (163 KB a block): two fp32 gated configs of the up
    # projection need 192 KB with 128-row tiles; every bf16 config fits.
    sm80 = dict(cap=80, limit=tuning.SHARED_MEMORY_PER_BLOCK[80])
    meta = dict(GATED=True, BLOCK_M=128, PRECISION="ieee")
    configs, kept = _prune("up", torch.float32, **sm80, monkeypatch=monkeypatch, **meta)
    dropped = [aot_specs.config_label(c) for c in configs if c not in kept]
    assert dropped == ["128x64 w8 s3", "64x64 w8 s4"]
    assert _prune("up", torch.bfloat16, **sm80, monkeypatch=monkeypatch, **meta)[1] == configs
    sm90 = dict(cap=90, limit=tuning.SHARED_MEMORY_PER_BLOCK[90])
    assert _prune("up", torch.float32, **sm90, monkeypatch=monkeypatch, **meta)[1] == configs
    # tf32 keeps one more stage in flight on Hopper than ieee fp32: more shared memory.
    tf32 = _prune("up", torch.float32, **sm90, monkeypatch=monkeypatch, **dict(meta, PRECISION="tf32"))[1]
    assert len(tf32) < len(configs)
    # A small-memory GPU (sm_86, 99 KB) keeps at least its smallest config.
    tiny = _prune("up", torch.float32, cap=86, limit=20 * 1024, monkeypatch=monkeypatch, **meta)[1]
    assert len(tiny) == 1


def test_pruning_is_off_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(tuning, "interpreting", lambda: True)
    configs = tuning.row_tiled_configs()
    prune = tuning.fitting_configs("up")["early_config_prune"]
    assert prune(configs, {"x_ptr": torch.empty(0)}, GATED=True, BLOCK_M=16, PRECISION="ieee") == configs


def test_shared_memory_bound_follows_the_pipeline():
    kw = dict(gated=True, tensor_cores=True)
    # up, bf16, 128-row tiles, BLOCK_N 64, BLOCK_K 32, 4 stages: x tile 8 KB + two weight tiles 4 KB each.
    per_stage = (128 * 32 + 2 * 32 * 64) * 2
    assert tuning.shared_memory_bytes("up", 128, 64, 32, 4, 2, capability=90, **kw) == 4 * per_stage + 1088
    assert tuning.shared_memory_bytes("up", 128, 64, 32, 4, 2, capability=80, **kw) == 3 * per_stage
    assert tuning.shared_memory_bytes("scatter", 128, 64, 32, 4, 2, capability=90, **kw) < 4 * per_stage
