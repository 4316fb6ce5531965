"""Checkpoint contract (DESIGN.md section 3) and round trips (4.4)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_dense
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.models import describe

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions


def _tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _convert(tmp_path, **kw):
    make_dense("llama", tmp_path / "dense")
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(tmp_path / "dense"), layers=2,
                                  moe=MoEConfig(num_experts=4), progress=False, **kw))
    return tmp_path / "moe"


def test_layout_and_sharding(tmp_path):
    moe = _convert(tmp_path, max_shard_size=200_000)
    files = sorted(os.listdir(moe))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(files)
    index = json.loads((moe / "model.safetensors.index.json").read_text())
    tensors = _tensors(moe)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert tensors["model.layers.3.mlp.experts.gate_up_proj"].shape == (4, 256, 64)
    assert tensors["model.layers.3.mlp.experts.down_proj"].shape == (4, 64, 128)
    assert tensors["model.layers.3.mlp.router.weight"].shape == (4, 64)
    assert "model.layers.3.mlp.gate_proj.weight" not in tensors
    assert "model.layers.1.mlp.gate_proj.weight" in tensors  # dense layers stay dense
    assert not [f for f in os.listdir(tmp_path) if "upcycle-tmp" in f]


def test_save_load_save_is_bit_exact(tmp_path):
    moe = _convert(tmp_path, expert_noise=0.01)
    model = upcycle.load(str(moe))
    model.save_pretrained(tmp_path / "again")
    a, b = _tensors(moe), _tensors(tmp_path / "again")
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ca = json.loads((moe / "config.json").read_text())
    cb = json.loads((tmp_path / "again" / "config.json").read_text())
    assert ca["upcycle"] == cb["upcycle"] and ca["model_type"] == cb["model_type"]
    again = upcycle.load(str(tmp_path / "again"))
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_automodel_loads_and_generates(tmp_path):
    moe = _convert(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(moe)
    assert type(model).__name__ == "UpcycleLlamaForCausalLM"
    ids = torch.randint(0, 128, (1, 5))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_describe_counts_parameters(tmp_path):
    moe = _convert(tmp_path)
    info = describe(str(moe))
    dense = make_dense("llama")
    total_dense = sum(p.numel() for p in dense.parameters())
    expert = 3 * 64 * 128
    # Two layers: each MLP became 4 experts + a router.
    assert info["total_params"] == total_dense + 2 * (3 * expert + 4 * 64)
    assert info["active_params_per_token"] == total_dense + 2 * (expert + 4 * 64)
    assert info["moe_layer_ids"] == [2, 3] and info["num_experts"] == 4 and info["routing"] == "topk"
    assert info["dtype"] == "F32" and info["size_on_disk_bytes"] > 0
