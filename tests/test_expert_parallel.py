"""Expert parallelism (torchrun on gloo): one process's losses, gradients and weights; checkpoints at any layout.

    PYTHONPATH=$PWD:$PWD/kernels python -m pytest -q tests/test_expert_parallel.py

Every comparison is against the one-process run with the same global batch and the same
micro-batches (accumulated there), so expert choice routes the same groups. Tolerances: see
``tests/tolerances.py`` (LAYOUT_*): the arithmetic is the one-process arithmetic in another order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_upcycled
from test_train import corpus, chats, recipe, rows, sft  # noqa: F401 (fixtures)
from tolerances import LAYOUT_GRAD_FP32, LAYOUT_LATER_GRAD_FP32, LAYOUT_LOSS_FP32, LAYOUT_WEIGHTS_FP32
from upcycle.errors import UpcycleError
from upcycle.train import train

WORKER = os.path.join(os.path.dirname(__file__), "ep_worker.py")
EPS = dict(optim__eps=1e-6)  # AdamW's eps: see LAYOUT_WEIGHTS_FP32


@pytest.fixture(scope="module")
def topk_moe(tmp_path_factory):
    return make_upcycled(tmp_path_factory.mktemp("models") / "topk", experts=4)


@pytest.fixture(scope="module")
def ec_moe(tmp_path_factory):
    return make_upcycled(tmp_path_factory.mktemp("models") / "ec", experts=4, routing="expert-choice")


def torchrun(nproc: int, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def run_worker(nproc: int, tmp_path, runs: list[dict]) -> None:
    """The trainer under torchrun, once per entry of ``runs`` ({"cfg": TrainConfig, "grads": bool, ...})."""
    spec = tmp_path / f"spec-{nproc}-{len(list(tmp_path.glob('spec-*')))}.json"
    spec.write_text(json.dumps({"runs": [{**{k: v for k, v in r.items() if k != "cfg"},
                                          "recipe": dataclasses.asdict(r["cfg"])} for r in runs]}))
    r = torchrun(nproc, WORKER, "train", spec)
    assert r.returncode == 0, r.stderr[-4000:]


def one_process(cfg) -> None:
    """The reference: the trainer in this process, recording the full gradient before every step."""
    from upcycle.train.trainer import Trainer

    t = Trainer(cfg)
    grads, step = [], t.optimizer.step

    def capture(*a, **k):
        grads.append(t.full_gradients())
        return step(*a, **k)

    t.optimizer.step = capture
    try:
        with warnings.catch_warnings():  # the scheduler notices the wrapped step; the order is unchanged
            warnings.filterwarnings("ignore", message=r"Seems like `optimizer.step\(\)` has been overridden")
            t.run()
    finally:
        from upcycle.train import distributed

        distributed.shutdown()
    torch.save(grads, os.path.join(cfg.out, "grads.pt"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``a`` (the reference)."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def assert_same_run(ref, other, steps: range | None = None, weights: str | None = "model.safetensors") -> None:
    """``other``'s run is ``ref``'s (a one-process run) to the layout tolerances: every logged step's losses
    and gradient norm, the first compared step's full gradients, the last checkpoint's weights."""
    a, b = {r["step"]: r for r in rows(ref)}, {r["step"]: r for r in rows(other)}
    steps = steps or range(1, max(b) + 1)
    for s in steps:
        for key in ("loss", "aux_loss", "grad_norm"):
            assert abs(a[s][key] - b[s][key]) <= LAYOUT_LOSS_FP32 * abs(a[s][key]), (s, key, a[s][key], b[s][key])
        la, lb = a[s]["routing"], b[s]["routing"]
        for layer in la:  # routing telemetry counts every rank's tokens
            assert max(abs(x - y) for x, y in zip(la[layer]["load"], lb[layer]["load"])) < 1e-6
    grads_ref = torch.load(os.path.join(ref, "grads.pt"))
    grads = torch.load(os.path.join(other, "grads.pt"))
    first = grads_ref[steps[0] - 1]
    g = grads[0]
    assert first.keys() == g.keys()
    worst = max(first, key=lambda k: rel(first[k], g[k]))
    tol = LAYOUT_GRAD_FP32 if steps[0] == 1 else LAYOUT_LATER_GRAD_FP32
    assert rel(first[worst], g[worst]) <= tol, (worst, rel(first[worst], g[worst]))
    if weights is None:
        return
    last = f"step-{steps[-1]:06d}"
    wa = load_file(os.path.join(ref, "checkpoints", last, weights))
    wb = load_file(os.path.join(other, "checkpoints", last, weights))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    worst = max(wa, key=lambda k: (wa[k] - wb[k]).abs().max().item())
    assert (wa[worst] - wb[worst]).abs().max().item() <= LAYOUT_WEIGHTS_FP32, (worst, (wa[worst] - wb[worst]).abs().max())


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_dispatch_matches_the_whole_block(tmp_path, nproc):
    # One MoE block, its 8 experts over 2 or 4 ranks: outputs, input and router gradients, and the experts'
    # gradients (every rank's tokens) equal the whole block run on each rank's micro-batch; top-K and expert
    # choice, loop and grouped_mm, with and without padding, LoRA on the experts; some experts get no token.
    r = torchrun(nproc, WORKER, "block", tmp_path / "block.pt")
    assert r.returncode == 0, r.stderr[-4000:]
    results = torch.load(tmp_path / "block.pt")
    assert len(results) == 10
    for case in results:
        assert case["max_diff"] <= LAYOUT_GRAD_FP32, case
        t = case["traffic"]
        assert t["forward"] == t["backward"] > 0, case  # the reverse exchange, in backward, moves the same rows
        # Expert choice on unpadded, same-shape micro-batches knows its counts: no count exchange.
        skipped = case["routing"] == "expert-choice" and not case["padded"]
        assert case["uniform"] == (not case["padded"]) and (t["counts"] == 0) == skipped, case


def test_training_on_two_ranks_matches_one_process(topk_moe, ec_moe, corpus, chats, tmp_path):
    # Top-K with DDP and gradient accumulation; expert choice with FSDP2 and activation checkpointing; a chat
    # set (padding) with LoRA on the experts and attention: each against one process with the same micro-batches.
    cases = {
        "topk": (recipe(topk_moe, corpus, tmp_path / "topk", max_steps=3, micro_batch_size=1, **EPS), {}),
        "ec": (recipe(ec_moe, corpus, tmp_path / "ec", max_steps=3, batch_size=8, **EPS),
               dict(distributed="fsdp", activation_checkpointing=True)),
        "lora": (sft(topk_moe, chats, tmp_path / "lora", max_steps=3, micro_batch_size=1, **EPS,
                     lora={"r": 4, "alpha": 8, "experts": True, "target_modules": ["q_proj", "v_proj"]}), {}),
    }
    runs = []
    for name, (cfg, kw) in cases.items():
        one_process(dataclasses.replace(cfg, out=str(tmp_path / f"{name}-one")))
        runs.append({"cfg": dataclasses.replace(cfg, out=str(tmp_path / f"{name}-ep"), expert_parallel=2, **kw),
                     "grads": True})
    run_worker(2, tmp_path, runs)
    assert_same_run(tmp_path / "topk-one", tmp_path / "topk-ep")
    assert_same_run(tmp_path / "ec-one", tmp_path / "ec-ep")
    assert_same_run(tmp_path / "lora-one", tmp_path / "lora-ep", weights="adapter_model.safetensors")
    # The checkpoints are the one-process ones: the same files, the same adapter config.
    for name in cases:
        a, b = (os.listdir(tmp_path / f"{name}-{w}" / "checkpoints" / "step-000003") for w in ("one", "ep"))
        assert sorted(a) == sorted(b)
    one, ep = (json.loads((tmp_path / f"lora-{w}" / "checkpoints" / "step-000003" / "adapter_config.json").read_text())
               for w in ("one", "ep"))
    assert one == ep
    import upcycle

    model = upcycle.load(str(tmp_path / "topk-ep" / "checkpoints" / "step-000003"))
    assert model.model.layers[3].mlp.experts.gate_up_proj.shape[0] == 4


@pytest.mark.slow
def test_four_ranks_and_resume_across_layouts(topk_moe, ec_moe, corpus, tmp_path):
    # World 4: expert 4 with FSDP2 (no expert replicas), expert 2 with DDP and with FSDP2 (experts on 2 replicas
    # each). The expert-4 run stops at step 2; its checkpoint, written in the one-process format, loads and is
    # written back bit for bit at world 2 / expert 2 and in one process, and resumes there on the same curve.
    kw = dict(max_steps=4, batch_size=8, micro_batch_size=1, save_every=None, **EPS)
    ref = recipe(topk_moe, corpus, tmp_path / "one", **kw)
    one_process(ref)
    ec = recipe(ec_moe, corpus, tmp_path / "ec-one", **{**kw, "max_steps": 2})
    one_process(ec)
    run_worker(4, tmp_path, [
        {"cfg": dataclasses.replace(ref, out=str(tmp_path / "ep4"), expert_parallel=4, distributed="fsdp"),
         "grads": True, "stop_after": 2},
        {"cfg": dataclasses.replace(ec, out=str(tmp_path / "ec-ep2"), expert_parallel=2), "grads": True},
        {"cfg": dataclasses.replace(ref, out=str(tmp_path / "ep2"), expert_parallel=2, distributed="fsdp"),
         "grads": True, "stop_after": 2},
    ])
    assert [r["step"] for r in rows(tmp_path / "ep4")] == [1, 2]
    assert_same_run(tmp_path / "one", tmp_path / "ep4", steps=range(1, 3), weights=None)
    assert_same_run(tmp_path / "one", tmp_path / "ep2", steps=range(1, 3), weights=None)
    assert_same_run(tmp_path / "ec-one", tmp_path / "ec-ep2")
    saved = tmp_path / "ep4" / "checkpoints" / "step-000002"
    for name in ("resave-2", "resume-2", "resave-1", "resume-1"):
        shutil.copytree(tmp_path / "ep4", tmp_path / name, symlinks=True)
    again = dict(resume="auto", max_steps=4)
    run_worker(2, tmp_path, [
        {"cfg": dataclasses.replace(ref, out=str(tmp_path / "resave-2"), expert_parallel=2, **again), "resave": True},
        {"cfg": dataclasses.replace(ref, out=str(tmp_path / "resume-2"), expert_parallel=2, distributed="ddp",
                                    **again), "grads": True},
    ])
    from upcycle.train.trainer import Trainer

    t = Trainer(dataclasses.replace(ref, out=str(tmp_path / "resave-1"), **again))
    t.save(t.step / t.steps_per_epoch, {"tokens": 0, "elapsed_s": 0.0, "window": {}})
    t.metrics.close()
    for name in ("resave-2", "resave-1"):  # weights and AdamW state through another layout: bit for bit
        back = tmp_path / name / "checkpoints" / "step-000002"
        wa, wb = load_file(saved / "model.safetensors"), load_file(back / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        oa, ob = (torch.load(p / "optimizer.pt", weights_only=True) for p in (saved, back))
        assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
        assert all(torch.equal(oa["state"][k][n], ob["state"][k][n]) for k in oa["state"] for n in oa["state"][k])
    one_process(dataclasses.replace(ref, out=str(tmp_path / "resume-1"), **again))
    for name in ("resume-2", "resume-1"):
        assert [r["step"] for r in rows(tmp_path / name)] == [1, 2, 3, 4]
        assert_same_run(tmp_path / "one", tmp_path / name, steps=range(3, 5))


def test_bad_layouts_are_one_line_before_anything_is_written(topk_moe, corpus, tmp_path):
    from upcycle.train.config import to_yaml

    cfg = recipe(topk_moe, corpus, tmp_path / "run", max_steps=1)
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(cfg))
    for override, message in (
        ("expert_parallel=2", "expert_parallel=2 needs a multiple of 2 processes (torchrun --nproc-per-node 2 ...), "
                              "this run has 1"),
        ("expert_parallel=3", f"expert_parallel=3 must divide the number of experts of every MoE layer; {topk_moe} "
                              "has 4"),
        ("expert_parallel=0", "expert_parallel must be a positive integer, got 0"),
    ):
        r = subprocess.run([sys.executable, "-m", "upcycle", "train", str(path), override], capture_output=True,
                           text=True)
        assert (r.returncode, r.stderr) == (2, f"upcycle: error: {message}\n"), r.stderr
    with pytest.raises(UpcycleError, match=r"^expert_parallel with experts_subset is not supported: an ESFT "):
        train(dataclasses.replace(cfg, expert_parallel=2, experts_subset=recipe(
            topk_moe, corpus, tmp_path / "x", experts_subset={"coverage": 0.5}).experts_subset))
    with pytest.raises(UpcycleError, match=r"^expert_parallel with optim.name=adamw_8bit is not supported"):
        train(dataclasses.replace(cfg, expert_parallel=2, optim=dataclasses.replace(cfg.optim, name="adamw_8bit")))
    # Under torchrun: a process says the line and exits 2 before the model loads (torchrun stops the others).
    r = torchrun(2, "-m", "upcycle", "train", path, "expert_parallel=4", timeout=300)
    lines = {x for x in r.stderr.splitlines() if x.startswith("upcycle: error:")}
    assert r.returncode != 0 and lines == {"upcycle: error: expert_parallel=4 needs a multiple of 4 processes "
                                           "(torchrun --nproc-per-node 4 ...), this run has 2"}, r.stderr[-2000:]
    assert "exitcode  : 2" in r.stderr
    assert not (tmp_path / "run").exists()


def test_nf4_experts_cut_to_a_range_keep_their_values():
    # QLoRA under expert parallelism: each rank's NF4 experts dequantise to exactly the rows of the whole
    # stack's, whether the range starts on a double-quantisation block (kept as is) or not (absmax decoded).
    from upcycle.adapters.qlora import NF4StackedExperts
    from upcycle.moe.experts import StackedExperts
    from upcycle.train.nf4_shard import shard_nf4

    torch.manual_seed(0)
    whole = NF4StackedExperts.from_experts(StackedExperts(8, 64, 96, gated=True, activation="silu"),
                                           shared_base=False)
    w = whole.expert_weights()
    double = {}
    for lo, hi in ((0, 4), (4, 8), (2, 4), (6, 8)):
        part, names = shard_nf4(whole, lo, hi)
        p = part.expert_weights()
        assert part.num_experts == hi - lo and names == []
        assert torch.equal(p.w_in_EMD, w.w_in_EMD[lo:hi]) and torch.equal(p.w_down_EDF, w.w_down_EDF[lo:hi])
        double[lo] = part.nf4("down_proj").double_quant
        x = torch.randn(5, 64)
        tok, exp = torch.arange(5), torch.tensor([0, 1, 0, hi - lo - 1, 1])
        ref = whole(x, tok, exp + lo, torch.ones(5))
        assert torch.equal(part(x, tok, exp, torch.ones(5)), ref)
    assert double == {0: True, 4: False, 2: False, 6: False}  # down_proj: 96 blocks an expert, 256 per scale
