"""Shared base for fresh experts (unquantised): ``SharedStackedExperts`` under LoRA.

Same logits and LoRA gradients as the unshared base, E times less memory for the experts'
base weights, left unshared (auto) or refused (True) on experts that differ, adapter files
and merges unchanged.

    python -m pytest -q tests/test_shared_base.py
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest
import torch
from conftest import make_dense
from safetensors import safe_open

import upcycle
from upcycle import ConvertConfig, MoEConfig, UpcycleError
from upcycle.adapters import (
    LoraConfig,
    SharedStackedExperts,
    apply_lora,
    load_adapter,
    merge_and_unload,
    merge_command,
    merge_lora,
    save_adapter,
    shared_base_report,
    trainable_summary,
    unmerge_lora,
    unshare_experts,
)
from upcycle.adapters import peft_io
from upcycle.moe import ExpertsBase, StackedExperts, moe_blocks

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore:Unexpected keyword arguments \\['upcycle'\\]:UserWarning"),
              pytest.mark.oldest]  # also run by make test-oldest, on the minimum versions
E, LAYERS, D, FFN = 4, 2, 64, 128  # tests/conftest.py TINY["llama"]: gated SiLU MLP, no bias


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny dense Llama, a fresh upcycle of it (identical experts) and a noised one."""
    root = tmp_path_factory.mktemp("shared")
    make_dense("llama", root / "dense")
    for name, noise in (("fresh", 0.0), ("noisy", 0.01)):
        upcycle.convert(ConvertConfig(out=str(root / name), model=str(root / "dense"), layers=LAYERS,
                                      moe=MoEConfig(num_experts=E), progress=False, expert_noise=noise))
    return {k: str(root / k) for k in ("dense", "fresh", "noisy")}


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lora(path, shared_base, backend="grouped_mm", seed=0, std=0.05):
    """LoRA (r=4) on attention + experts with a reproducible, nonzero ("trained") adapter."""
    model = upcycle.load(path, experts_backend=backend)
    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(r=4, shared_base=shared_base))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad and "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _bases(model):
    return [blk.experts.base_layer for blk in moe_blocks(model).values()]


def _storage_bytes(module):
    seen = {}
    for p in module.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_default_shares_fresh_experts_and_is_a_drop_in(dirs):
    model = _lora(dirs["fresh"], "auto")
    bases = _bases(model)
    assert len(bases) == LAYERS
    for b in bases:
        assert isinstance(b, SharedStackedExperts) and isinstance(b, ExpertsBase)
        assert b.gate_up_proj.shape == (E, 2 * FFN, D) and b.down_proj.shape == (E, D, FFN)
        assert b.gate_up_proj.stride(0) == 0 and b.down_proj.stride(0) == 0  # zero-copy views
        assert b.w_in_EMD.data_ptr() == b.w_in.data_ptr()
        assert not any(p.requires_grad for p in b.parameters())
    assert LoraConfig().shared_base == "auto"


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "triton"])
def test_same_logits_and_lora_gradients_as_unshared(dirs, backend):
    if backend == "triton":
        pytest.importorskip("upcycle_kernels", reason="triton is not installed")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    shared, plain = _lora(dirs["fresh"], True, backend), _lora(dirs["fresh"], False, backend)
    assert all(isinstance(b, SharedStackedExperts) for b in _bases(shared))
    assert not any(isinstance(b, SharedStackedExperts) for b in _bases(plain))
    ids = _ids()
    ys = []
    for model in (shared, plain):
        model.train()
        y = model(ids).logits
        y.float().pow(2).mean().backward()
        ys.append(y.detach())
    assert torch.equal(ys[0], ys[1])
    gs = {n: p.grad for n, p in shared.named_parameters() if p.requires_grad}
    gp = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert gs.keys() == gp.keys() and any(".lora_A_in" in n for n in gs)
    for n in gs:
        assert gs[n] is not None and torch.equal(gs[n], gp[n]), n


def test_stacked_experts_forward_every_backend_on_views():
    """StackedExperts' own forward (no LoRA), with biases, gated and not: shared == materialised."""
    torch.manual_seed(0)
    for gated in (True, False):
        ex = StackedExperts(E, 32, 64, gated=gated, activation="silu", bias=True, backend="loop")
        with torch.no_grad():  # every expert = expert 0, nonzero biases
            for t in (ex.w_in_EMD, ex.down_proj):
                t.copy_(t[0].expand_as(t))
            ex.b_in_EM.copy_(torch.randn(ex.b_in_EM.shape[1]).expand_as(ex.b_in_EM))
            ex.down_proj_bias.copy_(torch.randn(32).expand_as(ex.down_proj_bias))
        sh = SharedStackedExperts.from_experts(ex)
        assert sh.b_in_EM.stride(0) == 0 and torch.equal(sh.down_proj_bias, ex.down_proj_bias)
        x = torch.randn(10, 32)
        tok = torch.arange(10).repeat_interleave(2)
        exp = torch.randint(0, E, (20,), generator=torch.Generator().manual_seed(1))
        w = torch.rand(20)
        backends = ["loop", "grouped_mm"]
        try:
            import upcycle_kernels  # noqa: F401
            if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
                backends.append("triton")
        except ImportError:
            pass
        for backend in backends:
            ex.backend = sh.backend = backend
            ys = []
            for m in (ex, sh):
                xi = x.clone().requires_grad_()
                y = m(xi, tok, exp, w)
                y.pow(2).sum().backward()
                ys.append((y.detach(), xi.grad))
            torch.testing.assert_close(ys[1][0], ys[0][0], rtol=0, atol=0, msg=f"{backend} gated={gated}")
            torch.testing.assert_close(ys[1][1], ys[0][1], rtol=0, atol=0, msg=f"{backend} gated={gated}")


def test_memory_is_E_times_smaller(dirs):
    shared, plain = _lora(dirs["fresh"], "auto"), _lora(dirs["fresh"], False)
    per_expert = (2 * FFN * D + D * FFN) * 4  # fp32 gate_up_proj + down_proj, one expert
    rep = shared_base_report(shared)
    assert rep == dict(num_experts_modules=LAYERS, num_shared=LAYERS, bytes_before=LAYERS * E * per_expert,
                       bytes_after=LAYERS * per_expert, saved_bytes=LAYERS * (E - 1) * per_expert)
    assert rep["bytes_before"] == 786_432 and rep["bytes_after"] == 196_608
    rep_plain = shared_base_report(plain)
    assert rep_plain["bytes_before"] == rep_plain["bytes_after"] == rep["bytes_before"]
    assert rep_plain["num_shared"] == 0
    # What the tensors really hold, not only what the report says:
    assert sum(_storage_bytes(b) for b in _bases(shared)) == rep["bytes_after"]
    assert sum(_storage_bytes(b) for b in _bases(plain)) == rep["bytes_before"]
    summary = trainable_summary(shared)
    assert summary.startswith("trainable params: ")
    assert "expert base: 786,432 -> 196,608 bytes (2/2 layers shared, 4.0x less)" in summary
    assert "expert base" not in trainable_summary(plain)


def test_experts_that_differ_stay_unshared_under_auto_and_are_refused_under_true(dirs):
    model = _lora(dirs["noisy"], "auto")
    assert all(type(b) is StackedExperts for b in _bases(model))
    assert shared_base_report(model)["saved_bytes"] == 0
    model = upcycle.load(dirs["noisy"])
    with pytest.raises(UpcycleError, match="shared_base=True"):
        apply_lora(model, LoraConfig(r=4, shared_base=True))
    assert not hasattr(model, "upcycle_lora_config") and all(type(b) is StackedExperts for _, b in
                                                               [(n, blk.experts) for n, blk in moe_blocks(model).items()])
    with pytest.raises(UpcycleError, match="shared_base"):
        apply_lora(upcycle.load(dirs["fresh"]), LoraConfig(r=4, shared_base="yes"))
    with pytest.raises(UpcycleError, match="exact copies"):
        SharedStackedExperts.from_experts(next(iter(moe_blocks(model).values())).experts)


def test_adapter_trained_on_shared_base_loads_onto_unshared_base(dirs, tmp_path, monkeypatch):
    shared, plain = _lora(dirs["fresh"], True), _lora(dirs["fresh"], False)
    a, b = tmp_path / "a_shared", tmp_path / "a_plain"
    save_adapter(shared, str(a), base_path=dirs["fresh"])
    save_adapter(plain, str(b), base_path=dirs["fresh"])
    # identical files: same tensors and the same config (shared_base is not recorded)
    with safe_open(str(a / peft_io.WEIGHTS_NAME), "pt") as fa, safe_open(str(b / peft_io.WEIGHTS_NAME), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    ca, cb = (json.loads((d / peft_io.CONFIG_NAME).read_text()) for d in (a, b))
    assert ca == cb and "shared_base" not in json.dumps(ca)
    want = shared(_ids()).logits.detach()
    # default load: shared again
    loaded = load_adapter(upcycle.load(dirs["fresh"], experts_backend="grouped_mm"), str(a))
    assert all(isinstance(x, SharedStackedExperts) for x in _bases(loaded))
    assert torch.equal(loaded(_ids()).logits, want)
    # onto an unshared base
    orig = peft_io.lora_config_from_peft
    monkeypatch.setattr(peft_io, "lora_config_from_peft", lambda raw: dataclasses.replace(orig(raw), shared_base=False))
    loaded = load_adapter(upcycle.load(dirs["fresh"], experts_backend="grouped_mm"), str(a))
    assert all(type(x) is StackedExperts for x in _bases(loaded))
    assert torch.equal(loaded(_ids()).logits, want)


def test_merge_unshares_and_matches_unshared_merge(dirs):
    shared, plain = _lora(dirs["fresh"], True), _lora(dirs["fresh"], False)
    before = shared(_ids()).logits.detach()
    with pytest.raises(UpcycleError, match="shared expert base in place"):
        next(iter(moe_blocks(shared).values())).experts.merge()
    merge_lora(shared)
    assert all(type(b) is StackedExperts for b in _bases(shared)) and shared_base_report(shared)["num_shared"] == 0
    assert sum(_storage_bytes(b) for b in _bases(shared)) == 786_432  # E materialised copies again
    merge_lora(plain)
    for bs, bp in zip(_bases(shared), _bases(plain)):
        assert torch.equal(bs.gate_up_proj, bp.gate_up_proj) and torch.equal(bs.down_proj, bp.down_proj)
    torch.testing.assert_close(shared(_ids()).logits, before, rtol=1e-5, atol=1e-5)
    unmerge_lora(shared)
    torch.testing.assert_close(shared(_ids()).logits, before, rtol=1e-5, atol=1e-5)
    merge_and_unload(shared)
    assert all(type(blk.experts) is StackedExperts for blk in moe_blocks(shared).values())


def test_state_dict_keeps_the_checkpoint_layout(dirs):
    model = upcycle.load(dirs["fresh"])
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    from upcycle.adapters import share_experts

    assert share_experts(model) == LAYERS
    sd = model.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    fresh = upcycle.load(dirs["fresh"])
    share_experts(fresh)
    with torch.no_grad():
        for blk in moe_blocks(fresh).values():
            blk.experts.w_in.zero_()
    fresh.load_state_dict(ref)
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())
    noisy = upcycle.load(dirs["noisy"]).state_dict()
    with pytest.raises(UpcycleError, match="differ"):
        fresh.load_state_dict(noisy)
    assert unshare_experts(fresh) == LAYERS and all(type(blk.experts) is StackedExperts for blk in moe_blocks(fresh).values())
    # trainable shared base: refused at forward, not silently tied
    share_experts(fresh)
    fresh.requires_grad_(True)
    with pytest.raises(UpcycleError, match="frozen"):
        fresh(_ids())


def test_qlora_flow_keeps_nf4_sharing(dirs):
    """quantize_model first (NF4 shares its own base), then LoRA: share_experts leaves NF4 experts alone;
    the other order quantises a SharedStackedExperts into a shared NF4 base."""
    from upcycle.adapters import NF4StackedExperts, quantize_model

    for order in ("quantize_first", "lora_first"):
        model = upcycle.load(dirs["fresh"], experts_backend="loop")
        if order == "quantize_first":
            quantize_model(model)
            apply_lora(model, LoraConfig(r=4))
        else:
            apply_lora(model, LoraConfig(r=4))
            quantize_model(model)
        for b in _bases(model):
            assert isinstance(b, NF4StackedExperts) and b.shared_base, order
        assert torch.isfinite(model(_ids()).logits).all()


def test_merge_command_on_adapter_from_shared_base(dirs, tmp_path):
    model = _lora(dirs["fresh"], "auto")
    save_adapter(model, str(tmp_path / "adapter"), base_path=dirs["fresh"])
    want = model(_ids()).logits.detach()
    merge_command(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = upcycle.load(str(tmp_path / "merged"), experts_backend="grouped_mm")
    torch.testing.assert_close(merged(_ids()).logits, want, rtol=1e-4, atol=1e-4)


@needs_peft
def test_peft_loads_an_adapter_trained_on_a_shared_base(dirs, tmp_path):
    from peft import PeftModel

    model = _lora(dirs["fresh"], "auto")
    assert all(isinstance(b, SharedStackedExperts) for b in _bases(model))
    want = model(_ids()).logits.detach()
    save_adapter(model, str(tmp_path / "ad"), base_path=dirs["fresh"])
    peft_model = PeftModel.from_pretrained(upcycle.load(dirs["fresh"], experts_backend="grouped_mm"),
                                           str(tmp_path / "ad"))
    with torch.no_grad():
        got = peft_model(_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
