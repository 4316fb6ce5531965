"""Which GGUF families upcycle reads, and the checks that keep every read exact.

llama.cpp's converter stores some tensors transformed (Llama's q/k rows permuted, Gemma's and
Nemotron's norms as 1 + w, Bloom's fused qkv regrouped, GPT-2's matrices transposed) and some
hyperparameters only as GGUF metadata. ``models/gguf.py`` undoes the transforms with transformers'
own per-family processors; this module decides which files that read is exact for:

* ``EXACT``: the GGUF architectures whose tiny random models, written by llama.cpp's own
  ``convert_hf_to_gguf.py``, read back equal to their Hugging Face original, in upcycle and in
  transformers' GGUF loader alike (tests/test_gguf_families.py; the table in docs/benchmarks.md).
* ``REFUSED``: architectures transformers' GGUF loader reads but upcycle does not, with the reason.
  Any architecture in neither table is refused too (transformers cannot read it, so llama.cpp's
  storage transforms for it are unknown here).
* ``check_metadata``: a metadata key that transformers' GGUF loader does not read must hold the
  value transformers' config implies anyway, or the file is refused. That is how a file whose
  function transformers would silently change is caught: Llama 3 rope scaling, Gemma 3's scaled
  global rope, StarCoder2's rope base, Phi-3's sliding window, Nemotron's partial rope, Gemma 2's
  soft-capping, Falcon-40B's grouped qkv, and a Gemma query scale that llama.cpp derives from the
  sizes otherwise than transformers assumes (each one shown by a test to change the logits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EXACT: dict[str, str] = {
    "llama": "q/k rows un-permuted (Mistral files are `llama` too)",
    "qwen2": "as stored",
    "qwen3": "as stored",
    "gemma2": "norms stored as 1 + w",
    "gemma3": "norms stored as 1 + w (the text model; a vision checkpoint's tower is a separate file)",
    "phi3": "as stored (fused qkv and gate_up)",
    "stablelm": "as stored",
    "starcoder2": "as stored",
    "nemotron": "norms stored as 1 + w",
    "gpt2": "matrices stored transposed",
    "bloom": "fused qkv regrouped per head",
    "falcon": "as stored (one KV head: llama.cpp's qkv regrouping is then the identity)",
}
"""GGUF ``general.architecture`` -> what llama.cpp did to its tensors: read exactly (tested)."""

_MOE = "is already a Mixture-of-Experts model"
REFUSED: dict[str, str] = {
    "qwen2moe": _MOE, "qwen3moe": _MOE, "gpt-oss": _MOE, "minimax-m2": _MOE,
    "t5": "is an encoder-decoder model", "t5encoder": "is an encoder model",
    "mamba": "is a state-space model (no attention-MLP blocks)",
    "lfm2": "is a hybrid convolution model not verified here",
    "gemma4": "is not verified against its Hugging Face original here",
    "deci": "has no transformers model class",
}
"""GGUF architectures transformers' GGUF loader supports that upcycle refuses, and why."""

_ANY = object()  # a key whose value cannot change the function (checked by the tensor shapes, or unused)


class _Said(str):
    """An expected value that is a description, not a literal: shown without quotes."""

    __repr__ = str.__str__


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config, key: str, layer_type: str = "full_attention"):
    """A rope parameter of ``config``: transformers v5 keeps them in ``rope_parameters`` (per layer type
    for models that mix sliding and full attention), older configs as attributes."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:
        params = params[layer_type]
    return params.get(key, getattr(config, key, None))


def _first_attr(*names: str) -> Callable:
    def get(config, meta):
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    return get


def _rope_scaling(config) -> str:
    kind = _rope(config, "rope_type") or "default"
    return "none" if kind == "default" else kind


# GGUF key (after "<arch>.") that transformers' GGUF loader does not read -> the value it must hold for
# transformers' config to be right: f(config, the file's "<arch>." keys without the prefix).
_IMPLIED: dict[str, Callable] = {
    "attention.key_length": lambda c, m: _head_dim(c),
    "attention.value_length": lambda c, m: _head_dim(c),
    "rope.dimension_count": lambda c, m: int(_head_dim(c) * (_rope(c, "partial_rotary_factor") or 1.0)),
    "rope.freq_base": lambda c, m: _rope(c, "rope_theta"),
    "rope.freq_base_swa": lambda c, m: _rope(c, "rope_theta", "sliding_attention"),
    "rope.scaling.type": lambda c, m: _rope_scaling(c),
    # llama.cpp applies linear scaling by this factor even without a type key.
    "rope.scaling.factor": lambda c, m: 1.0 if _rope_scaling(c) == "none" else _rope(c, "factor"),
    "attention.sliding_window": lambda c, m: getattr(c, "sliding_window", None),
    "attn_logit_softcapping": lambda c, m: getattr(c, "attn_logit_softcapping", None),
    "final_logit_softcapping": lambda c, m: getattr(c, "final_logit_softcapping", None),
    "attention.layer_norm_epsilon": _first_attr("layer_norm_epsilon", "layer_norm_eps", "norm_eps", "norm_epsilon"),
    "attention.layer_norm_rms_epsilon": _first_attr("rms_norm_eps", "norm_eps", "layer_norm_epsilon"),
    "use_parallel_residual": lambda c, m: getattr(c, "use_parallel_residual", None),
    # Sizes: a wrong one cannot pass the per-tensor shape check.
    "context_length": lambda c, m: _ANY, "feed_forward_length": lambda c, m: _ANY,
    "attention.head_count_kv": lambda c, m: _ANY, "vocab_size": lambda c, m: _ANY,
    # Used by llama.cpp only with a rope scaling type, which is checked above.
    "rope.scaling.original_context_length": lambda c, m: _ANY,
    # Falcon: llama.cpp regroups the fused qkv per KV group (convert_hf_to_gguf's FalconModel), which
    # transformers does not undo; with one KV head (Falcon-7B) the regrouping is the identity.
    "tensor_data_layout": lambda c, m: ("jploski" if m.get("attention.head_count_kv", 1) == 1 else _Said(
        f"the Hugging Face qkv layout (llama.cpp regrouped it for {m['attention.head_count_kv']} KV heads)")),
}


def _gemma_query_scale(arch: str, layers_27b: int) -> Callable:
    """llama.cpp scales Gemma's queries by 1/sqrt(n_embd / n_head) in the 27B model (told apart by its layer
    count) and by 1/sqrt(head_dim) otherwise (``src/models/gemma2.cpp``, ``gemma3.cpp``); no GGUF key records
    it. transformers scales by 1/sqrt(query_pre_attn_scalar), which its GGUF config leaves at the default."""

    def check(config, meta) -> str | None:
        n_embd, n_head = meta["embedding_length"], meta["attention.head_count"]
        llama_cpp = n_embd // n_head if meta["block_count"] == layers_27b else meta.get("attention.key_length", n_embd // n_head)
        ours = getattr(config, "query_pre_attn_scalar", None)
        if ours != llama_cpp:
            return (f"llama.cpp scales its queries by 1/sqrt({llama_cpp}) (src/models/{arch}.cpp, from its sizes), "
                    f"transformers' GGUF config by 1/sqrt({ours}) (query_pre_attn_scalar)")
        return None

    return check


# Per family, what llama.cpp's graph derives from the sizes rather than reading from a key.
_DERIVED: dict[str, Callable] = {"gemma2": _gemma_query_scale("gemma2", 46), "gemma3": _gemma_query_scale("gemma3", 62)}


def _same(value, expected) -> bool:
    if expected is _ANY:
        return True
    if value in (0, "none") and expected is None:  # llama.cpp writes 0 / "none" for "absent"
        return True
    if isinstance(value, float) or isinstance(expected, float):
        return expected is not None and np.float32(value) == np.float32(expected)  # GGUF stores float32
    return value == expected


def check_metadata(arch: str, fields: dict, mapped: dict, config) -> str | None:
    """Why transformers' reading of this file differs from what llama.cpp wrote, or None.

    ``fields``: the file's metadata (key -> value); ``mapped``: transformers' GGUF_CONFIG_MAPPING entry
    for the architecture (GGUF key -> config attribute, None where transformers drops the key);
    ``config``: the config transformers builds from the file.
    """
    meta = {key[len(arch) + 1:]: value for key, value in fields.items() if key.startswith(arch + ".")}
    for short, value in meta.items():
        key = f"{arch}.{short}"
        if mapped.get(short) is not None:
            continue  # transformers reads it into the config
        implied = _IMPLIED.get(short)
        if implied is None:
            return f"its metadata {key} = {value!r} is not read by transformers' GGUF loader"
        expected = implied(config, meta)
        if not _same(value, expected):
            return f"its metadata {key} = {value!r} is not read by transformers' GGUF loader, which assumes {expected!r}"
    derived = _DERIVED.get(arch)
    return derived(config, meta) if derived is not None else None


def refusal(arch: str, supported_by_transformers: bool) -> str | None:
    """Why a GGUF architecture is refused outright, or None for an exact one."""
    if arch in EXACT:
        return None
    if arch in REFUSED:
        return REFUSED[arch]
    if not supported_by_transformers:
        return "cannot be read by transformers' GGUF loader, so llama.cpp's storage transforms for it are unknown"
    return "is not verified against its Hugging Face original here"
