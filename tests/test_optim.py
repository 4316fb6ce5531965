"""Optimiser groups, learning-rate schedules and residual dropout of the training engine."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_dense
from upcycle.config import MoEConfig
from upcycle.moe import MoEBlock
from upcycle.train.config import OptimConfig, ScheduleConfig
from upcycle.train.model import add_residual_dropout
from upcycle.train.optim import build_optimizer, lr_factor, param_groups, param_kind


def _tiny_moe_model():
    model = make_dense("llama")
    for layer in model.model.layers[2:]:
        layer.mlp = MoEBlock(MoEConfig(num_experts=4), 64, 128, gated=True, activation="silu")
    return model


def test_param_groups_split_by_kind_with_their_learning_rates():
    model = _tiny_moe_model()
    groups = param_groups(model, OptimConfig(lr=1e-4, router_lr=1e-3, experts_lr=5e-5, weight_decay=0.1))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"router_no_decay", "experts", "rest", "rest_no_decay"}
    assert by_name["router_no_decay"]["lr"] == 1e-3 and by_name["router_no_decay"]["weight_decay"] == 0.0
    assert by_name["experts"]["lr"] == 5e-5 and by_name["experts"]["weight_decay"] == 0.1
    assert by_name["rest"]["lr"] == 1e-4
    # Every trainable parameter is in exactly one group; norms and biases do not decay.
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in by_name["rest_no_decay"]["params"])
    assert param_kind("model.layers.3.mlp.experts.lora_A") == "adapter"
    assert param_kind("model.layers.3.mlp.router.weight") == "router"


def test_adapter_group_and_frozen_parameters_left_out():
    from upcycle.adapters import LoraConfig, apply_lora

    model = apply_lora(_tiny_moe_model(), LoraConfig(r=4, experts=True))
    groups = param_groups(model, OptimConfig(lr=1e-4, adapter_lr=2e-4))
    assert {g["name"] for g in groups} == {"adapter"}
    assert groups[0]["lr"] == 2e-4
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.requires_grad_(False)
    with pytest.raises(Exception, match="nothing to train"):
        build_optimizer(model, OptimConfig())


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay_to_the_floor(decay):
    cfg = ScheduleConfig(warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    f = [lr_factor(s, 110, cfg) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))  # warmup rises
    if decay == "constant":
        assert f[-1] == 1.0
    else:
        assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
        assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))
    if decay == "cosine":
        assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))


def test_lima_schedule_is_linear_from_1e5_to_1e6_without_warmup():
    cfg = ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.1)
    lrs = [1e-5 * lr_factor(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-6)
    steps = [a - b for a, b in zip(lrs, lrs[1:])]
    assert max(steps) == pytest.approx(min(steps))


def test_residual_dropout_rises_over_layers_and_is_off_in_eval():
    model = make_dense("llama")
    rates = add_residual_dropout(model, 0.3)
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.randint(0, 128, (2, 16))
    model.eval()
    ref = make_dense("llama").eval()
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    a = model(x).logits
    torch.manual_seed(1)
    assert not torch.equal(a, model(x).logits)


# ---------------------------------------------------------------- bitsandbytes optimizers (the qlora extra)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_take_the_same_groups(name):
    pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
    from upcycle.train.optim import optimizer_state_bytes

    cfg = OptimConfig(name=name, lr=1e-4, router_lr=1e-3, experts_lr=5e-5, weight_decay=0.1, betas=[0.8, 0.9],
                      eps=1e-6)
    torch.manual_seed(0)
    model = _tiny_moe_model()
    opt = build_optimizer(model, cfg)
    ref = build_optimizer(model, OptimConfig(**{**cfg.__dict__, "name": "adamw"}))
    assert type(opt).__module__.startswith("bitsandbytes")
    keys = ("name", "lr", "initial_lr", "weight_decay")
    assert [{k: g[k] for k in keys} for g in opt.param_groups] == [{k: g[k] for k in keys} for g in ref.param_groups]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)
    x = torch.randint(0, 128, (2, 16))
    model(x, labels=x).loss.backward()
    for o in (opt, ref):
        o.step()
    experts = model.model.layers[3].mlp.experts.gate_up_proj  # 4 x 256 x 64: past bitsandbytes' 4,096-element floor
    state = opt.state[experts]
    if name.endswith("8bit"):
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8
        # Both moments in 8 bits plus their block constants: little more than a quarter of AdamW's fp32 pair.
        ratio = optimizer_state_bytes(opt) / optimizer_state_bytes(ref)
        assert 0.25 < ratio < 0.35, ratio  # the tiny model's small tensors (< 4,096 elements) keep fp32 moments
    else:
        assert state["state1"].dtype == torch.float32


def test_an_8bit_optimizer_without_bitsandbytes_is_a_one_line_error(monkeypatch):
    import sys

    from upcycle.errors import UpcycleError
    from upcycle.train.optim import check_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    check_optimizer("adamw")  # torch's: needs nothing
    with pytest.raises(UpcycleError, match=r"^optim.name=paged_adamw_8bit needs bitsandbytes, which is not "
                                           r"installed: pip install 'upcycle\[qlora\]'") as e:
        check_optimizer("paged_adamw_8bit")
    assert "\n" not in str(e.value)
    with pytest.raises(UpcycleError, match="nothing to train"):  # frozen model: that error first
        build_optimizer(make_dense("llama").requires_grad_(False), OptimConfig(name="adamw_8bit"))
