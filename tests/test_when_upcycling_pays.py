"""The upcycling study's pipeline (benchmarks/when_upcycling_pays.py --quick): every stage runs,
a fresh top-K upcycle starts exactly where the dense model is, a finished study is not rerun,
and a run directory is never mixed with other settings. The result itself is the CPU study's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "when_upcycling_pays.py")

pytest.importorskip("tokenizers")


def _study(out, *args):
    return subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("pays")
    run = _study(out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def test_every_stage_runs_and_reports(study):
    out, run = study
    res = json.loads((out / "results.json").read_text())
    by = {r["branch"]: r for r in res["results"]}
    assert list(by) == ["dense", "top2-E8", "drop-E8", "ec-C2-E8"]
    for r in by.values():
        assert all(math.isfinite(x) for x in r["loss"]) and r["tokens"] == sorted(r["tokens"])
        assert r["tokens"][0] == 0 and r["flops"][-1] == r["tokens"][-1] * r["flops_per_token"]
    # The dense branch runs longer (to be read at the MoE branches' FLOPs); the MoEs cost more per token.
    assert by["dense"]["tokens"][-1] > by["top2-E8"]["tokens"][-1]
    assert all(by[b]["flops_per_token"] > by["dense"]["flops_per_token"] for b in by if b != "dense")
    # A fresh top-K upcycle is the dense model (held-out loss at the branch point); Drop-Upcycling is not.
    assert by["top2-E8"]["loss"][0] == pytest.approx(by["dense"]["loss"][0], abs=1e-5)
    assert abs(by["drop-E8"]["loss"][0] - by["dense"]["loss"][0]) > 1e-4  # (a base of 8 steps: close to init)
    # Expert spread: 0 for copies, > 0 once trained, large from the start with re-initialised columns.
    assert by["top2-E8"]["spread"]["start"] == [0.0]
    assert list(by["top2-E8"]["spread"].values())[-1][0] > 0
    assert by["drop-E8"]["spread"]["start"][0] > 0.1
    assert set(by["ec-C2-E8"]["routing"]) >= {"load_max", "load_min", "router_entropy", "dead_experts"}
    report = (out / "report.md").read_text()
    assert run.stdout.endswith(report) and "| top2-E8 |" in report and "crosses dense" in report
    assert (out / "when_upcycling_pays.png").stat().st_size > 10_000
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    assert manifest["train"]["documents"] > 0 and manifest["eval"]["documents"] > 0


def test_a_finished_study_is_skipped_extended_or_refused(study):
    out, _ = study
    before = {r["branch"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    report = (out / "report.md").read_text()
    again = _study(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished earlier") == 5  # the base and four branches
    assert again.stdout == report == (out / "report.md").read_text()  # nothing trained, the same report
    for args, message in ((["--set", "eval_every=3"], "other settings"), (["--set", "nope=1"], "expected FIELD=VALUE")):
        run = _study(out, *args)
        assert run.returncode != 0 and run.stderr.strip().splitlines()[-1].startswith("error: ")
        assert message in run.stderr.strip().splitlines()[-1]
    # A larger budget continues every branch from its last checkpoint; the learning rate is
    # constant there, so the curve so far is kept as it was.
    longer = _study(out, "--set", "branch_steps=6")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert longer.stderr.count("resuming") == 4
    after = {r["branch"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert after["top2-E8"]["steps"] == 6 and after["dense"]["steps"] == math.ceil(6 * 1.35)
    for b, r in before.items():
        assert after[b]["loss"][:len(r["loss"])] == r["loss"] and len(after[b]["loss"]) > len(r["loss"])
    shorter = _study(out, "--set", "branch_steps=4")
    assert shorter.returncode != 0 and "extended, not shortened" in shorter.stderr.strip().splitlines()[-1]
