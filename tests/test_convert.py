"""Surgery: function preservation (DESIGN.md 4.1), routing at model level, init methods."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, make_dense
from safetensors import safe_open
from tolerances import TOLERANCES

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.moe import moe_blocks, routing_stats

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions


def _convert(src, out, **kw):
    moe = MoEConfig(**{"num_experts": 4, **kw.pop("moe", {})})
    return upcycle.convert(ConvertConfig(out=str(out), model=str(src), moe=moe, progress=False,
                                         **{"layers": 2, **kw}))


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits_with_tail_changed(model, ids, t):
    """Logits for ``ids`` and for ``ids`` with every token after position t replaced."""
    changed = ids.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 7) % 128
    with torch.no_grad():
        return model(ids).logits, model(changed).logits


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_topk_upcycle_preserves_dense_logits(tmp_path, arch, backend):
    dense = make_dense(arch, tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", layers=3, moe={"top_k": 2})
    moe = upcycle.load(str(tmp_path / "moe"), experts_backend=backend)
    assert len(moe_blocks(moe)) == 3
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, **TOLERANCES[torch.float32])


def test_expert_choice_batch1_preserves_dense_logits(tmp_path):
    # A batch-1 routing group is one token: every expert takes it, weights sum to 1.
    dense = make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", moe={"routing": "expert-choice", "capacity": 2.0})
    moe = upcycle.load(str(tmp_path / "moe"))
    ids = _ids(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, **TOLERANCES[torch.float32])


def test_expert_choice_gives_every_expert_exactly_T_tokens(tmp_path):
    make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", moe={"num_experts": 8, "routing": "expert-choice", "capacity": 2.0})
    moe = upcycle.load(str(tmp_path / "moe"))
    batch, seq = 12, 5
    with torch.no_grad():
        moe(_ids(batch=batch, seq=seq))
    T = -(-2 * batch // 8)  # ceil(C * n / E), n = batch (one position across the batch)
    for stats in routing_stats(moe).values():
        assert list(stats.tokens_per_expert) == [T * seq] * 8


@pytest.mark.parametrize("routing", ["topk", "expert-choice"])
def test_causal_routing_future_tokens_do_not_change_past_outputs(tmp_path, routing):
    make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", moe={"routing": routing}, expert_noise=0.05)
    moe = upcycle.load(str(tmp_path / "moe"))
    t = 9
    a, b = _logits_with_tail_changed(moe, _ids(batch=4, seq=16), t)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_sequence_grouped_expert_choice_leaks_the_future_and_warns(tmp_path):
    make_dense("llama", tmp_path / "dense")
    with pytest.warns(UserWarning, match="not causal"):
        _convert(tmp_path / "dense", tmp_path / "moe", expert_noise=0.05,
                 moe={"routing": "expert-choice", "ec_group": "sequence", "capacity": 1.0})
    moe = upcycle.load(str(tmp_path / "moe"))
    a, b = _logits_with_tail_changed(moe, _ids(batch=1, seq=16), 9)
    # Later tokens changed which earlier tokens the experts picked: the past moved.
    assert not torch.allclose(a[:, :10], b[:, :10])


@pytest.mark.parametrize("routing", ["topk", "expert-choice"])
def test_kv_cache_generation_matches_full_forward(tmp_path, routing):
    make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", moe={"routing": routing}, expert_noise=0.05)
    moe = upcycle.load(str(tmp_path / "moe"))
    prompt = _ids(batch=1, seq=6)
    out = moe.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                       pad_token_id=0)
    # Greedy decoding with a KV cache must pick the argmax of the full, uncached forward pass.
    with torch.no_grad():
        full = moe(out[:, :-1], use_cache=False).logits
    assert torch.equal(full[0, prompt.shape[1] - 1:].argmax(-1), out[0, prompt.shape[1]:])


def test_init_methods(tmp_path):
    make_dense("llama", tmp_path / "dense")
    dense_sd = make_dense("llama").state_dict()
    gate = dense_sd["model.layers.3.mlp.gate_proj.weight"]
    name = "model.layers.3.mlp.experts.gate_up_proj"

    def experts(out, **kw):
        _convert(tmp_path / "dense", tmp_path / out, layer_ids=[3], layers=None, **kw)
        with safe_open(tmp_path / out / "model.safetensors", "pt") as f:
            return f.get_tensor(name), f.get_tensor("model.layers.3.mlp.router.weight")

    copy, router = experts("copy")
    assert all(torch.equal(copy[e, :128], gate) for e in range(4))
    assert abs(router.std().item() - 0.02) < 0.005
    noisy, _ = experts("noise", expert_noise=0.01)
    diff = noisy[:, :128] - gate
    assert 0.008 < diff.std().item() < 0.012 and not torch.equal(noisy[0], noisy[1])
    drop, _ = experts("drop", reinit_ratio=0.5)
    for e in range(4):  # half of the FFN units re-drawn, the rest exact copies
        same_rows = (drop[e, :128] == gate).all(dim=1)
        assert same_rows.sum().item() == 64
    again, router2 = experts("drop2", reinit_ratio=0.5)
    assert torch.equal(again, drop) and torch.equal(router2, router)  # seeded


def test_dtype_and_config_section(tmp_path):
    make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", dtype="bfloat16", moe={"routing": "expert-choice"})
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    up = cfg["upcycle"]
    assert cfg["model_type"] == "upcycle_llama"
    assert up["layer_ids"] == [2, 3] and up["moe"]["num_experts"] == 4 and up["moe"]["routing"] == "expert-choice"
    assert up["source"]["fingerprint"].startswith("sha256:") and up["version"] == upcycle.__version__
    model = upcycle.load(str(tmp_path / "moe"))
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
