"""``upcycle export``: a process that never imports upcycle loads the result and gets the same
logits and greedy tokens (DESIGN.md invariant 4.7); what a format cannot carry is refused.

    python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_char_tokenizer, make_dense, needs_smollm2
from stock_load import assert_stock_equals_upcycle as _same
from stock_load import exported_tensors as _exported_tensors
from tolerances import REAL_MODEL_FP32

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main
from upcycle.moe import moe_blocks

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions

def _upcycle(tmp_path, name="moe", arch="llama", layers=2, **moe):
    dense = tmp_path / f"{name}-dense"
    make_dense(arch, dense)
    make_char_tokenizer().save_pretrained(dense)
    upcycle.convert(ConvertConfig(out=str(tmp_path / name), model=str(dense), layers=layers, progress=False,
                                  moe=MoEConfig(num_experts=4, **moe)))
    return tmp_path / name


def test_fresh_upcycle_to_qwen2_moe(tmp_path, capsys):
    src = _upcycle(tmp_path)
    assert main(["export", str(src), "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    assert "Qwen2MoeForCausalLM (qwen2_moe), MoE layers 2,3" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0, 1] and cfg["shared_expert_intermediate_size"] == 0
    assert cfg["norm_topk_prob"] is True and "upcycle" not in cfg
    assert (tmp_path / "q" / "tokenizer.json").is_file() and "fingerprint" in (tmp_path / "q" / "README.md").read_text()
    _same(src, tmp_path / "q", tmp_path)


STOCK_MOE = {
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
                      num_experts_per_tok=2, mlp_only_layers=[0], decoder_sparse_step=1),
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3, head_dim=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("arch", list(STOCK_MOE) + ["export"])
def test_inspect_counts_the_active_parameters_of_stock_moe_checkpoints(tmp_path, capsys, arch):
    # Active parameters were reported equal to the total for stock MoE checkpoints, our exports included. Counted
    # here from transformers' own modules: of every routed experts module K/E is active, the rest (attention, dense
    # layers, the shared expert, routers) always is.
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "export":
        path = tmp_path / "q"
        assert main(["export", str(_upcycle(tmp_path)), "--out", str(path), "--no-progress"]) == 0
        model, E, K = AutoModelForCausalLM.from_pretrained(path), 4, 2
    else:
        config = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **STOCK_MOE[arch])
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_path / arch
        model.save_pretrained(path)
        E = STOCK_MOE[arch].get("num_experts") or STOCK_MOE[arch]["num_local_experts"]
        K = STOCK_MOE[arch]["num_experts_per_tok"]
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for m in model.modules() if type(m).__name__.endswith("Experts") for p in m.parameters())
    assert routed > 0
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == total
    assert (info["active_params_per_token"], info["num_experts"], info["experts_per_token"]) == (
        total - routed * (E - K) // E, E, K)


def test_trained_upcycle_with_qkv_biases(tmp_path):
    """A Qwen2 source (q/k/v biases) whose router and experts moved away from the copies."""
    src = _upcycle(tmp_path, arch="qwen2", normalize_topk=False)
    model = upcycle.load(str(src))
    torch.manual_seed(1)
    with torch.no_grad():
        for block in moe_blocks(model).values():
            block.router.weight.normal_(0, 0.5)
            block.experts.down_proj.add_(0.05 * torch.randn_like(block.experts.down_proj))
    model.save_pretrained(tmp_path / "trained")
    make_char_tokenizer().save_pretrained(tmp_path / "trained")
    assert main(["export", str(tmp_path / "trained"), "--format", "qwen2_moe", "--out", str(tmp_path / "q2"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["norm_topk_prob"] is False
    _same(tmp_path / "trained", tmp_path / "q2", tmp_path)


def test_softmax_then_topk_upcycle_with_weight_scaling(tmp_path):
    """Fine-grained, raw top-K weights and E/K in the down projections (He et al.'s softmax-then-top-K): the
    scale lives in the weights, and qwen2_moe with norm_topk_prob false carries it."""
    dense = tmp_path / "dense"
    make_dense("llama", dense)
    make_char_tokenizer().save_pretrained(dense)
    moe = MoEConfig(num_experts=8, granularity=2, top_k=2, normalize_topk=False)
    with pytest.warns(UserWarning, match="weight scaling"):
        upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(dense), layers=2, moe=moe, progress=False,
                                      weight_scaling=True))
    assert main(["export", str(tmp_path / "moe"), "--format", "qwen2_moe", "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["norm_topk_prob"] is False and cfg["num_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    _same(tmp_path / "moe", tmp_path / "q", tmp_path)


def test_lora_adapter_exports_through_its_base(tmp_path):
    from upcycle.adapters import LoraConfig, apply_lora, merge_command, save_adapter

    src = _upcycle(tmp_path)
    model = apply_lora(upcycle.load(str(src)), LoraConfig(r=4, train_router=True))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_adapter(model, str(tmp_path / "adapter"), base_path=str(src))
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", "moe", "moe-dense", "q"])  # the merge left nothing
    merge_command(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    _same(tmp_path / "merged", tmp_path / "q", tmp_path)


def test_all_moe_model_to_mixtral(tmp_path):
    src = _upcycle(tmp_path, layers=4)
    assert main(["export", str(src), "--format", "auto", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    _same(src, tmp_path / "m", tmp_path, cls="MixtralForCausalLM")


def test_qwen3_base_to_qwen3_moe_with_mlp_only_layers(tmp_path, capsys):
    """QK-norm carried: a Qwen3 base exports to Qwen3-MoE (auto picks it), dense layers in mlp_only_layers."""
    src = _upcycle(tmp_path, arch="qwen3")
    _perturb(src, tmp_path / "trained", seed=3)
    assert main(["export", str(tmp_path / "trained"), "--out", str(tmp_path / "q3"), "--no-progress"]) == 0
    assert "Qwen3MoeForCausalLM (qwen3_moe), MoE layers 2,3" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "q3" / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0, 1] and cfg["num_experts"] == 4 and cfg["head_dim"] == 16
    _same(tmp_path / "trained", tmp_path / "q3", tmp_path, cls="Qwen3MoeForCausalLM")


def test_rope_scaling_is_carried(tmp_path):
    """Llama 3's rope scaling (rope_parameters) goes into the stock config as it is: transformers computes
    every family's rotary frequencies with the same functions."""
    rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16)
    dense = tmp_path / "dense"
    make_dense("llama", dense, rope_parameters=rope)
    make_char_tokenizer().save_pretrained(dense)
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(dense), layers=2, progress=False,
                                  moe=MoEConfig(num_experts=4)))
    src = _perturb(tmp_path / "moe", tmp_path / "trained")
    assert main(["export", str(src), "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    _same(src, tmp_path / "q", tmp_path)


def _perturb(src, out, seed=1, normalize=None):
    """A copy of upcycled ``src`` whose routers and experts moved away from the fresh copies."""
    model = upcycle.load(str(src))
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model).values():
            block.router.weight.normal_(0, 0.5)
            block.experts.down_proj.add_(0.05 * torch.randn_like(block.experts.down_proj))
    model.save_pretrained(out)
    make_char_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("fmt,arch,cls", [("qwen2_moe", "qwen2", "Qwen2MoeForCausalLM"),
                                          ("mixtral", "llama", "MixtralForCausalLM"),
                                          ("qwen3_moe", "qwen3", "Qwen3MoeForCausalLM")])
def test_all_moe_turns_dense_layers_into_identical_experts(tmp_path, capsys, fmt, arch, cls):
    """--all-moe: each dense MLP as E copies under a zero router: exact, for a trained upcycle too."""
    src = _perturb(_upcycle(tmp_path, arch=arch, layers=1), tmp_path / "trained")
    out = tmp_path / "all"
    assert main(["export", str(src), "--format", fmt, "--all-moe", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "MoE layers 0,1,2,3 (0,1,2 as identical copies)" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("mlp_only_layers", []) == []
    tensors = _exported_tensors(out)
    moe = "block_sparse_moe" if fmt == "mixtral" else "mlp"
    assert f"model.layers.0.{moe}.experts.3.{'w1' if fmt == 'mixtral' else 'gate_proj'}.weight" in tensors
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not f.get_tensor(f"model.layers.0.{moe}.gate.weight").any()  # the zero router
        if fmt != "mixtral":
            assert f.get_tensor("model.layers.0.mlp.experts.2.gate_proj.weight").equal(
                upcycle.load(str(src)).model.layers[0].mlp.gate_proj.weight)
    if fmt == "qwen2_moe":  # SGLang serves only every-layer-MoE Qwen2-MoE: this is the form to give it
        assert "SGLang 0.5.23" in printed and "do NOT" not in printed
    _same(src, out, tmp_path, cls=cls)


@pytest.mark.parametrize("case,args,message", [
    ("expert-choice", ["--format", "qwen2_moe"], "cannot export expert-choice routing"),
    ("gpt_neox", ["--format", "qwen2_moe"], "the dense parts of a gpt_neox model"),
    ("qwen3", ["--format", "qwen2_moe"], "QK-norm (Qwen2-MoE attention has none); qwen3_moe could carry it"),
    ("partial", ["--format", "qwen3_moe"], "a llama model (Qwen3-MoE attention always applies QK-norm); "
                                           "qwen2_moe could carry it"),
    ("partial", ["--format", "mixtral"], "only layers 2,3 of 4 are MoE (Mixtral has MoE in every layer); "
                                         "qwen2_moe (or mixtral with --all-moe) could carry it"),
    ("no-normalize", ["--format", "mixtral"], "not renormalised (Mixtral always renormalises); qwen2_moe could carry it"),
    ("partial-no-normalize", ["--all-moe"], "cannot export --all-moe without renormalised top-K: E identical copies "
                                            "under tied router logits would give 2/4 of each dense MLP"),
    ("head-dim", ["--format", "qwen2_moe"], "a head size of 32 (Qwen2-MoE uses hidden / heads); mixtral could carry it"),
    ("sliding", ["--format", "qwen2_moe"], "sliding-window attention; mixtral could carry it"),
    ("dense", ["--format", "qwen2_moe"], "not an upcycled checkpoint"),
    ("partial", ["--format", "qwen2_moe", "--outtype", "q8_0"], "--outtype is for --format gguf"),
    ("partial", ["--format", "gguf", "--dtype", "float16"], "--dtype is for the safetensors formats"),
])
def test_what_a_format_cannot_carry_is_refused(tmp_path, capsys, case, args, message):
    if case == "dense":
        make_dense("llama", tmp_path / "src")
        src = tmp_path / "src"
    else:
        arch = case if case in ("gpt_neox", "qwen3") else "mistral" if case == "sliding" else "llama"
        extra = {"head-dim": dict(head_dim=32), "sliding": dict(sliding_window=8)}.get(case, {})
        moe = dict(routing="expert-choice") if case == "expert-choice" else (
            dict(normalize_topk=False) if case.endswith("no-normalize") else {})
        dense = tmp_path / "dense"
        make_dense(arch, dense, **extra)
        upcycle.convert(ConvertConfig(out=str(tmp_path / "src"), model=str(dense), progress=False,
                                      layers=2 if case.startswith("partial") else 4, moe=MoEConfig(num_experts=4, **moe)))
        src = tmp_path / "src"
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()  # the dense model's save_pretrained progress bar is not ours
    assert main(["export", str(src), *args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_existing_out_is_refused_unless_overwrite(tmp_path, capsys):
    src = _upcycle(tmp_path)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "mine.txt").write_text("keep")
    assert main(["export", str(src), "--out", str(tmp_path / "q"), "--no-progress"]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "q" / "mine.txt").read_text() == "keep"
    assert main(["export", str(src), "--out", str(tmp_path / "q"), "--no-progress", "--overwrite"]) == 0
    assert not (tmp_path / "q" / "mine.txt").exists()


@pytest.mark.slow
@needs_smollm2
def test_embedded_smollm2_upcycle_to_qwen2_moe(tmp_path):
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), layers=6, moe=MoEConfig(num_experts=8), progress=False))
    assert main(["export", str(tmp_path / "moe"), "--format", "qwen2_moe", "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 0
    _same(tmp_path / "moe", tmp_path / "q", tmp_path, tol=REAL_MODEL_FP32)
