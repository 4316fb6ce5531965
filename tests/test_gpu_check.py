"""``make gpu-check`` (benchmarks/gpu_check.py) without a GPU: it imports and runs where the GPU machine does.

    python -m pytest -q tests/test_gpu_check.py

The lent GPU machine has neither ``datasets`` nor ``gguf`` and no registry to fetch them
from, so these run with both blocked: importing the packages and the check, and the check's
``--cpu-smoke`` run, which takes every stage through its code at toy sizes on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = textwrap.dedent("""
    import importlib.abc, sys

    class Absent(importlib.abc.MetaPathFinder):  # as on the GPU machine: these are not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("datasets", "gguf"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, Absent())
""")


def _python(code: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), **(env or {})}
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_packages_and_the_check_import_without_datasets_or_gguf():
    run = _python(textwrap.dedent("""
        import importlib.util, runpy
        import upcycle, upcycle_kernels, upcycle.cli, upcycle.data, upcycle.train
        from upcycle.train import load_recipe
        load_recipe("continued_pretraining", ["max_steps=1"])
        for name in ("gpu_check", "gpu_check_correctness", "gpu_check_training", "moe_layer"):
            runpy.run_path(f"benchmarks/{name}.py", run_name="not_main")
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("datasets", "gguf"))
        assert not leaked, leaked
        print("ok")
    """))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_without_a_gpu_the_gpu_stages_say_so(tmp_path):
    run = _python("import runpy; sys.argv[0] = 'gpu_check.py'; runpy.run_path('benchmarks/gpu_check.py', "
                  "run_name='__main__')", "--stages", "env,correctness,cuda-tests", "--out", str(tmp_path),
                  env={"CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    stages = {s["name"]: s for s in json.loads((tmp_path / "gpu-report.json").read_text())["stages"]}
    assert stages["env"]["status"] == "ok" and stages["env"]["data"]["versions"]["torch"]
    assert stages["correctness"]["status"] == "skipped" and stages["correctness"]["reason"] == "no CUDA"
    assert stages["cuda-tests"]["reason"] == "no CUDA"


def test_cpu_smoke_runs_every_stage_with_datasets_and_gguf_absent(tmp_path):
    run = _python("import runpy; sys.argv[0] = 'gpu_check.py'; runpy.run_path('benchmarks/gpu_check.py', "
                  "run_name='__main__')", "--cpu-smoke", "--out", str(tmp_path), timeout=900,
                  env={"CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["env", "compile", "correctness", "speed", "training", "cuda-tests"]
    for name in ("env", "correctness", "speed", "training"):
        assert stages[name]["status"] == "ok", (name, stages[name]["reason"], stages[name]["notes"])
    assert stages["compile"]["status"] in ("ok", "skipped")  # skipped only where triton lacks its NVIDIA backend
    assert stages["cuda-tests"] == {**stages["cuda-tests"], "status": "skipped", "reason": "no CUDA"}
    rows = stages["correctness"]["rows"]
    assert {r["dtype"] for r in rows} == {"bfloat16", "float32", "float16"} and all(r["ok"] for r in rows)
    assert any(r["case"].startswith("nf4") for r in rows) and any(r["case"] == "tiny-ec" for r in rows)
    assert {r["backend"] for r in stages["speed"]["rows"]} >= {"grouped_mm", "loop"}
    train = stages["training"]["rows"]
    assert {(r["recipe"], r["backend"]) for r in train} == {
        (recipe, backend) for recipe in ("continued_pretraining", "qlora_sft") for backend in ("triton", "grouped_mm")}
    assert all(r["steps"] == 2 and r["tokens_per_s"] > 0 for r in train)
    md = (tmp_path / "gpu-report.md").read_text()
    assert md.startswith("# GPU check") and "## training: ok" in md and "cuda-tests: skipped (no CUDA)" in md
