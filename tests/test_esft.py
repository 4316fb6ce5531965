"""Expert-specialised fine-tuning (``experts_subset``): choose, train only the chosen experts, save and rebuild."""

from __future__ import annotations

import json
import os
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_train import corpus, recipe, rows, stop_after, tiny_moe  # noqa: F401  (fixtures)
from upcycle.errors import UpcycleError
from upcycle.moe.experts import StackedExperts
from upcycle.moe.subset import SubsetExperts
from upcycle.train import load_recipe, train
from upcycle.train.esft import choose_experts


def _cfg(**kw):
    base = dict(by="load", coverage=None, top=None)
    return types.SimpleNamespace(**{**base, **kw})


def test_choice_is_the_smallest_set_reaching_the_coverage_or_the_top_n():
    stats = {"a.experts": {"load": [0.1, 0.5, 0.3, 0.1, 0.0], "tokens": [9, 1, 3, 3, 0]},
             "b.experts": {"load": [0.0, 0.0, 0.0, 0.0, 0.0], "tokens": [0, 0, 0, 0, 0]}}
    assert choose_experts(stats, _cfg(coverage=0.8)) == {"a.experts": [1, 2], "b.experts": []}
    # Ties go to the lower id; nothing that received no load is ever chosen, even at coverage 1.
    assert choose_experts(stats, _cfg(coverage=0.85)) == {"a.experts": [0, 1, 2], "b.experts": []}
    assert choose_experts(stats, _cfg(coverage=1.0))["a.experts"] == [0, 1, 2, 3]
    assert choose_experts(stats, _cfg(top=2, by="tokens"))["a.experts"] == [0, 2]
    assert choose_experts(stats, _cfg(top=9))["a.experts"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("expert_major", [False, True])
def test_subset_experts_compute_what_the_plain_experts_compute(backend, expert_major):
    torch.manual_seed(0)
    E, D, Fn, T = 6, 32, 48, 20
    plain = StackedExperts(E, D, Fn, gated=True, activation="silu", bias=True, backend=backend)
    with torch.no_grad():
        plain.gate_up_proj_bias.normal_()
        plain.down_proj_bias.normal_()
    sub = SubsetExperts.from_experts(plain, [4, 1])
    assert sub.expert_ids == [1, 4] and sub.frozen_ids == [0, 2, 3, 5]
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == [
        "trained.gate_up_proj", "trained.down_proj", "trained.gate_up_proj_bias", "trained.down_proj_bias"]
    if expert_major:  # every expert takes 3 tokens, grouped by expert
        tok = torch.randperm(T)[:3].repeat(E)
        exp = torch.arange(E).repeat_interleave(3)
    else:
        tok, exp = torch.arange(T).repeat_interleave(2), torch.randint(0, E, (2 * T,))
    w = torch.rand(tok.numel())
    x = torch.randn(T, D, requires_grad=True)
    y_ref = plain(x, tok, exp, w, expert_major=expert_major)
    y = sub(x, tok, exp, w, expert_major=expert_major)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)  # fp32: only the order of the per-token sum differs
    g = torch.randn_like(y)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, plain.gate_up_proj, plain.down_proj_bias), g)
    dx, dw, db = torch.autograd.grad(y, (x, sub.trained.gate_up_proj, sub.trained.down_proj_bias), g)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, dw_ref[[1, 4]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, db_ref[[1, 4]], rtol=1e-5, atol=1e-6)
    merged = sub.merged()
    assert all(torch.equal(a, b) for a, b in zip(merged.parameters(), plain.parameters()))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_bf16_subset_experts_round_once_like_the_plain_experts(backend):
    # Two experts per token: a float32 sum of two terms does not depend on their order, so the subset's
    # output must be the plain experts' bit for bit (the parts rounded to bf16 before adding were one bf16
    # step off in about a fifth of the outputs).
    torch.manual_seed(0)
    E, D, Fn, T = 6, 32, 48, 256
    plain = StackedExperts(E, D, Fn, gated=True, activation="silu", backend=backend, dtype=torch.bfloat16)
    sub = SubsetExperts.from_experts(plain, [1, 4])
    tok = torch.arange(T).repeat_interleave(2)
    exp = torch.stack([torch.randperm(E)[:2] for _ in range(T)]).reshape(-1)
    w = torch.rand(2 * T)
    x = torch.randn(T, D, dtype=torch.bfloat16)
    with torch.no_grad():
        want, got = plain(x, tok, exp, w), sub(x, tok, exp, w)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@torch.no_grad()
def test_routing_sample_is_float32_under_autocast():
    # ESFT's sample runs under the training autocast (bf16 on a GPU): its loads must be the float32
    # routing's. Embeddings then one MoE block: the router's input is the same float32 either way.
    from torch import nn

    from upcycle.config import MoEConfig
    from upcycle.moe.block import MoEBlock
    from upcycle.train.esft import route_sample

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(64, 576)
            self.block = MoEBlock(MoEConfig(num_experts=8), 576, 32, gated=True, activation="silu", backend="loop")
            self.block.router.weight.normal_(0, 0.02)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            return h + self.block(h)

    model = Tiny()
    g = torch.Generator().manual_seed(1)
    sample = [{"input_ids": torch.randint(0, 64, (512,), generator=g).tolist()} for _ in range(8)]
    kw = dict(micro_batch_size=4, pad_id=0, device="cpu")
    want = route_sample(model, sample, **kw)
    got = route_sample(model, sample, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16), **kw)
    assert got == want and sum(want["block.experts"]["tokens"]) == 8 * 512 * 2


def test_bad_experts_subset_settings_are_one_line_errors():
    with pytest.raises(UpcycleError, match="exactly one of coverage .* and top"):
        load_recipe("continued_pretraining", ["experts_subset.coverage=0.8", "experts_subset.top=2"])
    with pytest.raises(UpcycleError, match="unknown key.*cover; valid keys: by, coverage, top, sample"):
        load_recipe("continued_pretraining", ["experts_subset.cover=0.8"])
    with pytest.raises(UpcycleError, match="experts_subset.coverage must be in"):
        load_recipe("continued_pretraining", ["experts_subset.coverage=1.5"])
    with pytest.raises(UpcycleError, match="experts_subset.by: expected one of"):
        load_recipe("continued_pretraining", ["experts_subset.by=gate", "experts_subset.top=2"])
    with pytest.raises(UpcycleError, match="train_router is for full fine-tuning"):
        load_recipe("lora_sft", ["experts_subset.top=2", "experts_subset.train_router=true"])
    with pytest.raises(UpcycleError, match="needs lora.experts: true"):
        load_recipe("lora_sft", ["experts_subset.top=2", "lora.experts=false"])
    with pytest.raises(UpcycleError, match="checkpoint: full with experts_subset"):
        load_recipe("continued_pretraining", ["experts_subset.top=2", "checkpoint=full"])


def test_full_esft_trains_only_the_chosen_experts_and_merges_back(tiny_moe, corpus, tmp_path, capsys,  # noqa: F811
                                                                  monkeypatch):
    import upcycle
    from upcycle.adapters import merge_command
    from upcycle.train import trainer as trainer_mod

    seen = []
    run = trainer_mod.Trainer.run
    monkeypatch.setattr(trainer_mod.Trainer, "run", lambda self: (seen.append(self), run(self))[1])
    s = train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=8, experts_subset={"coverage": 0.6, "sample": 16}))
    # In the trained model itself: the frozen stacks are in no optimizer group and still the base's rows.
    t = seen[0]
    optimized = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    base = upcycle.load(str(tiny_moe))
    subsets = {n: m for n, m in t.model.named_modules() if isinstance(m, SubsetExperts)}
    assert len(subsets) == 2
    for name, m in subsets.items():
        assert not any(id(p) in optimized for p in m.frozen.parameters())
        b = base.get_submodule(name)
        assert torch.equal(m.frozen.gate_up_proj, b.gate_up_proj[m.frozen_ids])
        assert torch.equal(m.frozen.down_proj, b.down_proj[m.frozen_ids])
    table = capsys.readouterr().out
    assert "experts subset (ESFT): by load, coverage 0.6" in table and "| model.layers.3.mlp |" in table
    rec = json.loads((tmp_path / "run" / "experts_subset.json").read_text())
    choice = rec["experts"]
    assert sorted(choice) == ["model.layers.2.mlp.experts", "model.layers.3.mlp.experts"]
    assert all(0 < len(ids) < 4 for ids in choice.values()), choice
    losses = [r["loss"] for r in rows(tmp_path / "run")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # The checkpoint holds the trained experts' rows and nothing else.
    ckpt = s["last_checkpoint"]
    assert sorted(f for f in os.listdir(ckpt) if f.endswith((".json", ".safetensors")) and "token" not in f) == [
        "esft_config.json", "esft_model.safetensors"]
    saved = load_file(os.path.join(ckpt, "esft_model.safetensors"))
    assert sorted(saved) == sorted(f"{n}.{p}" for n in choice for p in ("gate_up_proj", "down_proj"))
    assert all(saved[f"{n}.down_proj"].shape[0] == len(ids) for n, ids in choice.items())
    from upcycle.cli import main as cli

    cli(["inspect", ckpt])
    assert f"trained_experts          {sum(map(len, choice.values()))}" in capsys.readouterr().out
    # upcycle.load rebuilds the model: frozen experts bit for bit the base's, trained ones changed, the rest equal.
    base, tuned = upcycle.load(str(tiny_moe)), upcycle.load(ckpt)
    for name, ids in choice.items():
        b, t = base.get_submodule(name), tuned.get_submodule(name)
        for e in range(4):
            same = torch.equal(b.gate_up_proj[e], t.gate_up_proj[e]) and torch.equal(b.down_proj[e], t.down_proj[e])
            assert same == (e not in ids), (name, e)
    tuned_sd = tuned.state_dict()
    assert all(torch.equal(v, tuned_sd[k]) for k, v in base.state_dict().items() if ".experts." not in k)
    # upcycle merge writes the same model as a whole checkpoint.
    r = merge_command(ckpt, str(tmp_path / "merged"))
    assert r["merged_experts"] == sum(map(len, choice.values()))
    merged = upcycle.load(str(tmp_path / "merged")).state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in tuned_sd.items())
    # A damaged checkpoint (a trained tensor gone) is refused, not loaded halfway.
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights = load_file(bad / "esft_model.safetensors")
    del weights["model.layers.3.mlp.experts.down_proj"]
    save_file(weights, bad / "esft_model.safetensors")
    with pytest.raises(UpcycleError, match="lacks model.layers.3.mlp.experts's trained down_proj"):
        upcycle.load(str(bad))


def test_esft_base_is_found_by_its_record_and_checked(tiny_moe, tmp_path, monkeypatch):  # noqa: F811
    # Reopening an ESFT checkpoint reopens its base: recorded absolute, checked by fingerprint, one line
    # naming the record and what was found when it moved or changed.
    from conftest import make_upcycled

    import upcycle
    from upcycle.adapters import merge_command
    from upcycle.models.esft import save_esft
    from upcycle.models.sources import base_fingerprint
    from upcycle.train.esft import restrict_training

    base, other = tmp_path / "base", make_upcycled(tmp_path / "other", seed=1)
    shutil.copytree(tiny_moe, base)
    monkeypatch.chdir(tmp_path)
    model = upcycle.load("base")
    choice = {"model.layers.3.mlp.experts": [1]}
    restrict_training(model, choice, _cfg(train_router=False, train_attention=False), lora=False)
    ckpt = tmp_path / "ckpt"
    save_esft(model, str(ckpt), base_path="base", fingerprint=None, subset=choice, settings={})
    raw = json.loads((ckpt / "esft_config.json").read_text())
    assert raw["base_model_name_or_path"] == str(base)  # absolute, whatever was typed
    want = base_fingerprint(str(base))
    monkeypatch.chdir(other)
    upcycle.load(str(ckpt))
    with pytest.raises(UpcycleError, match=rf"^the base of ESFT checkpoint {ckpt} is {base} \(fingerprint {want}\), but "
                                           rf"{other} has fingerprint sha256:\w+$"):
        merge_command(str(ckpt), str(tmp_path / "merged"), base=str(other))
    shutil.move(base, tmp_path / "moved")
    with pytest.raises(UpcycleError, match=rf"^the base of ESFT checkpoint {ckpt}, {base} \(fingerprint {want}\), is not "
                                           rf"found: .*; give the right one: upcycle merge {ckpt} --base BASE --out DIR$"):
        upcycle.load(str(ckpt))
    shutil.copytree(other, base)
    with pytest.raises(UpcycleError, match=rf"is {base} \(fingerprint {want}\), but {base} has fingerprint sha256:"):
        upcycle.load(str(ckpt))
    assert not (tmp_path / "merged").exists()


def test_esft_resume_reuses_the_recorded_choice(tiny_moe, corpus, tmp_path, monkeypatch):  # noqa: F811
    from upcycle.train import esft

    kw = dict(max_steps=4, experts_subset={"top": 2, "by": "tokens", "train_router": True, "sample": 8})
    train(recipe(tiny_moe, corpus, tmp_path / "a", **kw))
    stop_after(monkeypatch, 2)
    train(recipe(tiny_moe, corpus, tmp_path / "b", **kw))
    monkeypatch.undo()

    def no_routing(*a, **k):
        raise AssertionError("a resumed run must reuse its choice, not route again")

    monkeypatch.setattr(esft, "route_sample", no_routing)
    train(recipe(tiny_moe, corpus, tmp_path / "b", resume="auto", **kw))
    assert [r["loss"] for r in rows(tmp_path / "a")] == [r["loss"] for r in rows(tmp_path / "b")]
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-000004" / "esft_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000004" / "esft_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UpcycleError, match="recipe changed experts_subset"):
        train(recipe(tiny_moe, corpus, tmp_path / "b", resume="auto", max_steps=4, experts_subset={"top": 3}))


def test_esft_with_lora_adapts_only_the_chosen_experts(tiny_moe, corpus, tmp_path):  # noqa: F811
    import upcycle
    from upcycle.adapters import describe_adapter, load_adapter, merge_command

    lora = {"r": 4, "alpha": 8, "experts": True, "target_modules": ["q_proj"]}
    s = train(recipe(tiny_moe, corpus, tmp_path / "run", max_steps=4, lora=lora, optim__lr=3e-2,
                     experts_subset={"top": 1, "sample": 8}))
    choice = json.loads((tmp_path / "run" / "experts_subset.json").read_text())["experts"]
    ckpt = s["last_checkpoint"]
    info = describe_adapter(ckpt)
    assert info["experts_subset"] == {n: 1 for n in choice}
    saved = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    n = "model.layers.3.mlp.experts"
    assert saved[f"base_model.model.{n}.lora_A.weight"].shape == (1 * 4, 128)  # one expert's rank-4 A of down_proj
    # The adapter loads back onto a fresh base with the same outputs, and merges into the chosen experts only.
    model = load_adapter(upcycle.load(str(tiny_moe)), ckpt)
    assert model.get_submodule(n).expert_ids == choice[n]
    r = merge_command(ckpt, str(tmp_path / "merged"))
    merged, base = upcycle.load(r["out"]), upcycle.load(str(tiny_moe))
    x = torch.randint(5, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, model.eval()(x).logits, rtol=1e-5, atol=1e-5)
    for name, ids in choice.items():
        b, m = base.get_submodule(name), merged.get_submodule(name)
        for e in range(4):
            assert torch.equal(b.down_proj[e], m.down_proj[e]) == (e not in ids), (name, e)
