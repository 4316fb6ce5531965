"""Which engine serves which export exactly: one table, each cell with its reason and how it was checked.

    print(engines_markdown())                      # the README's table (a test keeps the copy equal)
    serving_lines("qwen2_moe", "partial")          # what ``upcycle export`` prints after writing

Kinds of model: ``partial`` (some layers keep their dense MLP), ``all-moe`` (every layer is MoE,
natively or through ``--all-moe``), ``fine-grained`` (``--granularity G``: E·G experts of F/G neurons,
top-(K·G), a copy's G segments with one router row), ``shared`` (an always-on shared expert,
``--shared-fraction``). An export is served by an engine only if every column that applies to it
says so (``serving_lines``). A verdict is one of:

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
KINDS = ("partial", "all-moe", "fine-grained", "shared")
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
_FG_TESTS = "tests/test_export_fine_grained.py"
_NO_SHARED_QWEN3 = _c("refused", "Qwen3-MoE has no shared expert: qwen2_moe (no QK-norm) or --format gguf")
_MIXTRAL_ONLY_ALL = _c("refused", "Mixtral has MoE in every layer: use qwen2_moe/qwen3_moe, or --all-moe")
_NO_SHARED_MIXTRAL = _c("refused", "Mixtral has no shared expert")
_NOT_GGUF = "reads no GGUF: use the safetensors exports"

TABLE: dict[tuple[str, str, str], Cell] = {
    # transformers: run in a process that never imports upcycle (tests/test_export.py).
    ("transformers", "qwen2_moe", "partial"): _c("exact", "`mlp_only_layers` keeps the dense MLPs; "
                                                 "tests/test_export.py"),
    ("transformers", "qwen2_moe", "all-moe"): _c("exact", "tests/test_export.py"),
    ("transformers", "qwen2_moe", "fine-grained"): _c("exact", "E·G experts, top-(K·G), `norm_topk_prob`; widths "
                                                      f"padded to 8 with zero neurons for its grouped_mm; {_FG_TESTS}"),
    ("transformers", "qwen2_moe", "shared"): _c("exact", "`Qwen2MoeSparseMoeBlock` adds sigmoid(`shared_expert_gate` "
                                                "x) * `shared_expert`(x): gate written 0, down_proj doubled; "
                                                + _FG_TESTS),
    ("transformers", "qwen3_moe", "partial"): _c("exact", "`mlp_only_layers`; QK-norm; tests/test_export.py"),
    ("transformers", "qwen3_moe", "all-moe"): _c("exact", "tests/test_export.py"),
    ("transformers", "qwen3_moe", "fine-grained"): _c("exact", _FG_TESTS),
    ("transformers", "qwen3_moe", "shared"): _NO_SHARED_QWEN3,
    ("transformers", "mixtral", "partial"): _MIXTRAL_ONLY_ALL,
    ("transformers", "mixtral", "all-moe"): _c("exact", "tests/test_export.py"),
    ("transformers", "mixtral", "fine-grained"): _c("exact", f"every layer MoE; {_FG_TESTS}"),
    ("transformers", "mixtral", "shared"): _NO_SHARED_MIXTRAL,
    ("transformers", "gguf", "partial"): _c("no", "`GGUF_SUPPORTED_ARCHITECTURES` (5.25) has no ernie4_5-moe or "
                                            "glm4moe: use the safetensors exports"),
    ("transformers", "gguf", "all-moe"): _c("no", "its GGUF `llama` mapping reads no expert count: use the "
                                            "safetensors exports"),
    ("transformers", "gguf", "fine-grained"): _c("no", "use the safetensors exports"),
    ("transformers", "gguf", "shared"): _c("no", "use the safetensors exports"),
    # vLLM: its own loader run on CPU; forward read.
    (VLLM, "qwen2_moe", "partial"): _c("loads", _VLLM_LOADED + f"{_VLLM_Q2} `Qwen2MoeDecoderLayer` builds a dense "
                                       "MLP for `mlp_only_layers`, `FusedMoE(renormalize=norm_topk_prob)`"),
    (VLLM, "qwen2_moe", "all-moe"): _c("loads", _VLLM_LOADED + f"{_VLLM_Q2}; the zero `shared_expert_gate` is "
                                       "required there (built whatever the shared size) and written"),
    (VLLM, "qwen2_moe", "fine-grained"): _c("loads", _VLLM_LOADED + "`FusedMoE(top_k=num_experts_per_tok, "
                                            "renormalize=norm_topk_prob)` over E·G experts; its router (`GateLinear`) "
                                            "computes in the served dtype: float32 routes as upcycle does"),
    (VLLM, "qwen2_moe", "shared"): _c("loads", _VLLM_LOADED + f"{_VLLM_Q2} `Qwen2MoeMLP.forward` scales the "
                                      "shared expert by sigmoid(`expert_gate` x) = 1/2 (gate 0; down_proj doubled), "
                                      "added to the routed output (fused_moe/runner/moe_runner.py: "
                                      "`shared_output + fused_output`)"),
    (VLLM, "qwen3_moe", "partial"): _c("loads", _VLLM_LOADED + f"{_VLLM_Q3} `Qwen3MoeDecoderLayer` honours "
                                       "`mlp_only_layers`"),
    (VLLM, "qwen3_moe", "all-moe"): _c("loads", _VLLM_LOADED + _VLLM_Q3),
    (VLLM, "qwen3_moe", "fine-grained"): _c("loads", _VLLM_LOADED + f"{_VLLM_Q3}, as qwen2_moe"),
    (VLLM, "qwen3_moe", "shared"): _NO_SHARED_QWEN3,
    (VLLM, "mixtral", "partial"): _MIXTRAL_ONLY_ALL,
    (VLLM, "mixtral", "all-moe"): _c("loads", _VLLM_LOADED + "vllm/model_executor/models/mixtral.py, "
                                     "`renormalize=True`"),
    (VLLM, "mixtral", "fine-grained"): _c("loads", _VLLM_LOADED + "vllm/model_executor/models/mixtral.py, "
                                          "`renormalize=True`, as qwen2_moe"),
    (VLLM, "mixtral", "shared"): _NO_SHARED_MIXTRAL,
    (VLLM, "gguf", "partial"): _c("no", "0.34 has no GGUF loader (vllm/model_executor/model_loader/); "
                                  "use the safetensors exports"),
    (VLLM, "gguf", "all-moe"): _c("no", "0.34 has no GGUF loader; use the safetensors exports"),
    (VLLM, "gguf", "fine-grained"): _c("no", "0.34 has no GGUF loader"),
    (VLLM, "gguf", "shared"): _c("no", "0.34 has no GGUF loader"),
    # SGLang: read.
    (SGLANG, "qwen2_moe", "partial"): _c("WRONG", f"{_SG_Q2} `Qwen2MoeDecoderLayer.stage_facts` makes every layer "
                                         "sparse (`mlp_only_layers` ignored) and `load_weights` skips names it has "
                                         "no parameter for: the dense layers run uninitialised experts, silently. "
                                         "Export with --all-moe"),
    (SGLANG, "qwen2_moe", "all-moe"): _c("reads exact", f"{_SG_Q2}: every layer sparse, "
                                         "`TopK(renormalize=norm_topk_prob)`, no shared expert at size 0"),
    (SGLANG, "qwen2_moe", "fine-grained"): _c("reads exact", f"{_SG_Q2}: `TopK(top_k=num_experts_per_tok, "
                                              "renormalize=norm_topk_prob)` over E·G experts (every layer MoE: "
                                              "--all-moe is refused at G > 1, so convert every layer)"),
    (SGLANG, "qwen2_moe", "shared"): _c("reads exact", f"{_SG_Q2} `Qwen2MoeSparseMoeBlock._forward_shared_experts`:"
                                        " sigmoid(`shared_expert_gate` x) * `shared_expert`(x); fused as one more "
                                        "expert of that weight when its size is the experts' (`can_fuse_shared_"
                                        "expert`); every layer MoE: --all-moe"),
    (SGLANG, "qwen3_moe", "partial"): _c("WRONG", f"{_SG_Q3} `Qwen3MoeDecoderLayer.stage_facts` makes every layer "
                                         "sparse: the dense layers run uninitialised experts, silently. Export "
                                         "with --all-moe"),
    (SGLANG, "qwen3_moe", "all-moe"): _c("reads exact", f"{_SG_Q3}: every layer sparse"),
    (SGLANG, "qwen3_moe", "fine-grained"): _c("reads exact", f"{_SG_Q3}: every layer sparse, `TopK` over E·G"),
    (SGLANG, "qwen3_moe", "shared"): _NO_SHARED_QWEN3,
    (SGLANG, "mixtral", "partial"): _MIXTRAL_ONLY_ALL,
    (SGLANG, "mixtral", "all-moe"): _c("reads exact", "sglang/srt/models/mixtral.py: `renormalize=True`"),
    (SGLANG, "mixtral", "fine-grained"): _c("reads exact", "sglang/srt/models/mixtral.py: `renormalize=True`"),
    (SGLANG, "mixtral", "shared"): _NO_SHARED_MIXTRAL,
    (SGLANG, "gguf", "partial"): _c("no", "use the safetensors exports (--all-moe)"),
    (SGLANG, "gguf", "all-moe"): _c("no", "use the safetensors exports"),
    (SGLANG, "gguf", "fine-grained"): _c("no", "use the safetensors exports"),
    (SGLANG, "gguf", "shared"): _c("no", "use the safetensors exports"),
    # llama.cpp: run (make test-engines, tests/test_llama_cpp.py).
    (LLAMA_CPP, "qwen2_moe", "partial"): _c("no", "reads GGUF only: use --format gguf (its converter's "
                                            "`qwen2moe` has MoE in every layer and ignores `norm_topk_prob`)"),
    (LLAMA_CPP, "qwen2_moe", "all-moe"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen2_moe", "fine-grained"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen2_moe", "shared"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen3_moe", "partial"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen3_moe", "all-moe"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen3_moe", "fine-grained"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "qwen3_moe", "shared"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "mixtral", "partial"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "mixtral", "all-moe"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "mixtral", "fine-grained"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "mixtral", "shared"): _c("no", "reads GGUF only: use --format gguf"),
    (LLAMA_CPP, "gguf", "partial"): _c("exact", "the last layers MoE: `ernie4_5-moe` (renormalised top-K) or "
                                       "`glm4moe` (otherwise); other layer sets: --all-moe; tests/test_llama_cpp.py"),
    (LLAMA_CPP, "gguf", "all-moe"): _c("exact", "`llama` with experts (renormalised top-K, no QK-norm) or "
                                       "`glm4moe`; tests/test_llama_cpp.py"),
    (LLAMA_CPP, "gguf", "fine-grained"): _c("exact", "E·G experts, top-(K·G); the router stays F32 in every "
                                           "outtype, so a copy's segments tie; tests/test_llama_cpp.py"),
    (LLAMA_CPP, "gguf", "shared"): _c("exact", "`ernie4_5-moe` adds a weight-1 shared expert of "
                                      "`expert_shared_feed_forward_length` (src/models/ernie4-5-moe.cpp); `glm4moe` "
                                      "(QK-norm) one padded with zero neurons to a multiple of the experts' width. "
                                      "Not `qwen2moe`: its graph has the sigmoid-gated shared expert but routes "
                                      "without renormalising (`norm_w` false) in every layer; tests/test_llama_cpp.py"),
}


def cell(engine: str, fmt: str, kind: str) -> Cell:
    return TABLE[(engine, fmt, kind)]


def serving_lines(fmt: str, *kinds: str) -> list[str]:
    """What ``upcycle export`` prints: the engines that serve the result exactly, how that is known, and the
    ones that must not be used (the reasons are in ``TABLE`` and the README). ``kinds``: every column that
    applies (``partial`` or ``all-moe``, ``fine-grained`` at granularity > 1, ``shared`` for a shared expert);
    an engine serves the export only if it serves each, and is known to as weakly as its weakest cell says."""
    said = {"exact": "exact (run here)", "loads": "loads (its loader run here; forward read)",
            "reads exact": "exact by reading its source"}
    lines, worst = [], {}
    for e in ENGINES:
        cells = [cell(e, fmt, k) for k in kinds]
        bad = next((c for c in cells if c.verdict in ("WRONG", "fails")), None)
        if bad is not None:
            worst[e] = bad
        elif all(c.verdict in SERVING for c in cells):
            worst[e] = max(cells, key=lambda c: SERVING.index(c.verdict))
    for verdict, text in said.items():
        names = [e for e, c in worst.items() if c.verdict == verdict]
        if names:
            lines.append(f"{text}: {', '.join(names)}")
    lines += [f"do NOT serve with {e}: {c.why}" for e, c in worst.items() if c.verdict in ("WRONG", "fails")]
    return lines


def engines_markdown() -> str:
    """The README's engine table (the README keeps a copy; tests/test_export_engines.py checks they agree)."""
    rows = ["| engine | format | partial MoE | all-MoE (`--all-moe`) | fine-grained (`--granularity`) | "
            "shared expert |", "|---|---|---|---|---|---|"]
    for e in ENGINES:
        for f in FORMATS:
            cells = [cell(e, f, k) for k in KINDS]
            rows.append(f"| {e} | `{f}` | " + " | ".join(f"**{c.verdict}**: {c.why}" for c in cells) + " |")
    return "\n".join(rows) + "\n"
