"""Compile every kernel for real GPUs ahead of time, on the CPU: registers, spills, shared memory.

    python -m upcycle_kernels.aot                        # sm_80, sm_90 (+ sm_100 if the bundled ptxas has it)
    python -m upcycle_kernels.aot --arch sm_90 --kernel up dh --quick --json runs/aot.json

The interpreter the CPU tests use (TRITON_INTERPRET=1) accepts much that the GPU compiler
rejects. This runs the real one, ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
cap, 32))`` with the ``ptxas`` shipped in the triton wheel, for every kernel and autotune
config, and reads back registers per thread, local memory per thread (spills: what triton
calls ``n_spills``, times 4), shared memory, and the matrix instruction the kernel ended up
with (``wgmma`` on sm_90, ``tcgen05`` on sm_100, ``mma.sync`` on sm_80; ``fma`` for fp32 at
ieee precision). One table row per (kernel, config, target), over the specialisations.

Specialisations are those the launchers produce (``aot_specs.py``), each compiled with the
JIT's own specialisation and cache key. The default sweep compiles every config with the
base (bf16, gated, no bias, silu, saved pre-activations, 128-row tiles), with fp32 and at
the other call site, and every other value (fp16, tf32, each activation, bias, no saved z,
64-row tiles, non-gated, sizes that are not multiples of 16) once, with the first config:
282 compiles for three targets, about 6 minutes on 2 cores. ``--quick`` (CI): the base at
each call site, every config. ``--full``: the whole cross product (hours). ``--layer``:
what one experts layer launches, every config (on a GPU machine: fills triton's cache).

A config fits a target if its shared memory (dynamic + static) is at most what one block
may use there (``tuning.SHARED_MEMORY_PER_BLOCK``: 163 KB on sm_80, 227 KB on sm_90 and
sm_100) and it needs at most 255 registers. A config that does not fit must be one the
launch-time pruning (``tuning.shared_memory_bytes``) removes from that target's autotune
list. Exit status 1 if a compile fails, if pruning and the compiler disagree on whether a
config fits, or if pruning would leave a specialisation without any config.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict

from upcycle_kernels import aot_specs, tuning

TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
DEFAULT_ARCHS = ("sm_80", "sm_90", "sm_100")
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@functools.lru_cache(maxsize=None)
def ptxas_for(cap: int) -> tuple[str, str]:
    """(path, CUDA release) of the ptxas triton uses for compute capability ``cap``."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(cap)
    out = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+\.\d+)", out)
    return tool.path, release.group(1) if release else "?"


@functools.lru_cache(maxsize=None)
def ptxas_supports(cap: int) -> bool:
    """Whether the bundled ptxas assembles for ``cap`` (sm_100 needs CUDA >= 12.8)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    path, _ = ptxas_for(cap)
    ptx = f".version 8.7\n.target {sm_arch_from_capability(cap)}\n.address_size 64\n.visible .entry k() {{ ret; }}\n"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([path, f"--gpu-name={sm_arch_from_capability(cap)}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    return run.returncode == 0


def _mma_kind(ptx: str) -> str:
    for needle, name in (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma.sync")):
        if needle in ptx:
            return name
    return "fma"


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local bytes, static shared bytes) per thread / block, read by cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = _RESOURCES.search(out)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage: {out[-300:]}")
    regs, stack, static, local = map(int, m.groups())
    return regs, max(stack, local), static


def compile_one(job: tuple) -> dict:
    """Compile one (spec, config index, capability): the raw row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, ci, cap = job
    fn, configs = aot_specs.kernel_and_configs(spec.kernel)
    cfg = configs[ci]
    row = dict(kernel=spec.kernel, spec=spec.label, dtype=spec.dtype, config=aot_specs.config_label(cfg),
               config_index=ci, all_configs=spec.all_configs, target=f"sm_{cap}", ok=False)
    signature, constexprs, attrs = aot_specs.signature(fn, spec, cfg)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dict(spec.options))
    t0 = time.perf_counter()
    try:
        # triton prints a failing kernel's whole PTX to stdout: the row keeps the error, not the dump.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message=".*FP_FUSION.*")  # triton 3.9 on its default
            ck = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", cap, 32), options=options)
        regs, local, static = _resources(ck.asm["cubin"])
    except Exception as e:  # a failed compile is a result of the sweep, not the end of it
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        row.update(error=f"{type(e).__name__}: {' | '.join(lines[:3])}"[:400], seconds=time.perf_counter() - t0)
        return row
    shared = int(ck.metadata.shared) + static
    limit = tuning.SHARED_MEMORY_PER_BLOCK[cap]
    est = aot_specs.estimate(spec, cfg, cap)
    row.update(ok=True, seconds=round(time.perf_counter() - t0, 2), regs=regs, local=local, shared=shared,
               limit=limit, mma=_mma_kind(ck.asm["ptx"]), fits=shared <= limit and regs <= tuning.MAX_REGISTERS,
               estimate=est, kept=est is None or est <= limit)
    return row


def _jobs(specs, archs):
    for spec in specs:
        _, configs = aot_specs.kernel_and_configs(spec.kernel)
        indices = range(len(configs)) if spec.all_configs else [0]
        for ci in indices:
            for arch in archs:
                yield spec, ci, TARGETS[arch]


def run(archs, kernels, mode: str = "default", jobs: int | None = None, layers=()) -> list[dict]:
    """Compile what ``mode`` selects (quick | default | full) for ``archs``, or with ``layers`` what
    those experts layers launch (``aot_specs.layer_specs``); one raw row per compile."""
    if layers:
        specs = [s for layer in layers for s in aot_specs.layer_specs(layer) if s.kernel in kernels]
    else:
        specs = [s for k in kernels for s in aot_specs.specs(k, mode)]
    work = list(_jobs(list(dict.fromkeys(specs)), archs))
    # Slow compiles first (fp32, many warps' worth of accumulators), so no process idles at the end.
    work.sort(key=lambda w: (w[0].dtype != "fp32", not w[0].all_configs))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if jobs == 1:
        return [compile_one(w) for w in work]
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(compile_one, work, chunksize=1))


def check(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(problems, notes): a problem makes the exit status 1; a note is for the reader."""
    problems, notes = [], []
    kept: dict[tuple, int] = defaultdict(int)
    for r in rows:
        where = f"{r['kernel']} {r['config']} {r['target']} [{r['spec']}]"
        if not r["ok"]:
            problems.append(f"{where}: compile failed: {r['error']}")
            continue
        if r["all_configs"]:
            kept[(r["kernel"], r["spec"], r["target"])] += r["kept"]
        if r["estimate"] is not None and r["estimate"] < r["shared"]:
            problems.append(f"{where}: takes {r['shared']} B of shared memory, more than the launch-time bound "
                            f"{r['estimate']} B (tuning.shared_memory_bytes)")
        if not r["fits"] and r["kept"]:
            problems.append(f"{where}: needs {r['shared']} B of shared memory (limit {r['limit']}) or "
                            f"{r['regs']} registers, yet stays in the autotune list: it would fail at launch")
        if r["fits"] and not r["kept"]:
            notes.append(f"{where}: fits ({r['shared']} B) but is pruned at launch (bound {r['estimate']} B "
                         f"> {r['limit']} B)")
    for (kernel, spec, target), n in kept.items():
        if n == 0:
            problems.append(f"{kernel} {target} [{spec}]: no autotune config fits")
    return problems, notes


def table(rows: list[dict]) -> list[dict]:
    """One row per (kernel, config, target) over its specialisations: the bf16 ones' registers and
    spills (the production path), the most local memory of any and which, the most shared memory."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["config_index"], r["target"])].append(r)
    out = []
    order = lambda kv: (aot_specs.KERNELS.index(kv[0][0]), kv[0][1], int(kv[0][2][3:]))  # noqa: E731
    for (kernel, _, target), rs in sorted(groups.items(), key=order):
        done = [r for r in rs if r["ok"]]
        bf16 = [r for r in done if r["dtype"] == "bf16"] or done
        worst = max(done, key=lambda r: r["local"], default=None)
        too_big = [r for r in done if not r["fits"]]
        if len(done) < len(rs):
            fits = f"FAILED ({len(rs) - len(done)})"
        elif too_big:
            fits = "no: " + ", ".join(sorted({f"{r['spec']} {r['shared'] / 1024:.0f} KB"
                                              + (" (pruned)" if not r["kept"] else " (NOT pruned)") for r in too_big}))
        else:
            fits = "yes"
        out.append(dict(kernel=kernel, config=rs[0]["config"], target=target, specs=len(rs),
                        regs=max((r["regs"] for r in bf16), default=None),
                        local=max((r["local"] for r in bf16), default=None),
                        worst_local=f"{worst['local']} ({worst['spec']})" if worst and worst["local"] else "0",
                        shared=max((r["shared"] for r in done), default=None), limit=rs[0].get("limit"),
                        mma="/".join(sorted({r["mma"] for r in done})), fits=fits))
    return out


def _print_table(out: list[dict], log) -> None:
    log("| kernel | config | target | specs | bf16 regs | bf16 local B | most local B (spec) | smem KB (max) "
        "| mma | fits |")
    log("|---|---|---|---:|---:|---:|---|---:|---|---|")
    for t in out:
        smem = "-" if t["shared"] is None else f"{t['shared'] / 1024:.1f}"
        log(f"| {t['kernel']} | {t['config']} | {t['target']} | {t['specs']} | {t['regs']} | {t['local']} "
            f"| {t['worst_local']} | {smem} | {t['mma']} | {t['fits']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m upcycle_kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", choices=sorted(TARGETS), default=None,
                   help="targets (default: sm_80 sm_90, and sm_100 if the bundled ptxas assembles for it)")
    p.add_argument("--kernel", nargs="+", choices=aot_specs.KERNELS, default=list(aot_specs.KERNELS))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="the base specialisation at each call site, every config (CI)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full",
                      help="the whole cross product (hours)")
    p.add_argument("--layer", action="append", default=[], metavar="DTYPE:gated|plain:bias|no-bias:ACT[:BLOCK_M]",
                   help="instead of the sweep: what such an experts layer launches, every config (repeatable); "
                        "on a GPU machine this fills triton's cache for those launches")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    p.add_argument("--json", default=None, help="write every compile's numbers here")
    p.add_argument("--verbose", action="store_true", help="also print one line per compile")
    args = p.parse_args(argv)
    if tuning.interpreting():
        print("error: python -m upcycle_kernels.aot compiles for real GPUs; unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import triton

    archs = args.arch or [a for a in DEFAULT_ARCHS if a != "sm_100" or ptxas_supports(TARGETS[a])]
    unsupported = [a for a in archs if not ptxas_supports(TARGETS[a])]
    if unsupported:
        print(f"error: the ptxas bundled with triton {triton.__version__} cannot assemble for {', '.join(unsupported)}",
              file=sys.stderr)
        return 2
    mode_name = "layers " + " ".join(args.layer) if args.layer else args.mode or "default"
    tools = ", ".join(f"{a}: ptxas {ptxas_for(TARGETS[a])[1]}" for a in archs)
    sm100 = "supported" if ptxas_supports(100) else "not supported"
    print(f"# upcycle_kernels ahead-of-time compile, triton {triton.__version__} ({tools}; sm_100 {sm100}), "
          f"{mode_name} sweep", flush=True)
    t0 = time.perf_counter()
    try:
        rows = run(archs, args.kernel, mode_name, args.jobs, args.layer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    if args.verbose:
        for r in rows:
            print(json.dumps(r))
    summary = table(rows)
    _print_table(summary, print)
    problems, notes = check(rows)
    n_specs = len({(r["kernel"], r["spec"]) for r in rows})
    print(f"\n# {len(rows)} compiles ({len(summary)} kernel x config x target rows, {n_specs} specialisations) in "
          f"{wall:.0f} s with {args.jobs or os.cpu_count()} processes; {sum(not r['ok'] for r in rows)} failed; "
          f"{sum(r['ok'] and not r['fits'] for r in rows)} do not fit (all pruned at launch unless listed below)")
    if rows and any(r["ok"] for r in rows):
        top_regs = max((r for r in rows if r["ok"]), key=lambda r: (r["local"], r["regs"]))
        print(f"# most local memory (spills): {top_regs['kernel']} {top_regs['config']} {top_regs['target']} "
              f"[{top_regs['spec']}]: {top_regs['regs']} registers, {top_regs['local']} B/thread")
    for n in notes:
        print(f"note: {n}")
    for prob in problems:
        print(f"FAIL: {prob}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, archs=archs, mode=mode_name, seconds=wall, rows=rows,
                           table=summary, problems=problems, notes=notes), f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
