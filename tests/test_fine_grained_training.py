"""Fine-grained and shared-expert upcycles downstream: LoRA / QLoRA (PEFT's format included), ESFT
subsets, training telemetry in copies and segments.

    python -m pytest -q tests/test_fine_grained_training.py
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import make_char_tokenizer, make_dense
from tolerances import TOLERANCES

import upcycle
from test_train import corpus, recipe, rows  # noqa: F401  (fixtures)
from upcycle import ConvertConfig, MoEConfig
from upcycle.adapters import LoraConfig, apply_lora, load_adapter, merge_command, quantize_model, save_adapter
from upcycle.adapters.lora import LoraLinear
from upcycle.adapters.qlora import NF4Linear
from upcycle.moe import moe_blocks
from upcycle.train import train

pytestmark = [pytest.mark.filterwarnings("ignore:Unexpected keyword arguments \\['upcycle'\\]:UserWarning"),
              pytest.mark.oldest]
F32 = TOLERANCES[torch.float32]
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


@pytest.fixture(scope="module")
def fine(tmp_path_factory):
    """A tiny Llama upcycled to 4 copies x 4 segments (top-4) with a 32-neuron shared expert, and its dense source."""
    root = tmp_path_factory.mktemp("fine")
    make_dense("llama", root / "dense")
    make_char_tokenizer().save_pretrained(root / "dense")
    upcycle.convert(ConvertConfig(out=str(root / "moe"), model=str(root / "dense"), layers=2, progress=False,
                                  moe=MoEConfig(num_experts=16, granularity=4, top_k=4), shared_neurons=32,
                                  shared_selection="random", permute_copies=True))
    return root / "moe"


def _logits(model, seed=0):
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_covers_segments_and_shared_expert_and_round_trips(fine, tmp_path):
    model = apply_lora(upcycle.load(str(fine), experts_backend="grouped_mm"), LoraConfig(r=4, alpha=8))
    base = _logits(upcycle.load(str(fine)))
    torch.testing.assert_close(_logits(model), base, **F32)  # B = 0: a no-op
    for block in moe_blocks(model).values():
        assert block.experts.num_experts == 16
        projections = ("gate_proj", "up_proj", "down_proj")
        assert all(isinstance(getattr(block.shared_expert, p), LoraLinear) for p in projections)
    _randomize(model)
    want = _logits(model)
    assert not torch.allclose(want, base)
    save_adapter(model, str(tmp_path / "ad"), base_path=str(fine))
    again = load_adapter(upcycle.load(str(fine)), str(tmp_path / "ad"))
    torch.testing.assert_close(_logits(again), want, **F32)
    merged = upcycle.load(merge_command(str(tmp_path / "ad"), str(tmp_path / "merged"))["out"])
    torch.testing.assert_close(_logits(merged), want, **F32)


@needs_peft
def test_peft_loads_the_adapter_with_its_shared_expert_part(fine, tmp_path):
    from peft import PeftModel

    model = apply_lora(upcycle.load(str(fine), experts_backend="grouped_mm"), LoraConfig(r=4, alpha=8))
    _randomize(model)
    want = _logits(model)
    save_adapter(model, str(tmp_path / "ad"), base_path=str(fine))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert r"shared_expert\.gate_proj" in cfg["target_modules"]  # exact names: PEFT's list would miss them
    peft_model = PeftModel.from_pretrained(upcycle.load(str(fine), experts_backend="grouped_mm"), str(tmp_path / "ad"))
    torch.testing.assert_close(_logits(peft_model), want, **F32)


def test_qlora_quantises_the_shared_expert_and_trains_its_adapter(fine):
    model = upcycle.load(str(fine), experts_backend="grouped_mm")
    want = _logits(model)
    rep = quantize_model(model)
    # q/k/v/o of 4 layers, and the 3 projections of 2 shared experts
    assert rep["num_experts_modules"] == 2 and rep["num_linear"] == 4 * 4 + 3 * 2
    block = next(iter(moe_blocks(model).values()))
    assert isinstance(block.shared_expert.down_proj, NF4Linear)
    torch.testing.assert_close(_logits(model), want, atol=0.15, rtol=0)  # NF4 rounding of every projection
    apply_lora(model, LoraConfig(r=4, alpha=8))
    model.train()
    ids = torch.randint(5, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    shared_a = block.shared_expert.down_proj.lora_A.weight
    assert block.shared_expert.down_proj.lora_B.weight.grad.abs().sum() > 0 and shared_a.requires_grad


def test_training_logs_copies_and_degrouping(fine, corpus, tmp_path):  # noqa: F811
    train(recipe(fine, corpus, tmp_path / "run", max_steps=3, optim__lr=3e-2, optim__router_lr=0.3))
    logged = rows(tmp_path / "run")
    for r in logged:
        for layer in r["routing"].values():
            assert {"copy_load_min", "copy_load_max", "copies_per_token", "degrouped"} <= set(layer)
            assert len(layer["load"]) == 16
    first = next(iter(logged[0]["routing"].values()))
    assert first["degrouped"] == 0.0 and first["copies_per_token"] == 1.0  # step 1 routes the fresh model
    # A fast router splits copies apart within steps: the measure moves.
    assert any(layer["degrouped"] > 0 for r in logged[1:] for layer in r["routing"].values())


def test_esft_trains_chosen_segments_and_leaves_the_shared_expert_frozen(fine, corpus, tmp_path):  # noqa: F811
    s = train(recipe(fine, corpus, tmp_path / "run", max_steps=2, optim__lr=3e-2,
                     experts_subset={"top": 3, "sample": 8}))
    choice = json.loads((tmp_path / "run" / "experts_subset.json").read_text())["experts"]
    trained, base = upcycle.load(s["last_checkpoint"]), upcycle.load(str(fine))
    for name, ids in choice.items():
        assert len(ids) == 3 and all(0 <= e < 16 for e in ids)
        b, t = base.get_submodule(name), trained.get_submodule(name)
        for e in range(16):
            assert torch.equal(b.down_proj[e], t.down_proj[e]) == (e not in ids), (name, e)
        block = name.removesuffix(".experts")
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(base.get_submodule(f"{block}.shared_expert.{p}").weight,
                               trained.get_submodule(f"{block}.shared_expert.{p}").weight)


def test_save_pretrained_round_trip_keeps_the_shared_expert(fine, tmp_path):
    model = upcycle.load(str(fine))
    model.save_pretrained(tmp_path / "again")
    again = upcycle.load(str(tmp_path / "again"))
    assert torch.equal(_logits(again), _logits(model))


def test_the_shared_expert_trains_at_the_experts_rate():
    from upcycle.train.optim import param_kind

    assert param_kind("model.layers.2.mlp.shared_expert.down_proj.weight") == "experts"
    assert param_kind("model.layers.2.mlp.shared_expert.down_proj.lora_A.weight") == "adapter"
    assert param_kind("model.layers.2.mlp.down_proj.weight") == "rest"  # a dense layer's MLP


def test_plot_shows_degrouping_of_a_fine_grained_run(fine, corpus, tmp_path):  # noqa: F811
    from upcycle.train.plot import plot_run

    train(recipe(fine, corpus, tmp_path / "run", max_steps=2))
    paths = plot_run(str(tmp_path / "run"))
    import matplotlib.image

    summary = matplotlib.image.imread(next(p for p in paths if p.endswith("routing_summary.png")))
    assert summary.shape[0] == 1000  # 10 in at 100 dpi: four panels, the fourth the de-grouped share


def test_qlora_adapter_of_a_shared_expert_upcycle_loads_on_its_nf4_base(fine, tmp_path):
    """Issues 20 x 22: the adapter's quantisation record covers the shared expert's NF4 projections, so
    ``upcycle.load(adapter)`` rebuilds the very model that was trained (codes and all), not the fp32 base."""
    model = upcycle.load(str(fine), experts_backend="grouped_mm")
    quantize_model(model)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    _randomize(model)
    model.eval()
    want = _logits(model)
    save_adapter(model, str(tmp_path / "ad"), base_path=str(fine))
    loaded = upcycle.load(str(tmp_path / "ad"), experts_backend="grouped_mm")
    block = next(iter(moe_blocks(loaded).values()))
    assert isinstance(block.shared_expert.down_proj.base_layer, NF4Linear)
    torch.testing.assert_close(_logits(loaded), want, **F32)
