"""Fine-grained and shared-expert upcycling (DESIGN.md invariant 9): E copies x G segments, an always-on
shared expert, exact at t = 0 for every MLP form and backend; what inspect, eval and training see of it.

    python -m pytest -q tests/test_fine_grained.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_char_tokenizer, make_dense
from families import make_family
from safetensors import safe_open
from tolerances import TOLERANCES

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.arch import FAMILIES
from upcycle.errors import UpcycleError
from upcycle.moe import moe_blocks, routing_stats
from upcycle.surgery.segments import pack_mask, plan_widths, unpack_mask

pytestmark = pytest.mark.oldest

F32 = TOLERANCES[torch.float32]
# Per family: (name, granularity, extra ConvertConfig fields). Every form (gated, fused, non-gated with
# biases, Conv1D) meets G = 2, 4 and 8, each with and without a shared expert (both selections), permuted copies.
CASES = [
    ("g2-permuted", 2, dict(permute_copies=True)),
    ("g2-shared", 2, dict(shared_neurons=16, calibration_tokens=256)),
    ("g4", 4, {}),
    ("g4-shared", 4, dict(shared_fraction=0.3, calibration_tokens=256)),
    ("g8", 8, {}),
    ("g8-shared-random", 8, dict(shared_neurons=32, shared_selection="random", permute_copies=True)),
]


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(5, 110, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _convert(src, out, G, copies=4, top_k=None, **kw):
    moe = MoEConfig(num_experts=copies * G, granularity=G, top_k=top_k or G)
    return upcycle.convert(ConvertConfig(out=str(out), model=str(src), layers=2, moe=moe, progress=False, **kw))


@pytest.fixture(scope="module")
def family_upcycles(tmp_path_factory):
    """family -> (dense model, {case: upcycle dir}), made once per family."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            dense = make_family(family, root / "dense")
            make_char_tokenizer().save_pretrained(root / "dense")
            made[family] = dense, {name: _convert(root / "dense", root / name, G, **kw).out for name, G, kw in CASES}
        return made[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fine_grained_and_shared_upcycles_are_the_dense_model(family_upcycles, family):
    dense, dirs = family_upcycles(family)
    ids = _ids()
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        for case, path in dirs.items():
            for backend in ("loop", "grouped_mm"):
                moe = upcycle.load(path, experts_backend=backend)
                torch.testing.assert_close(moe(input_ids=ids).logits, want, **F32,
                                           msg=lambda m: f"{case} {backend}: {m}")
                # Virtual groups: every token's K*G choices are K whole copies.
                for stats in routing_stats(moe).values():
                    assert stats.degrouped_fraction == 0.0 and stats.copies_per_token == 1.0
    # Greedy decoding (with a KV cache) picks the same tokens.
    moe = upcycle.load(dirs["g4-shared"], experts_backend="grouped_mm")
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(moe.generate(ids[:1, :6], **gen), dense.generate(ids[:1, :6], **gen))


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox", "gpt2"])
def test_triton_backend_at_fine_grained_shapes(family_upcycles, family):
    # The kernels under TRITON_INTERPRET=1 (conftest): gated, fused, non-gated with biases, Conv1D sources.
    dense, dirs = family_upcycles(family)
    ids = _ids(1, 8)
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        for case in ("g4-shared", "g8-shared-random"):
            moe = upcycle.load(dirs[case], experts_backend="triton")
            torch.testing.assert_close(moe(input_ids=ids).logits, want, **F32)


def test_layout_of_segments_router_rows_and_shared_expert(tmp_path):
    dense = make_dense("gpt_neox", tmp_path / "dense")  # non-gated, with biases
    G, copies = 4, 3
    _convert(tmp_path / "dense", tmp_path / "moe", G, copies=copies, shared_neurons=32, shared_selection="random")
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    up = cfg["upcycle"]
    assert up["moe"]["granularity"] == G and up["moe"]["num_experts"] == copies * G and up["moe"]["top_k"] == G
    assert up["mlp"] == {**up["mlp"], "ffn_size": 24, "dense_ffn_size": 128, "shared_ffn_size": 32, "padding": 0}
    layer = up["layer_ids"][0]
    shared = unpack_mask(up["shared"]["masks"][str(layer)], 128)
    routed = [i for i in range(128) if i not in set(shared)]
    mlp = dense.gpt_neox.layers[layer].mlp
    with safe_open(str(tmp_path / "moe" / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys() if f".layers.{layer}.mlp." in k}
    p = f"gpt_neox.layers.{layer}.mlp."
    router = t[p + "router.weight"]
    for c in range(copies):  # a copy's G router rows are identical
        assert all(torch.equal(router[c * G + g], router[c * G]) for g in range(G))
    assert not torch.equal(router[0], router[G])
    w_up, w_down = mlp.dense_h_to_4h.weight, mlp.dense_4h_to_h.weight
    for j in range(copies * G):
        seg = routed[(j % G) * 24:(j % G + 1) * 24]
        assert torch.equal(t[p + "experts.up_proj"][j], w_up[seg])
        assert torch.equal(t[p + "experts.up_proj_bias"][j], mlp.dense_h_to_4h.bias[seg])
        assert torch.equal(t[p + "experts.down_proj"][j], w_down[:, seg] * G)  # the 1/G share given back
        assert torch.equal(t[p + "experts.down_proj_bias"][j], torch.zeros(64))  # the bias lives in the shared expert
    assert torch.equal(t[p + "shared_expert.up_proj.weight"], w_up[shared])
    assert torch.equal(t[p + "shared_expert.down_proj.weight"], w_down[:, shared])
    assert torch.equal(t[p + "shared_expert.down_proj.bias"], mlp.dense_4h_to_h.bias)


def test_permuted_copies_hold_different_neurons_and_noise_spares_the_shared_ones(tmp_path):
    make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "perm", 4, permute_copies=True, shared_neurons=32,
             shared_selection="random")
    moe = upcycle.load(str(tmp_path / "perm"))
    ex = next(iter(moe_blocks(moe).values())).experts
    # Segment 0 of copy 0 and of copy 1 hold different neurons; each copy holds every routed neuron once.
    assert not torch.equal(ex.down_proj[0], ex.down_proj[4])
    copy0 = torch.cat([ex.down_proj[g] for g in range(4)], dim=1)
    copy1 = torch.cat([ex.down_proj[4 + g] for g in range(4)], dim=1)
    assert torch.equal(copy0.sort(dim=1).values, copy1.sort(dim=1).values)
    # Noise and Drop-Upcycling perturb the routed copies, never the shared expert; the result is seeded.
    for kw in (dict(expert_noise=0.01), dict(reinit_ratio=0.5)):
        out = tmp_path / next(iter(kw))
        _convert(tmp_path / "dense", out, 4, permute_copies=True, shared_neurons=32, shared_selection="random", **kw)
        other = next(iter(moe_blocks(upcycle.load(str(out))).values()))
        base = next(iter(moe_blocks(moe).values()))
        assert torch.equal(other.shared_expert.down_proj.weight, base.shared_expert.down_proj.weight)
        assert not torch.equal(other.experts.down_proj, base.experts.down_proj)


def test_padding_neurons_and_a_granularity_that_is_not_a_power_of_two(tmp_path):
    dense = make_dense("llama", tmp_path / "dense")  # F = 128: 3 segments of 43 (one zero neuron per copy)
    r = _convert(tmp_path / "dense", tmp_path / "moe", 3)
    assert (r.widths.expert, r.widths.padding) == (43, 1)
    ids = _ids()
    for backend in ("loop", "triton"):  # 43 is no grouped_mm width: auto takes loop
        moe = upcycle.load(r.out, experts_backend=backend)
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, dense(ids).logits, **F32)
    ex = next(iter(moe_blocks(moe).values())).experts
    assert not ex.down_proj[2, :, 42].any() and not ex.gate_up_proj[2, 42].any()  # the zero neuron


@pytest.mark.parametrize("G", [2, 4, 8, 3])
def test_bf16_segments_are_the_dense_weights_times_G(tmp_path, G):
    # Stored bf16, a power-of-two G scales without rounding: each segment's down projection divided by G is
    # the dense one bit for bit. G = 3 rounds (once, in the stored dtype).
    dense = make_dense("llama", tmp_path / "dense", dtype=torch.bfloat16)
    _convert(tmp_path / "dense", tmp_path / "moe", G)
    moe = upcycle.load(str(tmp_path / "moe"))
    layer = next(iter(moe_blocks(moe)))
    ex = moe.get_submodule(layer).experts
    w = dense.get_submodule(layer).down_proj.weight
    F_e = ex.ffn_size
    back = torch.cat([ex.down_proj[g] for g in range(G)], dim=1)[:, :128]
    exact = torch.equal((back.float() / G).bfloat16(), w) and torch.equal(back, (w.float() * G).bfloat16())
    assert exact == (G & (G - 1) == 0), (G, F_e)
    ids = _ids()
    with torch.no_grad():  # the model in bf16 (routing stays float32): what bf16 rounding allows
        torch.testing.assert_close(moe(ids).logits.float(), dense(ids).logits.float(), **TOLERANCES[torch.bfloat16])


def test_widths_plan_and_masks():
    assert plan_widths(1536, 4) == plan_widths(1536, 4, None, None)
    w = plan_widths(1536, 4, shared_fraction=0.25)
    assert (w.shared, w.expert, w.padding) == (384, 288, 0)
    w = plan_widths(1536, 8, shared_fraction=0.3)  # routed rounded to a multiple of 8 * 8
    assert w.routed % 64 == 0 and w.expert % 8 == 0 and w.padding == 0 and abs(w.shared / 1536 - 0.3) < 0.03
    w = plan_widths(100, 8)
    assert (w.expert, w.padding) == (13, 4)
    w = plan_widths(96, 8, shared_fraction=0.01)  # rounds to no shared neuron: round(f F) instead, at least 1
    assert w.shared == 1 and w.expert == 12 and w.padding == 1
    for kw, match in ((dict(shared_fraction=1.0), "between 0 and 1"), (dict(shared_fraction=0.0), "between 0 and 1"),
                      (dict(shared_neurons=95), "between 1 and 92"), (dict(shared_neurons=0), "between 1")):
        with pytest.raises(UpcycleError, match=match):
            plan_widths(96, 4, **kw)
    with pytest.raises(UpcycleError, match="more segments"):
        plan_widths(6, 8)
    idx = torch.tensor([0, 3, 8, 99])
    assert unpack_mask(pack_mask(idx, 100), 100) == idx.tolist()


def test_shared_neurons_by_activation_are_the_most_active(tmp_path):
    from upcycle.models.sources import open_source
    from upcycle.surgery.calibrate import calibration_ids

    dense = make_dense("llama", tmp_path / "dense")
    make_char_tokenizer().save_pretrained(tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", 4, shared_fraction=0.25, calibration_tokens=256)
    up = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycle"]
    assert up["shared"]["selection"] == "activation" and up["shared"]["calibration"]["tokens"] == 256
    # The same statistic, computed the plain way: the whole dense model, hooks on its MLPs.
    with open_source(str(tmp_path / "dense")) as src:
        ids = calibration_ids(src, "shakespeare", 256)
    score = {}
    for i in up["layer_ids"]:
        mlp = dense.model.layers[i].mlp
        mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: score.__setitem__(i, a[0].abs().reshape(-1, a[0].shape[-1]).double().mean(0)
                                                * m.weight.double().norm(dim=0)))
    with torch.no_grad():
        dense(ids)
    for i in up["layer_ids"]:
        want = score[i].argsort(descending=True)[:32].sort().values.tolist()
        assert unpack_mask(up["shared"]["masks"][str(i)], 128) == want
        assert 0.25 < up["shared"]["score_share"][str(i)] <= 1


def test_inspect_counts_active_parameters_and_flops_against_the_dense_model(tmp_path, capsys):
    # Checked against torch's own FLOP counter: the upcycle's extra FLOPs per token are the router's.
    from torch.utils.flop_counter import FlopCounterMode

    from upcycle.cli import main

    dense = make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", 4, copies=8, shared_fraction=0.25, shared_selection="random")
    assert main(["inspect", str(tmp_path / "moe"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_experts"], info["num_copies"], info["granularity"], info["top_k"]) == (32, 8, 4, 4)
    assert (info["expert_ffn_size"], info["shared_ffn_size"], info["dense_ffn_size"]) == (24, 32, 128)
    assert info["dense_params"] == sum(p.numel() for p in dense.parameters())
    router = 2 * 32 * 64  # two layers' routers: the one cost above the dense model
    assert info["active_params_per_token"] == info["dense_params"] + router
    moe = upcycle.load(str(tmp_path / "moe"), experts_backend="loop")
    ids = _ids(1, 16)
    counts = []
    for model in (dense, moe):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(ids)
        counts.append(fc.get_total_flops())
    extra = info["flops_per_token"] - info["dense_flops_per_token"]
    assert (counts[1] - counts[0]) / ids.numel() == extra == 2 * router
    # At top-G (one copy's worth) only the routers cost more: 2.6% at this toy width (0.08% for SmolLM2).
    assert info["flops_vs_dense"] == pytest.approx(info["flops_per_token"] / info["dense_flops_per_token"], abs=1e-4)
    assert 1 < info["flops_vs_dense"] < 1.03 and info["params_vs_dense"] > 1.5
    assert main(["inspect", str(tmp_path / "moe")]) == 0
    text = capsys.readouterr().out
    assert "flops_vs_dense" in text and "shared_ffn_size" in text and "random" in text


def test_eval_routing_table_reports_copies_and_degrouping(tmp_path, capsys):
    from upcycle.cli import main

    make_dense("llama", tmp_path / "dense")
    make_char_tokenizer().save_pretrained(tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", 4, shared_neurons=32, shared_selection="random")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    assert main(["eval", str(tmp_path / "moe"), "--text", str(text), "--baseline", "--seq-len", "64",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "copy load % min / max" in out and "de-grouped %" in out and "16 (4x4)" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("model.layers.")]
    assert len(rows) == 2 and all(" 0.00 " in r and " 1.00 " in r for r in rows)  # whole copies at t = 0


def test_degrouping_is_counted_when_segments_come_apart():
    from upcycle.moe.routing import route_topk
    from upcycle.moe.stats import RoutingStats

    # 3 tokens, 2 copies x 2 segments, top-2: whole copy, whole copy, one segment of each.
    logits = torch.tensor([[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 3.0, 3.0], [4.0, 0.0, 3.9, 0.0]])
    s = RoutingStats.from_routing(route_topk(logits, 2), granularity=2)
    assert s.degrouped_fraction == pytest.approx(1 / 3) and s.copies_per_token == pytest.approx(4 / 3)
    assert s.tokens_per_copy == [3, 3]
    assert RoutingStats.from_routing(route_topk(logits, 2)).degrouped_fraction is None


@pytest.mark.parametrize("extra, match", [
    (["--granularity", "4", "--top-k", "2"], "--top-k 2 is not a multiple of --granularity 4"),
    (["--granularity", "4", "--top-k", "6"], "--top-k 6 is not a multiple of --granularity 4"),
    (["--granularity", "2", "--routing", "expert-choice"], "--granularity 2 needs --routing topk"),
    (["--granularity", "4", "--experts", "1"], "--experts must be at least 2"),
    (["--granularity", "0"], "--granularity must be at least 1"),
    (["--shared-fraction", "1.5"], "--shared-fraction must be between 0 and 1"),
    (["--shared-fraction", "0"], "--shared-fraction must be between 0 and 1"),
    (["--shared-neurons", "128"], "--shared-neurons must be between 1 and 127"),
    (["--shared-neurons", "40", "--granularity", "4", "--shared-fraction", "0.2"], "not allowed with argument"),
    (["--permute-copies"], "--permute-copies needs --granularity > 1"),
    (["--shared-selection", "random"], "--shared-selection applies to a shared expert"),
    (["--shared-fraction", "0.25", "--calibration", "/nonexistent.txt"], "--calibration /nonexistent.txt: no such"),
])
def test_bad_fine_grained_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, match):
    from upcycle.cli import main

    make_dense("llama", tmp_path / "dense")
    make_char_tokenizer().save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    try:
        code = main(["convert", "--model", str(tmp_path / "dense"), "--layers", "2", "--out", str(out),
                     "--no-progress", *extra])
    except SystemExit as e:  # argparse's own errors (exclusive flags): one line too
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_checkpoints_written_before_granularity_load_unchanged(tmp_path):
    # An upcycle section without granularity, dense_ffn_size, shared_ffn_size (older versions) reads as G = 1.
    dense = make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", 1, top_k=2)
    path = tmp_path / "moe" / "config.json"
    raw = json.loads(path.read_text())
    del raw["upcycle"]["moe"]["granularity"]
    for k in ("dense_ffn_size", "shared_ffn_size", "padding"):
        del raw["upcycle"]["mlp"][k]
    del raw["upcycle"]["init"]["permute_copies"]
    path.write_text(json.dumps(raw))
    moe = upcycle.load(str(tmp_path / "moe"))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, **F32)
    info = upcycle.models.upcycled.describe(str(tmp_path / "moe"))
    assert info["num_experts"] == 4 and "granularity" not in info and info["flops_vs_dense"] > 1


def test_shared_expert_gives_pads_nothing(tmp_path):
    make_dense("llama", tmp_path / "dense")
    _convert(tmp_path / "dense", tmp_path / "moe", 2, shared_neurons=32, shared_selection="random")
    block = next(iter(moe_blocks(upcycle.load(str(tmp_path / "moe"))).values()))
    x = torch.randn(2, 5, 64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        y = block(x, token_mask=mask)
        x2 = x.clone()
        x2[1, 3:] = torch.randn(2, 64)
        y2 = block(x2, token_mask=mask)
    assert not y[1, 3:].any() and torch.equal(y[mask], y2[mask])
    assert math.isclose(block.last_stats.num_tokens, 8)
