"""The training engine on tiny upcycled models: loss falls, resume is exact, stops are clean."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_upcycled
from upcycle.config import from_dict
from upcycle.errors import UpcycleError
from upcycle.train import TrainConfig, TrainingDiverged, load_recipe, train
from upcycle.train.config import builtin_recipes, parse_value

WORDS = ("the king and queen of denmark speak to a ghost at night while the court sleeps and "
         "a prince who thinks too much considers whether to be or not to be").split()


def write_text(path, n_words: int = 1500, seed: int = 0) -> str:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12)))
    return str(path)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return make_upcycled(tmp_path_factory.mktemp("models") / "moe")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    write_text(root / "train.txt")
    write_text(root / "eval.txt", 300, seed=1)
    return root


def recipe(model, corpus, out, **kw) -> TrainConfig:
    raw = {
        "model": str(model), "out": str(out), "seed": 0,
        "data": {"kind": "text", "train": str(corpus / "train.txt"), "eval": str(corpus / "eval.txt"), "seq_len": 32},
        "batch_size": 4, "micro_batch_size": 2, "max_steps": 6, "log_every": 1, "eval_every": None,
        "save_every": None, "keep_last": None, "progress": False, "tensorboard": False,
        "optim": {"lr": 3e-3, "router_lr": 1e-2},
        "schedule": {"warmup_steps": 2, "decay": "cosine"},
    }
    for key, value in kw.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = from_dict(TrainConfig, raw)
    cfg.validate()
    return cfg


def rows(out, kind="train") -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def test_loss_falls_over_30_steps(tiny_moe, corpus, tmp_path):
    s = train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=30, eval_every=10))
    losses = [r["loss"] for r in rows(tmp_path / "run")]
    assert len(losses) == 30 and s["steps"] == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    evals = rows(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [10, 20, 30] and evals[-1]["loss"] < evals[0]["loss"]
    routing = rows(tmp_path / "run")[-1]["routing"]
    assert sorted(routing) == ["model.layers.2.mlp", "model.layers.3.mlp"]
    r = routing["model.layers.3.mlp"]
    assert math.isclose(sum(r["load"]), 1.0, abs_tol=1e-4) and r["load_min"] <= 1.0 <= r["load_max"]
    assert 0 < r["load_entropy"] <= 1.0 and r["dropped"] == 0.0
    # The final checkpoint is a loadable upcycled model.
    import upcycle

    model = upcycle.load(s["last_checkpoint"])
    assert model.config.upcycle["layer_ids"] == [2, 3]


def _weights(path) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


def stop_after(monkeypatch, step: int) -> None:
    """Make the run receive SIGTERM once it has done ``step`` steps (as a scheduler would send it)."""
    from upcycle.train.trainer import Trainer

    train_step = Trainer.train_step

    def step_then_signal(self):
        r = train_step(self)
        if self.step == step:
            signal.raise_signal(signal.SIGTERM)
        return r

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)


def test_resume_continues_the_same_loss_curve_bit_for_bit(tiny_moe, corpus, tmp_path, monkeypatch):
    # Dropout makes the RNG state part of what must be restored; log_every=3 with a stop at
    # step 4 makes the resumed run start in the middle of a logging window.
    kw = dict(max_steps=8, log_every=3, residual_dropout=0.1)
    train(recipe(tiny_moe, corpus, tmp_path / "a", **kw))
    stop_after(monkeypatch, 4)
    s = train(recipe(tiny_moe, corpus, tmp_path / "b", **kw))
    assert (s["stopped_by"], s["steps"]) == ("SIGTERM", 4)
    monkeypatch.undo()
    s = train(recipe(tiny_moe, corpus, tmp_path / "b", resume="auto", **kw))
    assert s["steps_this_run"] == 4
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in b] == [3, 6, 8]
    for key in ("loss", "grad_norm", "aux_loss", "routing"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa, wb = _weights(tmp_path / "a" / "checkpoints" / "step-000008"), _weights(tmp_path / "b" / "checkpoints" / "step-000008")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Only the newest checkpoint keeps the optimiser state; older ones are weights for selection.
    assert not (tmp_path / "b" / "checkpoints" / "step-000004" / "optimizer.pt").exists()
    with pytest.raises(UpcycleError, match="holds weights only"):
        train(recipe(tiny_moe, corpus, tmp_path / "c", resume=str(tmp_path / "b" / "checkpoints" / "step-000004"), **kw))
    with pytest.raises(UpcycleError, match="recipe changed seed"):
        train(recipe(tiny_moe, corpus, tmp_path / "b", resume="auto", seed=1, **kw))


def test_8bit_adamw_checkpoints_resume_bit_for_bit_and_another_optimizer_is_refused(tiny_moe, corpus, tmp_path,
                                                                                       monkeypatch):
    pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
    kw = dict(max_steps=4, optim__name="adamw_8bit")
    train(recipe(tiny_moe, corpus, tmp_path / "a", **kw))
    stop_after(monkeypatch, 2)
    train(recipe(tiny_moe, corpus, tmp_path / "b", **kw))
    monkeypatch.undo()
    train(recipe(tiny_moe, corpus, tmp_path / "b", resume="auto", **kw))
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    for key in ("loss", "grad_norm", "aux_loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    last = tmp_path / "b" / "checkpoints" / "step-000004"
    wa, wb = _weights(tmp_path / "a" / "checkpoints" / "step-000004"), _weights(last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The checkpoint holds the 8-bit moments themselves (the experts are past bitsandbytes' 4,096-element floor).
    state = torch.load(last / "optimizer.pt", weights_only=True)["state"]
    experts = [s for k, s in state.items() if k.endswith("experts.gate_up_proj")]
    assert len(experts) == 2
    for s in experts:
        q = next(v for v in s.values() if isinstance(v, dict))  # bitsandbytes nests its quantised state
        assert q["state1"].dtype == q["state2"].dtype == torch.uint8 and "absmax1" in q
    with pytest.raises(UpcycleError, match=r"^cannot resume from .*step-000004: its optimizer state is adamw_8bit's "
                                           r"and the recipe asks for adamw .*optim.name=adamw_8bit"):
        train(recipe(tiny_moe, corpus, tmp_path / "b", resume="auto", max_steps=5))


def _lrs(out) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in rows(out)}


def test_resume_with_a_changed_lr_or_a_longer_run_gets_what_a_fresh_run_gets_at_that_step(tiny_moe, corpus, tmp_path,
                                                                                         monkeypatch):
    # The two runs: 6 cosine steps at lr 1e-3, then resume=auto with optim.lr=5e-2 max_steps=10 (the old
    # base lr was logged: 1.27e-4, 1e-4, while recipe.yaml said 0.05), and resume=auto max_steps=10 alone (step 7
    # got the old run's last lr, 1e-4, where a fresh 10-step run has 3.25e-4).
    import yaml

    from upcycle.train import trainer as trainer_mod
    from upcycle.train.optim import lr_factor

    kw = dict(optim__lr=1e-3, optim__router_lr=None, optim__weight_decay=0.1, schedule__warmup_steps=0,
              schedule__min_lr_ratio=0.1)
    for name, new in (("longer", dict(max_steps=10)),
                      ("lr", dict(max_steps=10, optim__lr=5e-2, optim__weight_decay=0.01))):
        out = tmp_path / name
        train(recipe(tiny_moe, corpus, out, max_steps=6, **kw))
        seen = []
        run = trainer_mod.Trainer.run
        monkeypatch.setattr(trainer_mod.Trainer, "run", lambda self: (seen.append(self), run(self))[1])
        cfg = recipe(tiny_moe, corpus, out, resume="auto", **{**kw, **new})
        train(cfg)
        monkeypatch.undo()
        peak = cfg.optim.lr
        fresh = {s: peak * lr_factor(s - 1, 10, cfg.schedule) for s in range(7, 11)}
        got = _lrs(out)
        assert [got[s] for s in range(7, 11)] == [fresh[s] for s in range(7, 11)], (got, fresh)
        if name == "longer":
            assert got[7] == pytest.approx(3.25e-4, rel=1e-12)  # the fresh-run figure
        # What ran is what recipe.yaml says, and the run's log says what changed from which step.
        written = yaml.safe_load((out / "recipe.yaml").read_text())
        assert (written["optim"]["lr"], written["max_steps"]) == (peak, 10)
        changed = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["type"] == "resume"]
        assert changed == [{"type": "resume", "step": 6, "changed": {
            "max_steps": [6, 10], **({"optim.lr": [1e-3, 5e-2], "optim.weight_decay": [0.1, 0.01]} if name == "lr"
                                     else {})}}]
        groups = seen[0].optimizer.param_groups
        assert {g["weight_decay"] for g in groups if not g["name"].endswith("no_decay")} == {cfg.optim.weight_decay}
        assert all(g["initial_lr"] == peak for g in groups)
    # A resume that would end before its checkpoint's step is refused in one line, and so is a changed training set.
    with pytest.raises(UpcycleError, match=r"^cannot resume from .*step-000010: it is at step 10, and the recipe ends "
                                           r"at step 8 "):
        train(recipe(tiny_moe, corpus, tmp_path / "lr", resume="auto", max_steps=8, **kw))


def test_resume_refuses_a_training_set_that_changed(tiny_moe, corpus, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text((corpus / "train.txt").read_text())
    kw = dict(max_steps=2, data__train=str(text))
    train(recipe(tiny_moe, corpus, tmp_path / "run", **kw))
    text.write_text((corpus / "train.txt").read_text()[: -200])  # edited between the runs: same recipe, other data
    with pytest.raises(UpcycleError, match=r"^cannot resume from .*step-000002: the training set is not the one it "
                                           r"trained on \(documents 1, tokens \d+, sequences \d+ then, .* now"):
        train(recipe(tiny_moe, corpus, tmp_path / "run", resume="auto", **{**kw, "max_steps": 4}))


def test_a_single_text_file_is_evaluated_on_its_tail_or_the_run_says_it_will_not_be(tiny_moe, corpus, tmp_path):
    # One .txt file is one document, and 2% of one document is no document: eval_every never evaluated and the
    # run ended with final_eval null, saying nothing. Its last 2% by position is held out now.
    s = train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=4, eval_every=2, data__eval=None))
    assert [r["step"] for r in rows(tmp_path / "run", "eval")] == [2, 4] and s["final_eval"]["eval_tokens"] > 0
    report = json.loads((tmp_path / "run" / "data.json").read_text())
    assert report["eval"]["source"].endswith("(its last 0.02 by position: a single document)")
    train_text, full = report["train"]["tokens"] + report["eval"]["tokens"], len((corpus / "train.txt").read_text())
    assert train_text >= full  # every character in one split or the other (plus an EOS each)
    # Too short to hold anything out: said at the start.
    with pytest.warns(UserWarning, match=r"^no held-out data: data.train .* leaves nothing to hold out at "
                                         r"eval_fraction 1e-05; no evaluation will run \(every 2 steps nor at the end\)"):
        s = train(recipe(tiny_moe, corpus, tmp_path / "none", max_steps=2, eval_every=2, data__eval=None,
                         data__eval_fraction=1e-5))
    assert s["final_eval"] is None


def test_out_dir_holding_a_run_is_refused(tiny_moe, corpus, tmp_path):
    train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=1))
    with pytest.raises(UpcycleError, match="holds a run already"):
        train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=1))
    train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=2, overwrite=True))
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of bf16")
def test_bad_settings_found_late_still_write_nothing(tiny_moe, corpus, tmp_path):
    train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=1))
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    for kw, message in ((dict(precision="bf16"), "bf16 needs a GPU"), (dict(batch_size=4000), "fewer than batch_size")):
        with pytest.raises(UpcycleError, match=message):
            train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=1, overwrite=True, **kw))
        assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before
        with pytest.raises(UpcycleError, match=message):
            train(recipe(tiny_moe, corpus, tmp_path / "new", max_steps=1, **kw))
        assert not (tmp_path / "new").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_moe, corpus, tmp_path, monkeypatch):
    from upcycle.train.trainer import Trainer

    forward = Trainer._forward

    def poisoned(self, idx, training):
        ce, aux, n = forward(self, idx, training)
        return (ce * float("nan") if training and self.step == 3 else ce), aux, n

    monkeypatch.setattr(Trainer, "_forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4.*step-000002"):
        train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=6, save_every=2))
    steps = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert steps == ["last", "step-000002"]


def _wait_for_step(out, step: int, proc, timeout: float = 120):
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.isfile(path) and any(r.get("step", 0) >= step for r in rows(out)):
            return
        time.sleep(0.2)
    raise AssertionError("the run did not reach the step in time")


def _yaml(cfg: TrainConfig, path) -> str:
    from upcycle.train.config import to_yaml

    path.write_text(to_yaml(cfg))
    return str(path)


def test_sigterm_saves_a_checkpoint_and_resume_goes_on(tiny_moe, corpus, tmp_path):
    out = tmp_path / "run"
    cfg = recipe(tiny_moe, corpus, out, max_steps=100000, schedule__decay="constant")
    path = _yaml(cfg, tmp_path / "r.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "upcycle", "train", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout and "resume=auto" in stdout
    (step, ckpt), = [(int(n[5:]), n) for n in os.listdir(out / "checkpoints") if n.startswith("step-")]
    assert step >= 2 and (out / "checkpoints" / ckpt / "trainer_state.pt").is_file()
    r = subprocess.run([sys.executable, "-m", "upcycle", "train", path, f"max_steps={step + 2}", "resume=auto"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in rows(out)] == list(range(1, step + 3))


@pytest.mark.oldest
def test_recipes_validate_and_errors_list_valid_keys(tmp_path):
    assert {"continued_pretraining", "lima_sft", "lora_sft", "qlora_sft"} <= set(builtin_recipes())
    for name in builtin_recipes():
        load_recipe(name)
    lima = load_recipe("lima_sft")
    assert (lima.epochs, lima.optim.lr, lima.optim.betas, lima.optim.weight_decay) == (15, 1e-5, [0.9, 0.95], 0.1)
    assert (lima.schedule.decay, lima.schedule.warmup_steps, lima.schedule.min_lr_ratio) == ("linear", 0, 0.1)
    assert (lima.save_every_epoch, lima.save_from_epoch, lima.data.seq_len) == (True, 5, 2048)
    cfg = load_recipe("continued_pretraining", ["optim.lr=2e-5", "max_steps=7", "data.eval=null"])
    assert (cfg.optim.lr, cfg.max_steps, cfg.data.eval) == (2e-5, 7, None)
    assert load_recipe("lora_sft", ["max_steps=20"]).epochs is None  # one replaces the recipe's other
    assert parse_value("1e-4") == 1e-4 and parse_value("3") == 3 and parse_value("[a, b]") == ["a", "b"]
    with pytest.raises(UpcycleError, match="unknown key.*lrate.*valid keys: name, lr, router_lr"):
        load_recipe("continued_pretraining", ["optim.lrate=1"])
    with pytest.raises(UpcycleError, match="recipe.max_steps: expected"):
        load_recipe("continued_pretraining", ["max_steps=many"])
    with pytest.raises(UpcycleError, match="exactly one of max_steps and epochs"):
        load_recipe("continued_pretraining", ["epochs=2", "max_steps=3"])
    with pytest.raises(UpcycleError, match="multiple of micro_batch_size"):
        load_recipe("continued_pretraining", ["batch_size=6", "micro_batch_size=4"])
    with pytest.raises(UpcycleError, match="nf4.*needs a lora section"):
        load_recipe("continued_pretraining", ["nf4=true"])
    with pytest.raises(UpcycleError, match="recipe not found: nope .*lima_sft"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UpcycleError, match="not a mapping"):
        load_recipe(str(bad))


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "upcycle", "train", "continued_pretraining", "optim.lrate=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "valid keys" in r.stderr
    r = subprocess.run([sys.executable, "-m", "upcycle", "train", "--list"], capture_output=True, text=True)
    assert r.returncode == 0 and "lima_sft" in r.stdout
    r = subprocess.run([sys.executable, "-m", "upcycle", "train", "lima_sft", "--print-config", "epochs=2"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "\nepochs: 2\n" in r.stdout
    r = subprocess.run([sys.executable, "-m", "upcycle", "train", "continued_pretraining",
                        f"model={tmp_path}/missing", f"out={tmp_path}/out"], capture_output=True, text=True)
    assert r.returncode == 2 and "model not found" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tiny_moe, corpus, tmp_path, strategy):
    one = recipe(tiny_moe, corpus, tmp_path / "one", max_steps=10, micro_batch_size=1)
    train(one)
    two = recipe(tiny_moe, corpus, tmp_path / "two", max_steps=10, micro_batch_size=1, distributed=strategy)
    path = _yaml(two, tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "upcycle", "train", path], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 process(es)" in r.stdout
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(a) == len(b) == 10
    assert abs(a[-1]["loss"] - b[-1]["loss"]) < 1e-4, (a[-1]["loss"], b[-1]["loss"])
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-4
    # Routing telemetry counts the tokens of both processes.
    la, lb = a[-1]["routing"]["model.layers.3.mlp"]["load"], b[-1]["routing"]["model.layers.3.mlp"]["load"]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-3
    # The 2-process checkpoint is whole and resumes in one process.
    s = train(recipe(tiny_moe, corpus, tmp_path / "two", max_steps=12, micro_batch_size=1, resume="auto"))
    assert s["steps"] == 12


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("chat") / "chats.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            q = " ".join(rng.choice(WORDS) for _ in range(5))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {q}?"},
                                             {"role": "assistant", "content": f"{q} {i % 7}"}]}) + "\n")
    return path


def sft(model, chats, out, **kw) -> TrainConfig:
    cfg = recipe(model, chats.parent, out, data__kind="chat", data__train=str(chats), data__eval=None,
                 data__eval_fraction=0.1, data__seq_len=48, **kw)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("nf4", [pytest.param(False, marks=pytest.mark.oldest), True])
def test_lora_sft_saves_adapters_and_resumes_exactly(tiny_moe, chats, tmp_path, nf4, monkeypatch):
    from upcycle.adapters import describe_adapter

    lora = {"r": 4, "alpha": 8, "experts": True, "target_modules": ["q_proj", "v_proj"]}
    cfg = sft(tiny_moe, chats, tmp_path / "a", max_steps=6, lora=lora, nf4=nf4)
    s = train(cfg)
    ckpt = s["last_checkpoint"]
    info = describe_adapter(ckpt)
    assert info["expert_layers"] == 2 and info["r"] == 4 and os.path.realpath(info["base"]) == str(tiny_moe)
    assert not os.path.exists(os.path.join(ckpt, "model.safetensors"))  # adapter only
    losses = [r["loss"] for r in rows(tmp_path / "a")]
    assert losses[-1] < losses[0]
    stop_after(monkeypatch, 3)
    train(sft(tiny_moe, chats, tmp_path / "b", max_steps=6, lora=lora, nf4=nf4))
    monkeypatch.undo()
    train(sft(tiny_moe, chats, tmp_path / "b", max_steps=6, lora=lora, nf4=nf4, resume="auto"))
    assert [r["loss"] for r in rows(tmp_path / "b")] == losses
    a = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000006" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.oldest
def test_sft_trains_on_responses_only(tiny_moe, chats, tmp_path, monkeypatch):
    from upcycle.train.trainer import Trainer

    seen = []
    forward = Trainer._forward

    def spy(self, idx, training):
        if training:
            seen.extend(self.train_ds[k] for k in idx)
        return forward(self, idx, training)

    monkeypatch.setattr(Trainer, "_forward", spy)
    train(sft(tiny_moe, chats, tmp_path / "run", max_steps=2))
    im_start = 2  # conftest's character tokenizer: <|im_start|>
    for ex in seen:
        trained = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
        assert trained and im_start not in trained
        assert all(l in (-100, t) for t, l in zip(ex["input_ids"], ex["labels"]))
        assert ex["labels"][: ex["input_ids"].index(im_start, 1) + 1] == [-100] * (ex["input_ids"].index(im_start, 1) + 1)
