"""MoE components against references: backends agree (DESIGN.md 4.3), routing rules,
causality (4.2), block-level function preservation (4.1), aux losses, statistics.

    python -m pytest -q tests/test_moe.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOLERANCES
from torch import nn
from transformers.activations import ACT2FN

from upcycle.config import MoEConfig
from upcycle.errors import UpcycleError
from upcycle.moe import (
    EXPERT_BACKENDS,
    MoEBlock,
    StackedExperts,
    aux_loss,
    expert_capacity,
    load_balancing_loss,
    moe_blocks,
    resolve_backend,
    route_expert_choice,
    route_topk,
    routing_stats,
    set_experts_backend,
    z_loss,
)

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions

F32 = TOLERANCES[torch.float32]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_assignments(T, E, A, seed, empty_experts=(0,)):
    """Arbitrary (token, expert, weight) triples; experts in ``empty_experts`` get none."""
    g = _gen(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty_experts])
    token_idx = torch.randint(0, T, (A,), generator=g)
    expert_idx = allowed[torch.randint(0, len(allowed), (A,), generator=g)]
    weight = torch.rand(A, generator=g)
    return token_idx, expert_idx, weight


def _experts(E, D, Fn, gated, bias, dtype=torch.float32, seed=0, activation="silu", **kw):
    torch.manual_seed(seed)
    ex = StackedExperts(E, D, Fn, gated=gated, activation=activation, bias=bias, dtype=dtype, **kw)
    if bias:  # zero-initialised biases would leave their gradient paths untested
        with torch.no_grad():
            for name, p in ex.named_parameters():
                if name.endswith("_bias"):
                    p.normal_()
    return ex


def _run(ex, backend, x, tok, exp, w, grad_out):
    """Forward + backward; returns the output and every gradient (None -> zeros)."""
    ex.backend = backend
    ex.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = ex(x, tok, exp, w)
    if y.requires_grad:
        y.backward(grad_out)
    grads = {"x": x.grad, "weight": w.grad, **{n: p.grad for n, p in ex.named_parameters()}}
    ref = {"x": x, "weight": w, **dict(ex.named_parameters())}
    return y.detach(), {k: torch.zeros_like(ref[k]) if g is None else g for k, g in grads.items()}


# ---------------------------------------------------------------- 1. backends agree


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_mm_matches_loop_forward_and_every_gradient(gated, bias, seed):
    g = _gen(100 + seed)
    E = int(torch.randint(3, 7, (), generator=g))
    D = 4 * int(torch.randint(1, 7, (), generator=g))  # fp32 grouped_mm rows: multiples of 4
    Fn = 4 * int(torch.randint(1, 9, (), generator=g))
    T = int(torch.randint(5, 40, (), generator=g)) | 1  # odd: never a block multiple
    A = int(torch.randint(1, 3 * T, (), generator=g))
    ex = _experts(E, D, Fn, gated, bias, seed=seed, activation="silu" if gated else "gelu_new")
    x = torch.randn(T, D, generator=g)
    tok, exp, w = _random_assignments(T, E, A, seed, empty_experts=(0, E - 2))
    grad_out = torch.randn(T, D, generator=g)
    y_loop, g_loop = _run(ex, "loop", x, tok, exp, w, grad_out)
    y_gmm, g_gmm = _run(ex, "grouped_mm", x, tok, exp, w, grad_out)
    torch.testing.assert_close(y_gmm, y_loop, **F32)
    for name in g_loop:
        torch.testing.assert_close(g_gmm[name], g_loop[name], **F32, msg=lambda m: f"grad of {name}: {m}")
    # Empty experts get exactly zero weight gradient, not garbage.
    assert g_gmm["down_proj"][0].abs().max() == 0
    assert set(g_loop) >= {"x", "weight", "down_proj", "gate_up_proj" if gated else "up_proj"}


def test_grouped_mm_matches_loop_bf16():
    ex = _experts(4, 16, 24, True, True, dtype=torch.bfloat16)
    g = _gen(3)
    x = torch.randn(21, 16, generator=g, dtype=torch.bfloat16)
    tok, exp, w = _random_assignments(21, 4, 42, 3)
    grad_out = torch.randn(21, 16, generator=g, dtype=torch.bfloat16)
    y_loop, g_loop = _run(ex, "loop", x, tok, exp, w, grad_out)
    y_gmm, g_gmm = _run(ex, "grouped_mm", x, tok, exp, w, grad_out)
    assert y_gmm.dtype == torch.bfloat16
    torch.testing.assert_close(y_gmm, y_loop, **TOLERANCES[torch.bfloat16])
    for name in g_loop:
        # Weight gradients sum ~10 bf16 products per entry; scale the bound by the magnitude.
        scale = g_loop[name].float().abs().max().clamp_min(1.0).item()
        torch.testing.assert_close(g_gmm[name].float(), g_loop[name].float(), atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_sum_backward_and_empty_input(backend):
    # out.sum().backward() hands grouped_mm a stride-0 gradient, which it rejects unless fixed up.
    ex = _experts(3, 8, 8, True, False, backend=backend)
    x = torch.randn(5, 8, requires_grad=True)
    tok, exp, w = _random_assignments(5, 3, 9, 0, empty_experts=())
    ex(x, tok, exp, w.requires_grad_()).sum().backward()
    assert x.grad is not None and ex.gate_up_proj.grad is not None
    empty = torch.empty(0, dtype=torch.long)
    y = ex(torch.randn(4, 8), empty, empty, torch.empty(0))
    assert torch.equal(y, torch.zeros(4, 8))


def test_grad_contiguous_guard_lets_grouped_mm_take_a_sum_backward():
    from upcycle.moe.compute import grad_contiguous as _grad_contiguous

    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 4, 8, requires_grad=True)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError):  # the torch limitation the guard exists for
        F.grouped_mm(x, w.transpose(-2, -1), offs=offs).sum().backward()
    _grad_contiguous(F.grouped_mm(x, w.transpose(-2, -1), offs=offs)).sum().backward()
    torch.testing.assert_close(w.grad[1], torch.ones(4, 4) @ x[2:6].detach(), **F32)


def _reference_experts_f64(ex, x, tok, exp, w):
    """Per-assignment float64 reference written from the definition, no batching."""
    p = {n: t.detach().double() for n, t in ex.named_parameters()}
    act = ACT2FN[ex.activation]
    y = torch.zeros(x.shape, dtype=torch.float64)
    Fn = ex.ffn_size
    for t, e, wt in zip(tok.tolist(), exp.tolist(), w.double()):
        xt = x[t].double()
        if ex.gated:
            gu = p["gate_up_proj"][e] @ xt + (p["gate_up_proj_bias"][e] if ex.has_bias else 0)
            h = act(gu[:Fn]) * gu[Fn:]
        else:
            h = act(p["up_proj"][e] @ xt + (p["up_proj_bias"][e] if ex.has_bias else 0))
        y[t] += wt * (p["down_proj"][e] @ h + (p["down_proj_bias"][e] if ex.has_bias else 0))
    return y


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_loop_matches_float64_reference(gated, bias):
    ex = _experts(4, 6, 10, gated, bias, activation="silu" if gated else "gelu")  # unaligned: loop only
    x = torch.randn(13, 6, generator=_gen(5))
    tok, exp, w = _random_assignments(13, 4, 30, 5, empty_experts=(2,))
    ref = _reference_experts_f64(ex, x, tok, exp, w)
    assert ex.resolved_backend() == "loop"
    torch.testing.assert_close(ex(x, tok, exp, w).double(), ref, **F32)
    ex64 = ex.double()
    torch.testing.assert_close(ex64(x.double(), tok, exp, w.double()), ref, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- 2. top-K


def test_topk_weights_and_distinct_experts():
    logits = torch.randn(50, 8, generator=_gen(0))
    r = route_topk(logits, top_k=3)
    w_TK, e_TK = r.weight_A.view(50, 3), r.expert_idx_A.view(50, 3)
    torch.testing.assert_close(w_TK.sum(-1), torch.ones(50), **F32)
    assert all(len(set(row)) == 3 for row in e_TK.tolist())
    assert torch.equal(r.token_idx_A, torch.arange(50).repeat_interleave(3))
    probs = torch.softmax(logits, -1)
    # The K chosen are the K largest probabilities.
    assert torch.equal(probs.gather(1, e_TK).min(-1).values, probs.topk(3, -1).values[:, -1])
    raw = route_topk(logits, top_k=3, normalize=False)
    torch.testing.assert_close(raw.weight_A, probs[raw.token_idx_A, raw.expert_idx_A], **F32)
    assert int(r.num_dropped) == 0 and int(r.num_unrouted) == 0
    assert r.tokens_per_expert_E.sum() == 150


def _capacity_reference(e_TK, E, c, group_size):
    """Switch/GShard priority written out: slot k before slot k+1, then token order."""
    T, K = e_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for g0 in range(0, T, group_size):
        n = min(group_size, T - g0)
        cap = math.ceil(c * n * K / E)
        used = [0] * E
        for k in range(K):
            for t in range(g0, g0 + n):
                e = int(e_TK[t, k])
                if used[e] < cap:
                    used[e] += 1
                    keep[t, k] = True
    return keep


@pytest.mark.parametrize("c,group_size", [(1.0, None), (0.5, 16), (1.25, 7), (4.0, None)])
def test_topk_capacity_caps_experts_and_counts_drops(c, group_size):
    T, E, K = 50, 8, 2
    # Skewed logits so some experts overflow.
    logits = torch.randn(T, E, generator=_gen(1)) + torch.linspace(2, 0, E)
    full = route_topk(logits, K)
    r = route_topk(logits, K, capacity_factor=c, group_size=group_size)
    keep = _capacity_reference(full.expert_idx_A.view(T, K), E, c, group_size or T)
    assert torch.equal(r.token_idx_A, full.token_idx_A[keep.view(-1)])
    assert torch.equal(r.expert_idx_A, full.expert_idx_A[keep.view(-1)])
    # Kept weights are the dropless ones: no renormalisation after a drop.
    assert torch.equal(r.weight_A, full.weight_A[keep.view(-1)])
    assert int(r.num_dropped) == (~keep).sum() == T * K - r.token_idx_A.numel()
    assert int(r.num_unrouted) == (~keep.any(-1)).sum()
    gs = group_size or T
    for g0 in range(0, T, gs):
        n = min(gs, T - g0)
        in_group = (r.token_idx_A >= g0) & (r.token_idx_A < g0 + n)
        assert torch.bincount(r.expert_idx_A[in_group], minlength=E).max() <= expert_capacity(c, n, K, E)
    assert torch.equal(r.tokens_per_expert_E, torch.bincount(r.expert_idx_A, minlength=E))
    if c < 4.0:
        assert int(r.num_dropped) > 0
    else:
        assert int(r.num_dropped) == 0  # cap = N*K/E*4 >= any load here


# ---------------------------------------------------------------- 3. expert choice


@pytest.mark.parametrize("B,S,E,C", [(8, 5, 4, 1.0), (6, 3, 8, 2.0), (3, 4, 4, 8.0), (1, 7, 4, 2.0), (5, 9, 3, 0.5)])
@pytest.mark.parametrize("group", ["position", "sequence"])
def test_expert_choice_every_expert_takes_exactly_C_tokens(B, S, E, C, group):
    logits = torch.randn(B, S, E, generator=_gen(B * S + E))
    r = route_expert_choice(logits, C, group=group)
    n = B if group == "position" else S
    cap = min(n, math.ceil(C * n / E))  # clamped to the group size, e.g. (3, 4, 4, 8.0)
    probs = torch.softmax(logits, -1).reshape(B * S, E)
    torch.testing.assert_close(r.weight_A, probs[r.token_idx_A, r.expert_idx_A], atol=0, rtol=0)
    group_of = (r.token_idx_A % S) if group == "position" else (r.token_idx_A // S)
    for e in range(E):
        for gi in range(S if group == "position" else B):
            sel = (r.expert_idx_A == e) & (group_of == gi)
            toks = r.token_idx_A[sel]
            assert toks.numel() == cap and toks.unique().numel() == cap
            # They are the expert's cap most probable tokens of that group.
            members = torch.tensor([t for t in range(B * S) if (t % S if group == "position" else t // S) == gi])
            assert probs[toks, e].min() >= probs[members, e].topk(cap).values.min()
    assert r.tokens_per_expert_E.tolist() == [cap * (S if group == "position" else B)] * E
    routed = torch.zeros(B * S, dtype=torch.bool)
    routed[r.token_idx_A] = True
    assert int(r.num_unrouted) == (~routed).sum()


# ---------------------------------------------------------------- 4. causality


def _block(routing="topk", seed=0, D=16, Fn=32, E=4, gated=True, bias=False, backend="auto", **cfg):
    torch.manual_seed(seed)
    block = MoEBlock(MoEConfig(num_experts=E, routing=routing, **cfg), D, Fn, gated=gated,
                     activation="silu" if gated else "gelu", bias=bias, backend=backend)
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0)  # decisive routing so changes show up
    return block.eval()


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("routing", ["topk", "expert-choice"])
def test_causal_routing_past_outputs_bitwise_unchanged(routing, backend):
    block = _block(routing, backend=backend, capacity=1.0, ec_group="position", topk_capacity_factor=1.0)
    x = torch.randn(4, 12, 16, generator=_gen(0))
    changed = x.clone()
    t = 6
    changed[:, t + 1:] = torch.randn(4, 12 - t - 1, 16, generator=_gen(1))
    with torch.no_grad():
        a, b = block(x), block(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_sequence_grouped_expert_choice_leaks_the_future():
    with pytest.warns(UserWarning, match="not causal"):
        block = _block("expert-choice", capacity=1.0, ec_group="sequence")
    x = torch.randn(2, 12, 16, generator=_gen(0))
    changed = x.clone()
    changed[:, 7:] = 3 * torch.randn(2, 5, 16, generator=_gen(1))
    with torch.no_grad():
        a, b = block(x), block(changed)
    assert not torch.allclose(a[:, :7], b[:, :7])


def test_topk_capacity_applies_in_training_only():
    block = _block(E=4, top_k=1, topk_capacity_factor=1.0)
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0  # collapse: all tokens prefer expert 0 when x[..., 0] > 0
    x = torch.randn(2, 8, 16, generator=_gen(0)).abs()
    block(x)
    assert block.last_stats.dropped_fraction == 0.0 and block.aux_loss is None
    block.train()
    block(x)
    # 16 tokens, cap ceil(16 / 4) = 4 on expert 0: 12 dropped.
    assert block.last_stats.dropped_fraction == pytest.approx(12 / 16)
    assert block.last_stats.unrouted_fraction == pytest.approx(12 / 16)


# ---------------------------------------------------------------- 5. function preservation


class _DenseMLP(nn.Module):
    def __init__(self, D, Fn, gated, bias, act):
        super().__init__()
        self.gated, self.act = gated, ACT2FN[act]
        self.gate = nn.Linear(D, Fn, bias=bias) if gated else None
        self.up, self.down = nn.Linear(D, Fn, bias=bias), nn.Linear(Fn, D, bias=bias)

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(h)


def _copy_dense_into(block, dense):
    ex = block.experts
    with torch.no_grad():
        for e in range(ex.num_experts):
            if ex.gated:
                ex.gate_up_proj[e] = torch.cat([dense.gate.weight, dense.up.weight])
            else:
                ex.up_proj[e] = dense.up.weight
            ex.down_proj[e] = dense.down.weight
            if ex.has_bias:
                ex.down_proj_bias[e] = dense.down.bias
                if ex.gated:
                    ex.gate_up_proj_bias[e] = torch.cat([dense.gate.bias, dense.up.bias])
                else:
                    ex.up_proj_bias[e] = dense.up.bias


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("routing", ["topk", "expert-choice"])
def test_identical_experts_reproduce_the_dense_mlp(gated, bias, backend, routing):
    torch.manual_seed(0)
    dense = _DenseMLP(16, 32, gated, bias, "silu" if gated else "gelu")
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.3)
    block = _block(routing, gated=gated, bias=bias, backend=backend, E=6, top_k=2, capacity=2.0)
    _copy_dense_into(block, dense)
    # Expert choice with batch 1: each group is one token, every expert takes it, weights sum to 1.
    x = torch.randn(3 if routing == "topk" else 1, 11, 16, generator=_gen(2))
    with torch.no_grad():
        torch.testing.assert_close(block(x), dense(x), **F32)
    if routing == "expert-choice":
        assert block.last_stats.tokens_per_expert == [11] * 6


# ---------------------------------------------------------------- 6. aux losses


def test_balancing_loss_uniform_is_one_collapsed_is_more():
    T, E, K = 64, 8, 2
    uniform_probs = torch.full((T, E), 1 / E)
    even = torch.arange(T * K) % E
    assert load_balancing_loss(uniform_probs, even, E, K).item() == pytest.approx(1.0)
    collapsed_probs = torch.softmax(torch.tensor([8.0] + [0.0] * (E - 1)).expand(T, E), -1)
    collapsed = torch.zeros(T, dtype=torch.long)
    assert load_balancing_loss(collapsed_probs, collapsed, E, 1).item() > 7.0  # -> E as routing collapses


def test_z_loss_matches_formula():
    logits = torch.randn(10, 5, generator=_gen(0))
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("routing", ["topk", "expert-choice"])
def test_block_aux_loss_is_weighted_sum_with_router_gradient(routing):
    block = _block(routing, aux_loss_weight=0.5, z_loss_weight=0.25).train()
    x = torch.randn(2, 9, 16, generator=_gen(0))
    block(x)
    r = block.route(x)
    balance = load_balancing_loss(r.probs_TE, r.topk_idx_TK, 4, 2) if routing == "topk" else 0.0
    expected = 0.5 * balance + 0.25 * z_loss(r.logits_TE)
    torch.testing.assert_close(block.aux_loss, torch.as_tensor(expected), **F32)
    block.aux_loss.backward()
    assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0
    block.eval()
    block(x)
    assert block.aux_loss is None


class _CountingRouter(nn.Module):
    """A router wrapped as PEFT (modules_to_save) or a quantiser wraps one: its own forward must run."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("wrapped", [False, True], ids=["router", "wrapped-router"])
@pytest.mark.parametrize("routing", ["topk", "expert-choice"])
def test_routing_is_float32_whatever_autocast_says(routing, wrapped):
    # The shape (8 experts, hidden 576, 4,096 tokens) and convert's router init (std 0.02): under
    # CPU autocast, which casts like CUDA's, the bf16 router gave 0.6% of the tokens another top-2 set.
    block = _block(routing, D=576, Fn=32, E=8, backend="loop", aux_loss_weight=0.01, z_loss_weight=0.001).train()
    with torch.no_grad():
        block.router.weight.normal_(0, 0.02, generator=_gen(1))
    if wrapped:
        block.router = _CountingRouter(block.router)
    x = torch.randn(2, 2048, 576, generator=_gen(0))
    want = block.route(x)
    block(x)
    want_aux = block.aux_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block.route(x)
        block(x)
    for field in ("token_idx_A", "expert_idx_A", "weight_A", "logits_TE", "probs_TE"):
        assert torch.equal(getattr(want, field), getattr(got, field)), field
    assert torch.equal(want_aux, block.aux_loss)  # balancing + z-loss, from the same float32 logits
    torch.testing.assert_close(z_loss(got.logits_TE), z_loss(want.logits_TE), atol=0, rtol=0)
    if wrapped:
        assert block.router.calls == 4
        bf16 = block.to(torch.bfloat16)  # a bf16 model: the wrapper takes its own dtype, not a float32 input
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert bf16.route(x.to(torch.bfloat16)).logits_TE.dtype == torch.float32


# ---------------------------------------------------------------- 7. stats and helpers


def test_routing_stats_and_model_helpers():
    model = nn.Sequential(_block(top_k=2), nn.Identity(), _block("expert-choice", capacity=1.0, seed=1))
    assert list(moe_blocks(model)) == ["0", "2"]
    with torch.no_grad():
        model[0].router.weight.zero_()  # uniform router probabilities
    assert routing_stats(model) == {}
    x = torch.randn(3, 5, 16, generator=_gen(0))
    model(x)
    stats = routing_stats(model)
    s0, s2 = stats["0"], stats["2"]
    assert sum(s0.tokens_per_expert) == s0.num_assignments == 15 * 2 and s0.num_tokens == 15
    assert s0.entropy == pytest.approx(math.log(4), rel=1e-6)
    assert s0.z == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert s0.dropped_fraction == 0.0 and s0.unrouted_fraction == 0.0
    assert s2.tokens_per_expert == [5] * 4  # C = ceil(1.0 * 3 / 4) = 1 per position, 5 positions
    assert 0.0 <= s2.unrouted_fraction < 1.0 and s2.entropy < math.log(4)
    assert set(s0.to_dict()) >= {"tokens_per_expert", "num_tokens", "dropped_fraction", "unrouted_fraction",
                                 "entropy", "z"}
    assert aux_loss(model) is None  # eval mode
    model.train()
    model(x)
    torch.testing.assert_close(aux_loss(model), model[0].aux_loss + model[2].aux_loss)
    set_experts_backend(model, "loop")
    assert all(b.experts.backend == "loop" for b in moe_blocks(model).values())
    model[0].record_stats = False
    model(x)
    assert list(routing_stats(model)) == ["2"]


# ---------------------------------------------------------------- 8. errors


def test_bad_backends_fail_clearly():
    with pytest.raises(UpcycleError, match="unknown experts backend 'nope'") as err:
        StackedExperts(2, 8, 8, gated=True, activation="silu", backend="nope")
    assert all(name in str(err.value) for name in EXPERT_BACKENDS)
    with pytest.raises(UpcycleError, match="float64"):
        StackedExperts(2, 8, 8, gated=True, activation="silu", backend="grouped_mm", dtype=torch.float64)
    with pytest.raises(UpcycleError, match="multiples of 4"):
        StackedExperts(2, 6, 8, gated=True, activation="silu", backend="grouped_mm")
    assert resolve_backend("auto", torch.float64, 8, 8) == "loop"
    assert resolve_backend("auto", torch.bfloat16, 8, 16) == "grouped_mm"
    assert resolve_backend("auto", torch.bfloat16, 12, 16) == "loop"
    block = _block()
    with pytest.raises(UpcycleError, match="valid: auto, loop, grouped_mm"):
        set_experts_backend(nn.Sequential(block), "cuda")
    with pytest.raises(UpcycleError, match=r"\[batch, seq, 16\]"):
        block(torch.randn(2, 3, 8))
    with pytest.raises(UpcycleError, match="top_k"):
        route_topk(torch.randn(4, 3), top_k=4)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_experts_compute_in_the_autocast_dtype(backend):
    # Master weights stay fp32; under autocast the experts run in bf16, as autocast's own matmuls do.
    import copy

    ex = _experts(4, 16, 24, True, True, backend=backend)
    x = torch.randn(9, 16, requires_grad=True)
    tok, exp, w = _random_assignments(9, 4, 18, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(x, tok, exp, w)
    as_bf16 = copy.deepcopy(ex).to(torch.bfloat16)
    assert torch.equal(y, as_bf16(x, tok, exp, w))
    y.float().sum().backward()
    assert ex.down_proj.grad.dtype == torch.float32 and ex.down_proj.grad.abs().sum() > 0
