"""Which engine serves which export exactly: one table, each cell with its reason and how it was checked.

    print(engines_markdown())                      # the README's table (a test keeps the copy equal)
    serving_lines("qwen2_moe", "partial")          # what ``upcycle export`` prints after writing

Kinds of model: ``partial`` (some layers keep their dense MLP), ``all-moe`` (every layer is MoE,
natively or through ``--all-moe``), ``shared`` (shared experts; ``upcycle export`` writes none yet,
the column records what the engines' code does with them). A verdict is one of:

* ``exact``: the engine was run here on the export and gave upcycle's logits and greedy tokens;
* ``loads``: the engine's own weight loader was run here on the export and filled every parameter;
  its forward pass was read, not run (no GPU), and computes the same function;
* ``reads exact``: read in the engine's source only, which computes the same function;
* ``WRONG``: the engine loads it without an error and computes something else: must not be used;
* ``fails``: the engine refuses to load it;
* ``refused``: ``upcycle export`` refuses this combination (it would not be exact);
* ``no``: the engine does not read this format.
"""

from __future__ import annotations

from dataclasses import dataclass

VLLM = "vLLM 0.34.0"
SGLANG = "SGLang 0.5.23"
LLAMA_CPP = "llama.cpp (llama-cpp-python 0.3.36)"
ENGINES = ("transformers", VLLM, SGLANG, LLAMA_CPP)
FORMATS = ("qwen2_moe", "qwen3_moe", "mixtral", "gguf")
KINDS = ("partial", "all-moe", "shared")
SERVING = ("exact", "loads", "reads exact")


@dataclass(frozen=True)
class Cell:
    verdict: str
    why: str


def _c(verdict: str, why: str) -> Cell:
    return Cell(verdict, why)


_VLLM_Q2 = "vllm/model_executor/models/qwen2_moe.py"
_VLLM_Q3 = "vllm/model_executor/models/qwen3_moe.py"
_SG_Q2 = "sglang/srt/models/qwen2_moe.py"
_SG_Q3 = "sglang/srt/models/qwen3_moe.py"
_VLLM_LOADED = ("`DefaultModelLoader` filled every parameter (run on CPU, benchmarks/vllm_load_check.py); "
                "forward read: ")
_NO_SHARED = "upcycle writes no shared experts yet; read: "
_MIXTRAL_ONLY_ALL = _c("refused", "Mixtral has MoE in every layer: use qwen2_moe/qwen3_moe, or --all-moe")
_NO_SHARED_MIXTRAL = _c("refused", "Mixtral has no shared expert")
_NOT_GGUF = "reads no GGUF: use the safetensors exports"

TABLE: dict[tuple[str, str, str], Cell] = {
    # transformers: run in a process that never imports upcycle (tests/test_export.py).
    ("transformers", "qwen2_moe", "partial"): _c("exact", "`mlp_only_layers` keeps the dense MLPs; "
                                                 "tests/test_export.py"),
    ("transformers", "qwen2_moe", "all-moe"): _c("exact", "tests/test_export.py"),
    ("transformers", "qwen2_moe", "shared"): _c("reads exact", _NO_SHARED + "`Qwen2MoeSparseMoeBlock` adds "
                                                "sigmoid(`shared_expert_gate` x) * `shared_expert`(x)"),
    ("transformers", "qwen3_moe", "partial"): _c("exact", "`mlp_only_layers`; QK-norm; tests/test_export.py"),
    ("transformers", "qwen3_moe", "all-moe"): _c("exact", "tests/test_export.py"),
    ("transformers", "qwen3_moe", "shared"): _c("refused", "Qwen3-MoE has no shared expert"),
    ("transformers", "mixtral", "partial"): _MIXTRAL_ONLY_ALL,
    ("transformers", "mixtral", "all-moe"): _c("exact", "tests/test_export.py"),
    ("transformers", "mixtral", "shared"): _NO_SHARED_MIXTRAL,
    ("transformers", "gguf", "partial"): _c("no", "`GGUF_SUPPORTED_ARCHITECTURES` (5.25) has no ernie4_5-moe or "
                                            "glm4moe: use the safetensors exports"),
    ("transformers", "gguf", "all-moe"): _c("no", "its GGUF `llama` mapping reads no expert count: use the "
                                            "safetensors exports"),
    ("transformers", "gguf", "shared"): _c("no", "use the safetensors exports"),
    # vLLM: its own loader run on CPU; forward read.
    (VLLM, "qwen2_moe", "partial"): _c("loads", _VLLM_LOADED + f"{_VLLM_Q2} `Qwen2MoeDecoderLayer` builds a dense "
                                       "MLP for `mlp_only_layers`, `FusedMoE(renormalize=norm_topk_prob)`"),
    (VLLM, "qwen2_moe", "all-moe"): _c("loads", _VLLM_LOADED + f"{_VLLM_Q2}; the zero `shared_expert_gate` is "
                                       "required there (built whatever the shared size) and written"),
    (VLLM, "qwen2_moe", "shared"): _c("reads exact", _NO_SHARED + f"{_VLLM_Q2} builds `shared_expert` when "
                                      "`shared_expert_intermediate_size` > 0"),
    (VLLM, "qwen3_moe", "partial"): _c("loads", _VLLM_LOADED + f"{_VLLM_Q3} `Qwen3MoeDecoderLayer` honours "
                                       "`mlp_only_layers`"),
    (VLLM, "qwen3_moe", "all-moe"): _c("loads", _VLLM_LOADED + _VLLM_Q3),
    (VLLM, "qwen3_moe", "shared"): _c("refused", "Qwen3-MoE has no shared expert"),
    (VLLM, "mixtral", "partial"): _MIXTRAL_ONLY_ALL,
    (VLLM, "mixtral", "all-moe"): _c("loads", _VLLM_LOADED + "vllm/model_executor/models/mixtral.py, "
                                     "`renormalize=True`"),
    (VLLM, "mixtral", "shared"): _NO_SHARED_MIXTRAL,
    (VLLM, "gguf", "partial"): _c("no", "0.34 has no GGUF loader (vllm/model_executor/model_loader/); "
                                  "use the safetensors exports"),
    (VLLM, "gguf", "all-moe"): _c("no", "0.34 has no GGUF loader; use the safetensors exports"),
    (VLLM, "gguf", "shared"): _c("no", "0.34 has no GGUF loader"),
    # SGLang: read.
    (SGLANG, "qwen2_moe", "partial"): _c("WRONG", f"{_SG_Q2} `Qwen2MoeDecoderLayer.stage_facts` makes every layer "
                                         "sparse (`mlp_only_layers` ignored) and `load_weights` skips names it has "
                                         "no parameter for: the dense layers run uninitialised experts, silently. "
                                         "Export with --all-moe"),
    (SGLANG, "qwen2_moe", "all-moe"): _c("reads exact", f"{_SG_Q2}: every layer sparse, "
                                         "`TopK(renormalize=norm_topk_prob)`, no shared expert at size 0"),
    (SGLANG, "qwen2_moe", "shared"): _c("reads exact", _NO_SHARED + f"{_SG_Q2} builds `shared_expert` when its "
                                        "size > 0 (every layer MoE: --all-moe)"),
    (SGLANG, "qwen3_moe", "partial"): _c("WRONG", f"{_SG_Q3} `Qwen3MoeDecoderLayer.stage_facts` makes every layer "
                                         "sparse: the dense layers run uninitialised experts, silently. Export "
                                         "with --all-moe"),
    (SGLANG, "qwen3_moe", "all-moe"): _c("reads exact", f"{_SG_Q3}: every layer sparse"),
    (SGLANG, "qwen3_moe", "shared"): _c("refused", "Qwen3-MoE has no shared expert"),
    (SGLANG, "mixtral", "partial"): _MIXTRAL_ONLY_ALL,
    (SGLANG, "mixtral", "all-moe"): _c("reads exact", "sglang/srt/models/mixtral.py: `renormalize=True`"),
    (SGLANG, "mixtral", "shared"): _NO_SHARED_MIXTRAL,
    (SGLANG, "gguf", "partial"): _c("no", "use the safetensors exports (--all-moe)"),
    (SGLANG, "gguf", "all-moe"): _c("no", "use the safetensors exports"),
    (SGLANG, "gguf", "shared"): _c("no", "use the safetensors exports"),
    # llama.cpp: run (make test-engines, tests/test_llama_cpp.py).
    (LLAMA_CPP, "qwen2_moe", "partial"): _c("no", "reads GGUF only: use --format gguf (its converter's "
                                            "`qwen2moe` has MoE in every layer and ignores `norm_topk_prob`)"),
    (LLAMA_CPP, "qwen2_moe", "all-moe"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen2_moe", "shared"): _c("no", "reads GGUF only"),
    (LLAMA_CPP, "qwen3_moe", "partial"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen3_moe", "all-moe"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen3_moe", "shared"): _c("no", "reads GGUF only"),
    (LLAMA_CPP, "mixtral", "partial"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "mixtral", "all-moe"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "mixtral", "shared"): _c("no", "reads GGUF only"),
    (LLAMA_CPP, "gguf", "partial"): _c("exact", "the last layers MoE: `ernie4_5-moe` (renormalised top-K) or "
                                       "`glm4moe` (otherwise); other layer sets: --all-moe; tests/test_llama_cpp.py"),
    (LLAMA_CPP, "gguf", "all-moe"): _c("exact", "`llama` with experts (renormalised top-K, no QK-norm) or "
                                       "`glm4moe`; tests/test_llama_cpp.py"),
    (LLAMA_CPP, "gguf", "shared"): _c("refused", "upcycle writes no shared experts yet"),
}


def cell(engine: str, fmt: str, kind: str) -> Cell:
    return TABLE[(engine, fmt, kind)]


def serving_lines(fmt: str, kind: str) -> list[str]:
    """What ``upcycle export`` prints: the engines that serve the result exactly, how that is known, and the
    ones that must not be used (the reasons are in ``TABLE`` and the README)."""
    cells = {e: cell(e, fmt, kind) for e in ENGINES}
    said = {"exact": "exact (run here)", "loads": "loads (its loader run here; forward read)",
            "reads exact": "exact by reading its source"}
    lines = []
    for verdict, text in said.items():
        names = [e for e, c in cells.items() if c.verdict == verdict]
        if names:
            lines.append(f"{text}: {', '.join(names)}")
    lines += [f"do NOT serve with {e}: {c.why}" for e, c in cells.items() if c.verdict in ("WRONG", "fails")]
    return lines


def engines_markdown() -> str:
    """The README's engine table (the README keeps a copy; tests/test_export_engines.py checks they agree)."""
    rows = ["| engine | format | partial MoE | all-MoE (`--all-moe`) | shared experts |", "|---|---|---|---|---|"]
    for e in ENGINES:
        for f in FORMATS:
            cells = [cell(e, f, k) for k in KINDS]
            rows.append(f"| {e} | `{f}` | " + " | ".join(f"**{c.verdict}**: {c.why}" for c in cells) + " |")
    return "\n".join(rows) + "\n"
