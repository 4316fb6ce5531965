"""``upcycle export`` of fine-grained and shared-expert upcycles (issue 20, item 4): a process that never imports
upcycle loads the stock checkpoint and gets ``upcycle.load``'s logits and greedy tokens, and, fresh (t=0), the dense
original's (loaded by transformers).

    python -m pytest -q tests/test_export_fine_grained.py

Fine-grained: E copies x G segments are E·G stock experts of F/G neurons, top-(K·G), renormalised. A shared
expert goes to Qwen2-MoE's ``shared_expert``, whose output Qwen2-MoE scales by sigmoid(``shared_expert_gate``
x): the gate is written as zeros (sigmoid(0) = 1/2 exactly) and the down projection doubled. "trained" below
moves every segment's weights and the shared expert away from the dense model, with one router row per copy
(a copy's segments stay tied, as training keeps them: identical rows get identical gradients), so a wrong
scale, a segment put under another copy or a shared expert counted twice or half shows in the logits; "apart"
also gives each segment its own router row, so tokens take segments of several copies.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_char_tokenizer, make_dense, needs_smollm2
from stock_load import assert_stock_equals_upcycle, exported_tensors
from tolerances import REAL_MODEL_FP32

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main
from upcycle.moe import moe_blocks

RANDOM_SHARED = dict(shared_selection="random")


def _convert(tmp_path, arch, G, *, copies=2, K=1, layers=2, name="moe", dtype="float32", **extra):
    dense = tmp_path / f"{name}-dense"
    make_dense(arch, dense)
    make_char_tokenizer().save_pretrained(dense)
    upcycle.convert(ConvertConfig(out=str(tmp_path / name), model=str(dense), layers=layers, progress=False,
                                  dtype=dtype, moe=MoEConfig(num_experts=copies * G, granularity=G, top_k=K * G),
                                  **extra))
    return tmp_path / name


def _train(src, out, seed=1, apart=False):
    """``src`` with every segment, router row and the shared expert moved (see the module docstring)."""
    model = upcycle.load(str(src))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model).values():
            w, G = block.router.weight, block.cfg.granularity
            rows = w.shape[0] if apart else w.shape[0] // G
            w.copy_((torch.randn(rows, w.shape[1], generator=g) * 0.5).repeat_interleave(1 if apart else G, dim=0))
            for p in (block.experts.gate_up_proj, block.experts.down_proj):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
            if block.shared_expert is not None:
                for p in block.shared_expert.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    model.save_pretrained(out)
    make_char_tokenizer().save_pretrained(out)
    return out


# id: (base, G, copies, K, layers, convert extras, state, --format, extra flags, transformers class)
CASES = {
    "llama-g2": ("llama", 2, 2, 1, 2, {}, "fresh", "auto", [], "Qwen2Moe"),
    "llama-g4-shared": ("llama", 4, 2, 1, 2, dict(shared_neurons=32, **RANDOM_SHARED), "fresh", "qwen2_moe", [],
                        "Qwen2Moe"),
    "llama-g2-mixtral": ("llama", 2, 2, 1, 4, {}, "fresh", "mixtral", [], "Mixtral"),
    "llama-g4-shared-permuted": ("llama", 4, 2, 1, 2, dict(shared_neurons=32, permute_copies=True, **RANDOM_SHARED),
                                 "trained", "auto", [], "Qwen2Moe"),
    "llama-g2-shared-activation-top2": ("llama", 2, 4, 2, 2, dict(shared_fraction=0.25, calibration_tokens=256),
                                        "fresh", "qwen2_moe", [], "Qwen2Moe"),
    "llama-g4-every-layer": ("llama", 4, 2, 1, 4, dict(permute_copies=True), "trained", "auto", [], "Mixtral"),
    "llama-g2-shared-apart": ("llama", 2, 4, 2, 2, dict(shared_neurons=24, **RANDOM_SHARED), "apart", "auto", [],
                              "Qwen2Moe"),
    "llama-g1-shared-all-moe": ("llama", 1, 4, 2, 1, dict(shared_neurons=32, **RANDOM_SHARED), "trained", "auto",
                                ["--all-moe"], "Qwen2Moe"),
    # 128 - 42 = 86 routed neurons in 4 segments of 22: two zero neurons of padding.
    "qwen2-g4-shared-padded": ("qwen2", 4, 2, 1, 2, dict(shared_neurons=42, **RANDOM_SHARED), "trained", "auto", [],
                               "Qwen2Moe"),
    "qwen2-g2-permuted": ("qwen2", 2, 2, 1, 2, dict(permute_copies=True), "fresh", "auto", [], "Qwen2Moe"),
    "qwen3-g2": ("qwen3", 2, 2, 1, 2, {}, "trained", "auto", [], "Qwen3Moe"),
    "qwen3-g4-permuted": ("qwen3", 4, 2, 1, 2, dict(permute_copies=True), "fresh", "auto", [], "Qwen3Moe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stock_load_equals_upcycle(tmp_path, capsys, case):
    arch, G, copies, K, layers, extra, state, fmt, flags, cls = CASES[case]
    src = _convert(tmp_path, arch, G, copies=copies, K=K, layers=layers, **extra)
    if state != "fresh":
        src = _train(src, tmp_path / state, apart=state == "apart")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", str(src), "--format", fmt, *flags, "--out", str(out), "--no-progress"]) == 0
    up = json.loads((src / "config.json").read_text())["upcycle"]
    cfg = json.loads((out / "config.json").read_text())
    E, F_e, F_s = copies * G, up["mlp"]["ffn_size"], up["mlp"]["shared_ffn_size"]
    assert cfg.get("num_experts", cfg.get("num_local_experts")) == E and cfg["num_experts_per_tok"] == K * G
    # Widths rounded up to 8 with zero neurons: transformers' grouped_mm experts need 16-byte rows.
    assert cfg.get("moe_intermediate_size", cfg["intermediate_size"]) == -(-F_e // 8) * 8
    assert cfg.get("norm_topk_prob", True) is True
    if cls == "Qwen2Moe":
        assert cfg["shared_expert_intermediate_size"] == F_s
    # Fresh (t=0): the dense original's logits and greedy tokens too.
    dense = tmp_path / "moe-dense" if state == "fresh" else None
    assert_stock_equals_upcycle(src, out, tmp_path, cls=f"{cls}ForCausalLM", dense=dense)


def test_exported_tensors_are_the_segments_and_the_doubled_shared_expert_bit_for_bit(tmp_path):
    """bf16: expert e·G + g is segment g of copy e as upcycle stores it (the G-scaled down projection included),
    the shared expert's down projection is exactly twice upcycle's, its gate zeros: doubling is exact in bf16."""
    from safetensors.torch import load_file

    src = _convert(tmp_path, "llama", 4, shared_neurons=32, permute_copies=True, dtype="bfloat16", **RANDOM_SHARED)
    assert main(["export", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = load_file(str(src / "model.safetensors"))
    for i in (2, 3):
        p = f"model.layers.{i}.mlp"
        gate_up, down = theirs[f"{p}.experts.gate_up_proj"], theirs[f"{p}.experts.down_proj"]
        assert gate_up.dtype == torch.bfloat16 and gate_up.shape[0] == 8
        for e in range(8):
            assert torch.equal(got[f"{p}.experts.{e}.gate_proj.weight"], gate_up[e, :24])
            assert torch.equal(got[f"{p}.experts.{e}.up_proj.weight"], gate_up[e, 24:])
            assert torch.equal(got[f"{p}.experts.{e}.down_proj.weight"], down[e])
        shared = theirs[f"{p}.shared_expert.down_proj.weight"]
        assert got[f"{p}.shared_expert.down_proj.weight"].dtype == torch.bfloat16
        assert torch.equal(got[f"{p}.shared_expert.down_proj.weight"], shared * 2)
        assert torch.equal(got[f"{p}.shared_expert.down_proj.weight"].float() / 2, shared.float())
        assert torch.equal(got[f"{p}.shared_expert.gate_proj.weight"], theirs[f"{p}.shared_expert.gate_proj.weight"])
        assert not got[f"{p}.shared_expert_gate.weight"].any()


def test_a_bf16_fine_grained_export_says_its_engines_route_in_bf16(tmp_path, capsys):
    src = _convert(tmp_path, "llama", 2)
    assert main(["export", str(src), "--dtype", "bfloat16", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "note: engines route a bfloat16 checkpoint in bfloat16" in capsys.readouterr().out
    assert main(["export", str(src), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("arch,G,extra,args,message", [
    ("llama", 2, dict(shared_neurons=16), ["--format", "mixtral", "--all-moe"],
     "cannot export --all-moe at granularity 2: under a router of zeros all 4 segments of a dense layer tie"),
    ("llama", 1, dict(shared_neurons=16), ["--format", "mixtral"],
     "cannot export to mixtral: a shared expert (Mixtral has none); qwen2_moe could carry it"),
    ("llama", 2, dict(shared_neurons=16), ["--format", "qwen3_moe"],
     "cannot export to qwen3_moe: a shared expert (Qwen3-MoE has none); qwen2_moe could carry it"),
    ("qwen3", 2, dict(shared_neurons=16), ["--format", "auto"],
     "cannot export to qwen3_moe: a shared expert (Qwen3-MoE has none, and qwen2_moe, which has one, has no "
     "QK-norm); --format gguf could carry it"),
    ("qwen3", 2, dict(shared_neurons=16), ["--format", "qwen2_moe"],
     "cannot export to qwen2_moe: QK-norm (Qwen2-MoE attention has none); --format gguf could carry it"),
])
def test_what_the_stock_formats_cannot_carry_is_one_line(tmp_path, capsys, arch, G, extra, args, message):
    src = _convert(tmp_path, arch, G, **extra, **RANDOM_SHARED)
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    assert main(["export", str(src), *args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_doubled_shared_expert_that_overflows_float16_is_refused_and_nothing_is_written(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _convert(tmp_path, "llama", 2, shared_neurons=16, **RANDOM_SHARED)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.3.mlp.shared_expert.down_proj.weight"][0, 0] = 40000.0  # fits fp16 (65504); twice it not
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    before = sorted(os.listdir(tmp_path))
    assert main(["export", str(src), "--dtype", "float16", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.layers.3.mlp.shared_expert.down_proj.weight as float16" in err, err
    assert "written doubled" in err and "export in float32 or bfloat16" in err
    assert sorted(os.listdir(tmp_path)) == before
    assert main(["export", str(src), "--dtype", "bfloat16", "--out", str(tmp_path / "out"), "--no-progress"]) == 0


@pytest.mark.slow
@needs_smollm2
def test_embedded_smollm2_e8_g4_shared_to_qwen2_moe(tmp_path):
    """The embedded SmolLM2-135M, last 6 MLPs as 8 copies x 4 segments + a shared expert of 384 (the default
    activation selection), exported and loaded by stock transformers: upcycle.load's logits and greedy tokens,
    and the dense model's (as transformers reads the embedded GGUF)."""
    from upcycle.models.sources import open_source

    with open_source("smollm2-135m") as src:
        src.load_dense_model().save_pretrained(tmp_path / "dense")
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), layers=6, shared_fraction=0.25, calibration_tokens=1024,
                                  moe=MoEConfig(num_experts=32, granularity=4, top_k=4), progress=False))
    assert main(["export", str(tmp_path / "moe"), "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
            cfg["shared_expert_intermediate_size"]) == (32, 4, 288, 384)
    assert "model.layers.29.mlp.shared_expert.down_proj.weight" in exported_tensors(tmp_path / "q")
    assert_stock_equals_upcycle(tmp_path / "moe", tmp_path / "q", tmp_path, tol=REAL_MODEL_FP32,
                                dense=tmp_path / "dense")
