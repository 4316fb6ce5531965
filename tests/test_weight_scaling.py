"""Softmax-then-top-K upcycling with weight scaling (He et al. 2024; ``upcycle convert --no-normalize
--weight-scaling``): the routed down projections carry E/K, so a layer's output is the dense MLP's times
(E/K) x (the chosen probabilities' sum): the dense model exactly where the router is uniform, close at t=0.

    python -m pytest -q tests/test_weight_scaling.py
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import make_dense
from tolerances import TOLERANCES

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.moe import moe_blocks

F32 = TOLERANCES[torch.float32]


def _convert(src, out, G, copies=4, top_k=None, normalize=False, **kw):
    moe = MoEConfig(num_experts=copies * G, granularity=G, top_k=top_k or G, normalize_topk=normalize)
    with pytest.warns(UserWarning, match="close, not exact"):
        return upcycle.convert(ConvertConfig(out=str(out), model=str(src), layers=2, moe=moe, progress=False,
                                             weight_scaling=True, **kw))


@pytest.mark.parametrize("arch, G, top_k, shared", [
    ("llama", 1, 2, None),      # top-2 of 4 whole copies: x2
    ("llama", 4, 4, None),      # one copy's 4 segments of 16: x4 on top of G
    ("gpt_neox", 2, 4, 32),     # non-gated with biases, two copies of 2 segments, a shared expert
])
def test_each_layer_is_the_dense_mlp_times_the_chosen_probability_mass(tmp_path, arch, G, top_k, shared):
    dense = make_dense(arch, tmp_path / "dense")
    kw = dict(shared_neurons=shared, shared_selection="random") if shared else {}
    r = _convert(tmp_path / "dense", tmp_path / "moe", G, top_k=top_k, **kw)
    up = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycle"]
    E, K = 4 * G, top_k
    assert up["init"]["weight_scaling"] == E / K and up["moe"]["normalize_topk"] is False
    moe = upcycle.load(r.out, experts_backend="loop")
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    for name, block in moe_blocks(moe).items():
        mlp = dense.get_submodule(name)
        with torch.no_grad():
            probs = torch.softmax(block.router_logits(x), -1)
            mass = probs.topk(K, dim=-1).values.sum(-1, keepdim=True)
            shared_out = block.shared_expert(x.reshape(-1, 64)).view_as(x) if shared else 0
            want = shared_out + (E / K) * mass * (mlp(x) - shared_out)
            torch.testing.assert_close(block(x), want, **F32)
        # A fresh router is near uniform: the mass is K/E give or take a few percent, not exactly.
        assert 1e-4 < (mass * E / K - 1).abs().max() < 0.5


def test_a_uniform_router_gives_the_dense_model(tmp_path):
    # A zero router is uniform: every probability 1/E, whichever K copies tie-breaking picks (G = 1: identical).
    dense = make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", 1, top_k=2)
    moe = upcycle.load(str(tmp_path / "moe"))
    ids = torch.randint(5, 110, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fresh = moe(ids).logits
        for block in moe_blocks(moe).values():
            block.router.weight.zero_()
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, **F32)
        assert (fresh - dense(ids).logits).abs().max() > 1e-4  # the fresh router is near uniform, not uniform


@pytest.mark.parametrize("extra", [["--weight-scaling"], ["--weight-scaling", "--routing", "expert-choice"]])
def test_weight_scaling_without_raw_weights_is_refused(tmp_path, capsys, extra):
    from upcycle.cli import main

    make_dense("llama", tmp_path / "dense")
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["convert", "--model", str(tmp_path / "dense"), "--layers", "2", "--out", str(out), "--no-progress",
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and "--weight-scaling needs --no-normalize" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_only_raw_weights_give_the_router_a_copy_level_gradient_at_t0(tmp_path):
    # Why the router order matters for an upcycle: at t = 0 every copy computes the same function, so with
    # renormalised weights moving weight between chosen copies changes nothing, and the LM loss's gradient
    # summed over a copy's G router rows is zero (its rows only move apart: de-grouping). Raw probabilities
    # scale the layer's output with the chosen mass, a signal every copy's rows get from the first step.
    make_dense("llama", tmp_path / "dense")
    ids = torch.randint(5, 110, (4, 32), generator=torch.Generator().manual_seed(0))
    copy_grad = {}
    for normalize, top_k in ((True, 4), (True, 8), (False, 4)):
        moe = MoEConfig(num_experts=32, granularity=4, top_k=top_k, normalize_topk=normalize,
                        aux_loss_weight=0.0, z_loss_weight=0.0)
        out = tmp_path / f"{normalize}{top_k}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weight-scaling note
            upcycle.convert(ConvertConfig(out=str(out), model=str(tmp_path / "dense"), layers=2, moe=moe,
                                          progress=False, weight_scaling=not normalize))
        model = upcycle.load(str(out), experts_backend="loop")
        model(input_ids=ids, labels=ids).loss.backward()
        for name, block in moe_blocks(model).items():
            g = block.router.weight.grad
            copy_grad[normalize, top_k, name] = (g.view(8, 4, -1).sum(1).norm() / g.norm()).item()
    for (normalize, _, _), ratio in copy_grad.items():
        assert ratio < 1e-5 if normalize else ratio > 0.3, copy_grad
