"""The engine table (upcycle/surgery/engines.py) and what vLLM's loader needs of an export.

    python -m pytest -q tests/test_export_engines.py

vLLM's own ``DefaultModelLoader`` was run on these exports on a CPU (benchmarks/vllm_load_check.py,
vLLM 0.33.0 and 0.34.0: every parameter filled, every value equal; docs/benchmarks.md). vLLM is
not installed here, so this test encodes the rules of its 0.34.0 loader as read, to catch an
export that drifts from them:

* vllm/model_executor/models/qwen2_moe.py, ``Qwen2MoeDecoderLayer.__init__``: layer i is sparse iff
  i is not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``; a dense layer has
  ``mlp.gate_up_proj`` (gate, up stacked: ``hf_to_vllm_mapper``) and ``mlp.down_proj``.
  ``Qwen2MoeSparseMoeBlock.__init__``: ``gate`` and ``shared_expert_gate`` always, ``shared_expert``
  only when ``shared_expert_intermediate_size > 0``. ``Qwen2MoeAttention``: q/k/v biases always.
* vllm/model_executor/models/qwen3_moe.py: the same layer rule; no ``shared_expert_gate`` unless a
  shared expert; q/k/v biases iff ``attention_bias``; ``q_norm``, ``k_norm``.
* vllm/model_executor/models/mixtral.py: every layer ``block_sparse_moe.gate`` and experts.
* vllm/model_executor/layers/fused_moe/routed_experts.py, ``build_expert_params_mapping``:
  ``experts.{e}.{gate_proj|up_proj}`` (Mixtral ``w1|w3``) fill ``w13_weight``, ``down_proj`` (``w2``)
  fills ``w2_weight``; vllm/model_executor/model_loader/default_loader.py,
  ``track_weights_loading``: a parameter no checkpoint tensor filled is an error, and so
  (``AutoWeightsLoader._load_module``) is a checkpoint tensor with no parameter.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import assert_readme_block, make_char_tokenizer, make_dense

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main
from upcycle.surgery.engines import ENGINES, FORMATS, KINDS, SERVING, TABLE, engines_markdown, serving_lines


def test_every_cell_has_a_verdict_and_a_reason():
    assert set(TABLE) == {(e, f, k) for e in ENGINES for f in FORMATS for k in KINDS}
    verdicts = set(SERVING) | {"WRONG", "fails", "refused", "no"}
    for key, c in TABLE.items():
        assert c.verdict in verdicts and len(c.why) > 10, key


def test_readme_lists_the_engine_table():
    assert_readme_block("engines", engines_markdown(),
                        'from upcycle.surgery.engines import engines_markdown; print(engines_markdown(), end="")')


def test_sglang_is_named_as_wrong_for_partial_moe_and_right_for_all_moe():
    assert any("do NOT serve with SGLang" in line for line in serving_lines("qwen2_moe", "partial"))
    assert any("do NOT serve with SGLang" in line for line in serving_lines("qwen3_moe", "partial"))
    assert not any("do NOT" in line for line in serving_lines("qwen2_moe", "all-moe"))


def _vllm_params(cfg: dict) -> set[str]:
    """The parameter names vLLM 0.34.0 builds for ``cfg`` (config.json), by the rules in the module docstring."""
    kind, n = cfg["model_type"], cfg["num_hidden_layers"]
    out = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.get("tie_word_embeddings"):
        out.add("lm_head.weight")
    for i in range(n):
        p = f"model.layers.{i}"
        out |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                f"{p}.self_attn.qkv_proj.weight", f"{p}.self_attn.o_proj.weight"}
        if kind == "qwen2_moe" or cfg.get("attention_bias"):
            out.add(f"{p}.self_attn.qkv_proj.bias")
        if kind == "qwen3_moe":
            out |= {f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"}
        sparse = kind == "mixtral" or (i not in cfg.get("mlp_only_layers", []) and
                                       (i + 1) % cfg.get("decoder_sparse_step", 1) == 0)
        moe = f"{p}.block_sparse_moe" if kind == "mixtral" else f"{p}.mlp"
        if not sparse:
            out |= {f"{p}.mlp.gate_up_proj.weight", f"{p}.mlp.down_proj.weight"}
            continue
        out |= {f"{moe}.gate.weight", f"{moe}.experts.routed_experts.w13_weight",
                f"{moe}.experts.routed_experts.w2_weight"}
        shared = cfg.get("shared_expert_intermediate_size", 0) > 0
        if kind == "qwen2_moe" or shared:
            out.add(f"{moe}.shared_expert_gate.weight")
        if shared:
            out |= {f"{moe}.shared_expert.gate_up_proj.weight", f"{moe}.shared_expert.down_proj.weight"}
    return out


def _vllm_name(ckpt_name: str) -> str:
    """The parameter vLLM 0.34.0 loads checkpoint tensor ``ckpt_name`` into (rules in the module docstring)."""
    name = re.sub(r"\.experts\.\d+\.(gate_proj|up_proj|w1|w3)\.weight$", ".experts.routed_experts.w13_weight", ckpt_name)
    name = re.sub(r"\.experts\.\d+\.(down_proj|w2)\.weight$", ".experts.routed_experts.w2_weight", name)
    name = re.sub(r"\.self_attn\.[qkv]_proj\.", ".self_attn.qkv_proj.", name)
    name = re.sub(r"\.shared_expert\.(gate|up)_proj\.", ".shared_expert.gate_up_proj.", name)  # hf_to_vllm_mapper
    return re.sub(r"\.mlp\.(gate|up)_proj\.", ".mlp.gate_up_proj.", name)


FINE_SHARED = dict(moe=dict(num_experts=8, granularity=4, top_k=4), shared_neurons=32, shared_selection="random")


@pytest.mark.parametrize("arch,fmt,flags,extra", [
    ("llama", "qwen2_moe", [], {}), ("qwen2", "qwen2_moe", ["--all-moe"], {}), ("qwen3", "qwen3_moe", [], {}),
    ("llama", "mixtral", ["--all-moe"], {}),
    # Fine-grained with a shared expert (issue 20): E·G experts, `shared_expert` and its gate.
    ("llama", "qwen2_moe", [], FINE_SHARED), ("qwen2", "qwen2_moe", [], FINE_SHARED),
    ("llama", "qwen2_moe", ["--all-moe"], dict(shared_neurons=32, shared_selection="random")),
    ("qwen3", "qwen3_moe", [], dict(moe=dict(num_experts=4, granularity=2, top_k=2))),
])
def test_exports_fill_exactly_what_vllm_builds(tmp_path, arch, fmt, flags, extra):
    from safetensors import safe_open

    dense = tmp_path / "dense"
    make_dense(arch, dense)
    make_char_tokenizer().save_pretrained(dense)
    extra = dict(extra)
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(dense), layers=2, progress=False,
                                  moe=MoEConfig(**extra.pop("moe", dict(num_experts=4))), **extra))
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "moe"), "--format", fmt, *flags, "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert all(f.get_slice(k).get_shape() and 0 not in f.get_slice(k).get_shape() for k in names)
    filled = {_vllm_name(k) for k in names}
    params = _vllm_params(cfg)
    assert filled - params == set(), "checkpoint tensors vLLM has no parameter for"
    assert params - filled == set(), "vLLM parameters no checkpoint tensor fills"
    if fmt == "qwen3_moe":  # what vLLM reads (config.num_experts), not only transformers' num_local_experts
        assert cfg["num_experts"] == 4


def test_an_export_is_served_only_where_every_column_that_applies_says_so():
    """A fine-grained upcycle with a shared expert: each engine at its weakest cell of the columns that apply."""
    every = serving_lines("qwen2_moe", "all-moe", "fine-grained", "shared")
    assert every == ["exact (run here): transformers", "loads (its loader run here; forward read): vLLM 0.34.0",
                     "exact by reading its source: SGLang 0.5.23"]
    partial = serving_lines("qwen2_moe", "partial", "fine-grained", "shared")
    assert partial[:2] == every[:2] and any(line.startswith("do NOT serve with SGLang") for line in partial)
    assert serving_lines("gguf", "partial", "fine-grained", "shared") == [
        "exact (run here): llama.cpp (llama-cpp-python 0.3.36)"]
    assert serving_lines("mixtral", "all-moe", "shared") == []  # refused everywhere: export refuses it first
