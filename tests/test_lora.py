"""LoRA adapters: no-op at init, gradients, expert LoRA vs a materialised reference, merge,
save/load, base fingerprint, PEFT interop, ``merge_command``.

    python -m pytest -q tests/test_lora.py
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import make_dense
from safetensors import safe_open
from tolerances import TOLERANCES

import upcycle
from upcycle import ConvertConfig, MoEConfig, UpcycleError
from upcycle.adapters import (
    LoraConfig,
    LoraExperts,
    LoraLinear,
    apply_lora,
    describe_adapter,
    load_adapter,
    lora_modules,
    merge_and_unload,
    merge_command,
    merge_lora,
    save_adapter,
    trainable_summary,
    unmerge_lora,
)
from upcycle.moe import StackedExperts, moe_blocks

FP32 = TOLERANCES[torch.float32]
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
# PEFT warns that it ignores our adapter_config.json extension section ("upcycle"); that is the point of it.
pytestmark = [pytest.mark.filterwarnings("ignore:Unexpected keyword arguments \\['upcycle'\\]:UserWarning"),
              pytest.mark.oldest]  # also run by make test-oldest, on the minimum versions


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny dense Llama, and two upcycled versions of it (different expert noise: different fingerprints)."""
    root = tmp_path_factory.mktemp("lora")
    make_dense("llama", root / "dense")
    for name, noise in (("moe", 0.01), ("moe2", 0.02)):
        upcycle.convert(ConvertConfig(out=str(root / name), model=str(root / "dense"), layers=2,
                                      moe=MoEConfig(num_experts=4), progress=False, expert_noise=noise))
    return {k: str(root / k) for k in ("dense", "moe", "moe2")}


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None):
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits


def _randomize(model, seed=1, std=0.05):
    """Nonzero B everywhere (a trained adapter); with ``train_router``, a changed router too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in n or n.endswith("router.weight")):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _lora_moe(path, backend="grouped_mm", **cfg):
    model = upcycle.load(path, experts_backend=backend)
    return apply_lora(model, LoraConfig(**{"r": 4, **cfg}))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_fresh_adapter_is_a_noop(dirs, backend):
    model = upcycle.load(dirs["moe"], experts_backend=backend)
    before = _logits(model)
    apply_lora(model, LoraConfig(r=4))
    assert len(lora_modules(model)) == 4 * 4 + 2  # q/k/v/o of 4 layers + 2 MoE layers' experts
    torch.testing.assert_close(_logits(model), before, **FP32)


@pytest.mark.parametrize("train_router", [False, True])
def test_only_adapter_parameters_get_gradients(dirs, train_router):
    model = _lora_moe(dirs["moe"], train_router=train_router)
    _randomize(model)  # nonzero B, so A gets a nonzero gradient too
    model.train()
    model(_ids()).logits.float().pow(2).mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {n for n, _ in model.named_parameters() if ".lora_" in n or (train_router and n.endswith("router.weight"))}
    assert got == want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in want)
    summary = trainable_summary(model)
    assert summary.startswith("trainable params: ") and "trainable%: " in summary


def _experts(gated, bias, E=4, D=16, Fn=24, seed=0):
    torch.manual_seed(seed)
    ex = StackedExperts(E, D, Fn, gated=gated, activation="silu", bias=bias, backend="loop")
    if bias:
        with torch.no_grad():
            ex.b_in_EM.normal_(std=0.1)
            ex.down_proj_bias.normal_(std=0.1)
    return ex


def _triton_ok():
    from upcycle.moe.backends import triton_unsupported

    return triton_unsupported(torch.float32, "silu", "cpu") is None


@pytest.mark.parametrize("backend", [
    "loop", "grouped_mm",
    # LoraExperts runs its grouped_mm path under the triton backend (no LoRA epilogue in the kernels)
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="triton backend unavailable")),
])
@pytest.mark.parametrize("r", [4, 3])  # 3: rank rows not 16-byte aligned, the per-expert fallback
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_lora_experts_equal_materialised_reference(backend, r, gated, bias):
    base = _experts(gated, bias)
    lora = LoraExperts(base, r=r, alpha=8, use_rslora=r == 3)
    with torch.no_grad():
        lora.lora_B_in.normal_(std=0.1)
        lora.lora_B_down.normal_(std=0.1)
    ref = _experts(gated, bias)  # W_e + B_e A_e * scaling, built explicitly per expert
    with torch.no_grad():
        for e in range(4):
            ref.w_in_EMD[e] += lora.lora_B_in[e] @ lora.lora_A_in[e] * lora.scaling
            ref.down_proj[e] += lora.lora_B_down[e] @ lora.lora_A_down[e] * lora.scaling
    T, K = 10, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, 16, generator=g)
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.randint(0, 3, (T * K,), generator=g)  # expert 3 gets no tokens
    w = torch.rand(T * K, generator=g)
    lora.backend = backend
    torch.testing.assert_close(lora(x, tok, exp, w), ref(x, tok, exp, w), **FP32)
    # both backends give the same adapter gradients
    grads = {}
    for b in ("loop", "grouped_mm"):
        lora.zero_grad()
        lora.backend = b
        lora(x, tok, exp, w).pow(2).sum().backward()
        grads[b] = [p.grad.clone() for p in (lora.lora_A_in, lora.lora_B_in, lora.lora_A_down, lora.lora_B_down)]
        assert base.w_in_EMD.grad is None
    for a, b in zip(grads["loop"], grads["grouped_mm"]):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_lora_experts_on_a_bf16_base_keep_fp32_adapters(backend):
    base = _experts(True, False).to(torch.bfloat16)
    lora = LoraExperts(base, r=8, alpha=16)
    assert lora.lora_A_in.dtype == torch.float32
    with torch.no_grad():
        lora.lora_B_in.normal_(std=0.1)
        lora.lora_B_down.normal_(std=0.1)
    ref = _experts(True, False).to(torch.float32)
    with torch.no_grad():
        ref.w_in_EMD.copy_(base.w_in_EMD.float() + torch.bmm(lora.lora_B_in, lora.lora_A_in) * lora.scaling)
        ref.down_proj.copy_(base.down_proj.float() + torch.bmm(lora.lora_B_down, lora.lora_A_down) * lora.scaling)
    x = torch.randn(6, 16)
    tok, exp, w = torch.arange(6), torch.tensor([0, 1, 2, 3, 0, 1]), torch.ones(6)
    lora.backend = backend
    y = lora(x.bfloat16(), tok, exp, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x, tok, exp, w), **TOLERANCES[torch.bfloat16])


def test_expert_dropout_acts_in_training_only():
    lora = LoraExperts(_experts(True, False), r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        lora.lora_B_in.normal_()
    x, tok, exp, w = torch.randn(6, 16), torch.arange(6), torch.tensor([0, 1, 2, 3, 0, 1]), torch.ones(6)
    lora.eval()
    torch.testing.assert_close(lora(x, tok, exp, w), lora(x, tok, exp, w), rtol=0, atol=0)
    lora.train()
    assert not torch.allclose(lora(x, tok, exp, w), lora(x, tok, exp, w))


def test_lora_linear_matches_merged_weight_and_round_trips():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    w0 = base.weight.detach().clone()
    lin = LoraLinear(base, r=4, alpha=8)
    assert lin.scaling == 2.0 and LoraLinear(torch.nn.Linear(16, 8), 4, 8, use_rslora=True).scaling == 4.0
    torch.nn.init.normal_(lin.lora_B.weight)
    x = torch.randn(5, 16)
    want = torch.nn.functional.linear(x, w0 + lin.lora_B.weight @ lin.lora_A.weight * 2.0, base.bias)
    torch.testing.assert_close(lin(x), want, **FP32)
    lin.merge()
    assert lin.merged
    torch.testing.assert_close(lin(x), want, **FP32)
    lin.unmerge()
    torch.testing.assert_close(base.weight, w0, **FP32)
    assert not base.weight.requires_grad and lin.lora_A.weight.requires_grad


def test_merging_under_autocast_adds_the_float32_update(dirs):
    # B A is computed in the adapters' float32: autocast (which would run the products in bf16) changes nothing.
    model = _lora_moe(dirs["moe"], backend="loop")
    _randomize(model)
    wanted = {n: m.delta_weights() if isinstance(m, LoraExperts) else m.delta_weight()
              for n, m in lora_modules(model).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for n, m in lora_modules(model).items():
            got = m.delta_weights() if isinstance(m, LoraExperts) else m.delta_weight()
            for a, b in zip(got if isinstance(got, tuple) else (got,), wanted[n] if isinstance(got, tuple)
                            else (wanted[n],)):
                assert a.dtype == torch.float32 and torch.equal(a, b), n


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_merge_then_unmerge_restores_weights(dirs, backend):
    model = _lora_moe(dirs["moe"], backend=backend)
    _randomize(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    lora_logits = _logits(model)
    merge_lora(model)
    assert not torch.equal(model.model.layers[3].mlp.experts.base_layer.down_proj, weights[
        "model.layers.3.mlp.experts.base_layer.down_proj"])
    torch.testing.assert_close(_logits(model), lora_logits, **FP32)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], **FP32)
    torch.testing.assert_close(_logits(model), lora_logits, **FP32)
    merge_and_unload(model)
    assert not lora_modules(model) and not hasattr(model, "upcycle_lora_config")
    assert set(model.state_dict()) == set(upcycle.load(dirs["moe"]).state_dict())
    torch.testing.assert_close(_logits(model), lora_logits, **FP32)


def test_save_load_gives_same_logits(dirs, tmp_path):
    model = _lora_moe(dirs["moe"], train_router=True, use_rslora=True)
    _randomize(model)
    want = _logits(model)
    save_adapter(model, str(tmp_path / "ad"), base_path=dirs["moe"])
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["task_type"]) == (
        "LORA", 4, 16, True, "CAUSAL_LM")
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg["modules_to_save"] == ["router"]
    assert cfg["upcycle"]["base_fingerprint"].startswith("sha256:")
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.mlp.experts.base_layer.lora_B.weight" in keys
    assert "base_model.model.model.layers.3.mlp.router.weight" in keys
    info = describe_adapter(str(tmp_path / "ad"))
    assert (info["linear_modules"], info["expert_layers"], info["train_router"]) == (16, 2, True)
    assert info["adapter_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    fresh = upcycle.load(dirs["moe"])
    load_adapter(fresh, str(tmp_path / "ad"))  # base located from the model's own path
    torch.testing.assert_close(_logits(fresh), want, **FP32)


def test_adapter_on_another_base_is_a_clear_error(dirs, tmp_path):
    model = _lora_moe(dirs["moe"])
    save_adapter(model, str(tmp_path / "ad"), base_path=dirs["moe"])
    other = upcycle.load(dirs["moe2"])
    # One line naming both: the recorded base with its fingerprint, and what the other model has.
    with pytest.raises(UpcycleError, match=r"base of adapter .* is .*moe \(fingerprint sha256:\w+\), but .*moe2 has fingerprint sha256:\w+$"):
        load_adapter(other, str(tmp_path / "ad"))
    assert not lora_modules(other)


def test_merge_reopens_the_recorded_base_and_checks_it(dirs, tmp_path, monkeypatch):
    # The base is recorded absolute whatever was typed; replaced by another model it is one line naming both.
    import shutil

    shutil.copytree(dirs["moe"], tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = _lora_moe("base")
    save_adapter(model, "ad", base_path="base")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base")
    shutil.rmtree(tmp_path / "base")
    shutil.copytree(dirs["moe2"], tmp_path / "base")
    monkeypatch.chdir(dirs["moe"])
    with pytest.raises(UpcycleError, match=rf"^the base of adapter {tmp_path / 'ad'} is {tmp_path / 'base'} \(fingerprint "
                                           rf"sha256:\w+\), but {tmp_path / 'base'} has fingerprint sha256:\w+; give the "
                                           rf"right one: upcycle merge {tmp_path / 'ad'} --base BASE --out DIR$"):
        merge_command(str(tmp_path / "ad"), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("cfg,match", [
    (dict(target_modules=["nope_proj"]), "matches no module"),
    (dict(target_modules="layers\\.9.*"), "matches no module"),
    (dict(target_modules=["layers.3.mlp"]), "use LoraConfig\\(experts=True\\)"),
    (dict(target_modules=["mlp"]), "LlamaMLP; LoRA supports Linear"),
    (dict(target_modules=["router"]), "train_router=True"),
    (dict(target_modules=["self_attn"]), "LoRA supports Linear"),
    (dict(r=0), "positive integer"),
    (dict(dropout=1.5), "dropout"),
    (dict(target_modules=[], experts=False), "nothing to train"),
])
def test_bad_lora_config_is_an_error(dirs, cfg, match):
    model = upcycle.load(dirs["moe"])
    with pytest.raises(UpcycleError, match=match):
        apply_lora(model, LoraConfig(**cfg))
    assert not lora_modules(model)


def test_experts_on_a_dense_model_is_an_error(dirs):
    from transformers import AutoModelForCausalLM

    with pytest.raises(UpcycleError, match="no MoE layers"):
        apply_lora(AutoModelForCausalLM.from_pretrained(dirs["dense"]), LoraConfig())


def test_wildcard_and_regex_targets(dirs):
    model = _lora_moe(dirs["moe"], target_modules=["layers.3.self_attn.?_proj"], experts=False)
    assert sorted(lora_modules(model)) == [f"model.layers.3.self_attn.{p}_proj" for p in "koqv"]
    model = _lora_moe(dirs["moe"], target_modules=r"model\.layers\.[01]\.self_attn\.q_proj", experts=False)
    assert sorted(lora_modules(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


@needs_peft
def test_peft_loads_our_adapter_on_the_dense_base(dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(dirs["dense"]), LoraConfig(r=4, experts=False))
    _randomize(model)
    want = _logits(model)
    save_adapter(model, str(tmp_path / "ad"), base_path=dirs["dense"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["dense"]), str(tmp_path / "ad"))
    torch.testing.assert_close(_logits(peft_model), want, **FP32)
    assert not torch.allclose(want, _logits(AutoModelForCausalLM.from_pretrained(dirs["dense"])))


@needs_peft
@pytest.mark.parametrize("cfg", [
    dict(experts=False),
    dict(train_router=True),
    dict(target_modules=["layers.3.self_attn.?_proj"], experts=False),  # written for PEFT as an exact-name regex
], ids=["attention", "experts+router", "wildcard"])
def test_peft_loads_our_adapter_on_the_upcycled_base(dirs, tmp_path, cfg):
    from peft import PeftModel

    model = _lora_moe(dirs["moe"], **cfg)
    _randomize(model)
    want = _logits(model)
    save_adapter(model, str(tmp_path / "ad"), base_path=dirs["moe"])
    peft_model = PeftModel.from_pretrained(upcycle.load(dirs["moe"], experts_backend="grouped_mm"),
                                           str(tmp_path / "ad"))
    torch.testing.assert_close(_logits(peft_model), want, **FP32)


@needs_peft
def test_peft_loads_an_expert_adapter_trained_with_dropout(dirs, tmp_path):
    # PEFT's expert wrapper refuses lora_dropout != 0 ("ParamWrapper does not work with lora_dropout != 0"):
    # the file says 0 for PEFT (dropout acts in training only) and keeps the trained value for us.
    from peft import PeftModel

    model = _lora_moe(dirs["moe"], dropout=0.1)
    _randomize(model)
    want = _logits(model.eval())
    save_adapter(model, str(tmp_path / "ad"), base_path=dirs["moe"])
    peft_model = PeftModel.from_pretrained(upcycle.load(dirs["moe"], experts_backend="grouped_mm"),
                                           str(tmp_path / "ad"))
    torch.testing.assert_close(_logits(peft_model), want, **FP32)
    ours = load_adapter(upcycle.load(dirs["moe"]), str(tmp_path / "ad"))
    assert ours.upcycle_lora_config.dropout == 0.1 and describe_adapter(str(tmp_path / "ad"))["dropout"] == 0.1


@needs_peft
def test_we_load_a_peft_made_adapter(dirs, tmp_path):
    import peft

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = peft.get_peft_model(upcycle.load(dirs["moe"]), cfg)
    want = _logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "ad"))
    ours = load_adapter(upcycle.load(dirs["moe"]), str(tmp_path / "ad"))
    torch.testing.assert_close(_logits(ours), want, **FP32)


def test_merge_command_writes_a_loadable_merged_checkpoint(dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _lora_moe(dirs["moe"], train_router=True)
    _randomize(model)
    want = _logits(model)
    save_adapter(model, str(tmp_path / "ad"), base_path=dirs["moe"])
    out = tmp_path / "merged"
    summary = merge_command(str(tmp_path / "ad"), str(out))
    assert summary["upcycled"] and summary["merged_modules"] == 18
    assert len(moe_blocks(upcycle.load(str(out)))) == 2
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(out))), want, **FP32)
    with pytest.raises(UpcycleError, match="already exists"):
        merge_command(str(tmp_path / "ad"), str(out))
    assert [p for p in os.listdir(tmp_path) if "upcycle-tmp" in p] == []


def test_merge_command_on_a_dense_base_with_explicit_base(dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(dirs["dense"]), LoraConfig(r=4, experts=False))
    _randomize(model)
    want = _logits(model)
    save_adapter(model, str(tmp_path / "ad"), base_path=dirs["dense"])
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "base_model_name_or_path": str(tmp_path / "moved")}))
    with pytest.raises(UpcycleError, match=r"moved \(fingerprint sha256:\w+\), is not found: .*; give the right one: "
                                           r"upcycle merge .*ad --base BASE --out DIR$"):
        merge_command(str(tmp_path / "ad"), str(tmp_path / "merged"))
    merge_command(str(tmp_path / "ad"), str(tmp_path / "merged"), base=dirs["dense"])
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))), want, **FP32)
    with pytest.raises(UpcycleError, match="fingerprint"):
        merge_command(str(tmp_path / "ad"), str(tmp_path / "merged2"), base=dirs["moe"])
