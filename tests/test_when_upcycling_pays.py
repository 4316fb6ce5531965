"""The upcycling study's pipeline (benchmarks/when_upcycling_pays.py --quick): every stage runs, every
branch kind (top-K, Drop-Upcycling, expert choice, fine-grained with a shared expert, softmax-then-top-K
with weight scaling) converts, trains and is read at equal tokens and equal FLOPs; a fresh top-K upcycle
starts exactly where the dense model is; a finished study is not rerun, more branches or seeds run only
themselves, and a run directory is never mixed with other settings. The result itself is the CPU study's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "when_upcycling_pays.py")
QUICK = ["dense", "top2-E8", "drop-E8", "ec-C2-E8", "fg-E8G4-shared", "fg-E8G4-softmax"]

pytest.importorskip("tokenizers")


def _study(out, *args):
    return subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)


def _last_line(run):
    return run.stderr.strip().splitlines()[-1]


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
    assert list(by) == QUICK
    for r in by.values():
        assert all(math.isfinite(x) for x in r["loss"]) and r["tokens"] == sorted(r["tokens"])
        assert r["tokens"][0] == 0 and r["flops"][-1] == r["tokens"][-1] * r["flops_per_token"]
    # The dense branch runs longer (to be read at the MoE branches' FLOPs). Top-2 of whole copies costs
    # more per token; a fine-grained top-G upcycle (with or without a shared expert) only its routers more.
    assert by["dense"]["tokens"][-1] > by["top2-E8"]["tokens"][-1]
    ratio = {b: r["flops_per_token"] / by["dense"]["flops_per_token"] for b, r in by.items()}
    assert all(ratio[b] > 1.1 for b in ("top2-E8", "drop-E8", "ec-C2-E8"))
    assert all(1 < ratio[b] < 1.03 for b in ("fg-E8G4-shared", "fg-E8G4-softmax"))
    # A fresh top-K upcycle is the dense model (held-out loss at the branch point), fine-grained with a
    # shared expert too; Drop-Upcycling is not, softmax-then-top-K is close (a near-uniform router).
    for b in ("top2-E8", "fg-E8G4-shared"):
        assert by[b]["loss"][0] == pytest.approx(by["dense"]["loss"][0], abs=1e-5)
    assert abs(by["drop-E8"]["loss"][0] - by["dense"]["loss"][0]) > 1e-4  # (a base of 8 steps: close to init)
    assert 0 < abs(by["fg-E8G4-softmax"]["loss"][0] - by["dense"]["loss"][0]) < 0.05
    # Expert spread: 0 for copies, > 0 once trained, large from the start with re-initialised columns.
    assert by["top2-E8"]["spread"]["start"] == [0.0] == by["fg-E8G4-shared"]["spread"]["start"]
    assert list(by["top2-E8"]["spread"].values())[-1][0] > 0
    assert by["drop-E8"]["spread"]["start"][0] > 0.1
    assert set(by["ec-C2-E8"]["routing"]) >= {"load_max", "load_min", "router_entropy", "dead_experts"}
    # De-grouping is read over training for the fine-grained branches only.
    for b, r in by.items():
        assert ("degrouped" in r) == b.startswith("fg-")
    assert all(0 <= f <= 1 for f in by["fg-E8G4-shared"]["degrouped"]["fraction"])
    read = res["reads"]["fg-E8G4-softmax"]
    assert read["gap_flops"] == pytest.approx(read["loss"] - read["dense_flops"])
    report = (out / "report.md").read_text()
    assert run.stdout.endswith(report) and "| fg-E8G4-shared | 0 |" in report and "gap (equal FLOPs)" in report
    assert (out / "when_upcycling_pays.png").stat().st_size > 10_000
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    assert manifest["train"]["documents"] > 0 and manifest["eval"]["documents"] > 0


def test_a_finished_study_is_skipped_extended_seeded_or_refused(study):
    out, _ = study
    before = {r["branch"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    report = (out / "report.md").read_text()
    again = _study(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished earlier") == 1 + len(QUICK)  # the base and every branch
    assert again.stdout == report == (out / "report.md").read_text()  # nothing trained, the same report
    for args, message in ((["--set", "eval_every=3"], "other settings"), (["--set", "nope=1"], "expected FIELD=VALUE"),
                          (["--branches", "dense", "top2-E8@s1"], "must include dense@s1"),
                          (["--branches", "dense", "nope"], "expected NAME or NAME@sN"),
                          (["--branches", "dense", "top2-E8@s0"], "expected NAME or NAME@sN")):
        run = _study(out, *args)
        assert run.returncode != 0 and _last_line(run).startswith("error: ") and message in _last_line(run), args
    # Another seed of two branches: only they train; the report keeps every finished branch, each against
    # the dense branch of its seed, and a mean over seeds.
    seeded = _study(out, "--branches", "dense@s1", "fg-E8G4-shared@s1")
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    assert seeded.stderr.count(": training (") == 2
    res = json.loads((out / "results.json").read_text())
    assert [r["branch"] for r in res["results"]] == ["dense", "dense@s1", *QUICK[1:5], "fg-E8G4-shared@s1",
                                                     "fg-E8G4-softmax"]
    by = {r["branch"]: r for r in res["results"]}
    assert by["dense@s1"]["loss"][0] == by["dense"]["loss"][0]  # the same base
    assert by["dense@s1"]["loss"][1:] != by["dense"]["loss"][1:]  # another data order
    s1 = res["reads"]["fg-E8G4-shared@s1"]
    assert s1["dense_tokens"] == pytest.approx(by["dense@s1"]["loss"][len(by["fg-E8G4-shared@s1"]["loss"]) - 1])
    mean = res["means"]["fg-E8G4-shared"]
    assert mean["seeds"] == 2 and mean["gap_tokens"] == pytest.approx(
        (s1["gap_tokens"] + res["reads"]["fg-E8G4-shared"]["gap_tokens"]) / 2)
    assert "| **fg-E8G4-shared** | mean of 2 |" in (out / "report.md").read_text()
    # A larger budget continues every named branch from its last checkpoint; the learning rate is constant
    # there, so the curve so far is kept as it was. Branches not named stay out of the longer report.
    longer = _study(out, "--set", "branch_steps=6")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert longer.stderr.count("resuming") == len(QUICK) and "dense@s1: not reported" in longer.stderr
    after = {r["branch"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(after) == QUICK
    assert after["top2-E8"]["steps"] == 6 and after["dense"]["steps"] == math.ceil(6 * 1.35)
    for b in QUICK:
        r = before[b]
        assert after[b]["loss"][:len(r["loss"])] == r["loss"] and len(after[b]["loss"]) > len(r["loss"])
    shorter = _study(out, "--set", "branch_steps=4")
    assert shorter.returncode != 0 and "extended, not shortened" in _last_line(shorter)
