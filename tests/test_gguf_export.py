"""``upcycle export --format gguf`` without llama.cpp: the file's fields, tensors and types, the tokenizer,
and the refusals (tests/test_llama_cpp.py runs the files in llama.cpp itself).

    python -m pytest -q tests/test_gguf_export.py
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_char_tokenizer, make_dense, needs_smollm2

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main


def _bpe_tokenizer(path, vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer) trained here on a few lines, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["But soft, what light through yonder window breaks?", "It is the east, and Juliet is the sun.",
            "Arise, fair sun, and kill the envious moon."] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    fast.save_pretrained(path)
    return fast


def _upcycled(tmp_path, arch="llama", layers=2, tokenizer="bpe", **moe):
    dense = tmp_path / "dense"
    make_dense(arch, dense, vocab_size=300)
    (_bpe_tokenizer(dense) if tokenizer == "bpe" else make_char_tokenizer(300).save_pretrained(dense))
    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(dense), layers=layers, progress=False,
                                  moe=MoEConfig(num_experts=4, **moe)))
    return tmp_path / "moe"


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("outtype,matrix_type", [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_gguf_file_holds_the_upcycle(tmp_path, capsys, outtype, matrix_type):
    import gguf

    src = _upcycled(tmp_path)
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--format", "gguf", "--outtype", outtype, "--out", str(out), "--no-progress"]) == 0
    assert "ernie4_5-moe (gguf), MoE layers 2,3" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    fields = _fields(reader)
    assert fields["general.architecture"] == "ernie4_5-moe"
    assert fields["ernie4_5-moe.leading_dense_block_count"] == 2
    assert fields["ernie4_5-moe.expert_count"] == 4 and fields["ernie4_5-moe.expert_used_count"] == 2
    assert fields["ernie4_5-moe.expert_feed_forward_length"] == 128
    tensors = {t.name: t for t in reader.tensors}
    assert all(t.n_elements > 0 for t in tensors.values())
    assert "blk.1.ffn_gate.weight" in tensors and "blk.1.ffn_gate_inp.weight" not in tensors
    assert list(tensors["blk.2.ffn_gate_exps.weight"].shape) == [64, 128, 4]  # ggml order: D, F, E
    assert tensors["blk.2.ffn_gate_inp.weight"].tensor_type.name == "F32"  # routing in fp32 whatever the outtype
    assert tensors["blk.2.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.2.ffn_down_exps.weight"].tensor_type.name == matrix_type
    # Expert 1 of layer 2 is the source's, stored (and for q8_0 quantised) as llama.cpp reads it.
    model = upcycle.load(str(src))
    t = tensors["blk.2.ffn_down_exps.weight"]
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(4, 64, 128)[1]
    want = model.model.layers[2].mlp.experts.down_proj[1].detach().numpy()
    np.testing.assert_allclose(got, want, atol={"f32": 0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[outtype])
    # The tokenizer: 300 tokens, BPE merges, ChatML specials as control tokens, the chat template.
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 300 and types[tokens.index("<|im_end|>")] == 3
    assert fields["tokenizer.ggml.merges"] and fields["tokenizer.chat_template"].startswith("{% for m in messages")
    assert fields["tokenizer.ggml.eos_token_id"] == tokens.index("<|endoftext|>")


def test_architecture_follows_the_layers_and_routing(tmp_path):
    import gguf

    cases = {"all": (dict(layers=4), [], "llama"), "copies": (dict(layers=1), ["--all-moe"], "llama"),
             "raw-topk": (dict(layers=2, normalize_topk=False), [], "glm4moe")}
    for name, (kw, flags, arch) in cases.items():
        src = _upcycled(tmp_path / name, **kw)
        out = tmp_path / f"{name}.gguf"
        assert main(["export", str(src), "--format", "gguf", "--out", str(out), "--no-progress", *flags]) == 0
        reader = gguf.GGUFReader(out)
        fields = _fields(reader)
        assert fields["general.architecture"] == arch, name
        tensors = {t.name: t for t in reader.tensors}
        if name == "copies":  # E copies of layer 0's dense MLP under a zero router
            assert not tensors["blk.0.ffn_gate_inp.weight"].data.any()
            up = tensors["blk.0.ffn_up_exps.weight"].data.reshape(4, 128, 64)
            assert all(np.array_equal(up[0], up[e]) for e in range(4))
        if arch == "glm4moe":
            assert fields["glm4moe.expert_weights_norm"] is False and fields["glm4moe.expert_gating_func"] == 1
            # Its graph always adds a shared expert: an all-zero one, and zero selection biases.
            assert not tensors["blk.3.ffn_down_shexp.weight"].data.any()
            assert not tensors["blk.3.exp_probs_b.bias"].data.any()


@pytest.mark.parametrize("case,flags,message", [
    ("char", [], "cannot export to GGUF: a WordLevel tokenizer"),
    ("middle", [], "MoE layers 1 of 4: llama.cpp's architectures run MoE in the last layers only"),
    ("sliding", [], "cannot export to GGUF: sliding-window attention"),
    ("dir", [], "is a directory; a GGUF export is one file"),
])
def test_what_gguf_cannot_carry_is_refused_before_writing(tmp_path, capsys, case, flags, message):
    if case == "sliding":
        dense = tmp_path / "dense"
        make_dense("mistral", dense, vocab_size=300, sliding_window=8)
        _bpe_tokenizer(dense)
        upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), model=str(dense), layers=2, progress=False,
                                      moe=MoEConfig(num_experts=4)))
        src = tmp_path / "moe"
    else:
        src = _upcycled(tmp_path, tokenizer="char" if case == "char" else "bpe")
        if case == "middle":
            upcycle.convert(ConvertConfig(out=str(src), model=str(tmp_path / "dense"), layer_ids=[1], progress=False,
                                          overwrite=True, moe=MoEConfig(num_experts=4)))
    out = tmp_path / ("outdir" if case == "dir" else "m.gguf")
    if case == "dir":
        out.mkdir()
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    assert main(["export", str(src), "--format", "gguf", "--out", str(out), "--no-progress",
                 *(["--overwrite"] if case == "dir" else []), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    from upcycle.surgery import gguf_export

    src = _upcycled(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"mine")
    calls = []

    def failing(values, kind):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(values, kind)

    real = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", failing)
    assert main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--no-progress",
                 "--overwrite"]) == 130  # Ctrl-C in the middle of the tensors
    assert (tmp_path / "m.gguf").read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["dense", "m.gguf", "moe"]


@pytest.mark.slow
@needs_smollm2
def test_gguf_source_keeps_its_own_tokenizer_fields(tmp_path):
    """Upcycled from the embedded GGUF: its tokenizer.* fields as they were (pre-tokenizer `smollm` included),
    where converting transformers' rebuilt tokenizer.json would give `gpt-2`."""
    import gguf

    from upcycle.models.sources import open_source

    upcycle.convert(ConvertConfig(out=str(tmp_path / "moe"), layers=1, moe=MoEConfig(num_experts=2), progress=False))
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "moe"), "--format", "gguf", "--outtype", "q8_0", "--out", str(out),
                 "--no-progress"]) == 0
    with open_source("smollm2-135m") as src:
        want = {k: v for k, v in _fields(gguf.GGUFReader(src.path)).items() if k.startswith("tokenizer.")}
    got = {k: v for k, v in _fields(gguf.GGUFReader(out)).items() if k.startswith("tokenizer.")}
    assert got == want and got["tokenizer.ggml.pre"] == "smollm"
    assert len(got["tokenizer.ggml.tokens"]) == 49152
