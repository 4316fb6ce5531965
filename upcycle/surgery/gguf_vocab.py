"""The ``tokenizer.*`` fields of a GGUF export: carried over from a GGUF source, or built from tokenizer.json.

    fields = tokenizer_fields(checkpoint_dir, raw_config)   # [(key, value, GGUFValueType)]

A checkpoint upcycled from a GGUF file (the embedded ``smollm2-135m``) gets that file's own
tokenizer fields, as llama.cpp already ran them with the dense model: transformers' GGUF
tokenizer conversion is not the inverse of llama.cpp's (it rebuilds a plain GPT-2 pre-tokenizer
where llama.cpp names, e.g., ``smollm``'s digit split), so converting back would change how
text is split. The source must still be the file the checkpoint recorded (same fingerprint).

Otherwise the checkpoint's ``tokenizer.json`` is converted, for byte-level BPE tokenizers
(GPT-2, Llama 3, Qwen2, SmolLM...): tokens by id, token types (added special tokens are
control tokens), merges, special ids, whether BOS/EOS are added (read off an encoding), the
chat template, and ``tokenizer.ggml.pre``, the name of llama.cpp's pre-tokenizer. That name is
found by matching the tokenizer's pre-tokenizer steps with the regexes llama.cpp's
``llm_tokenizer_bpe`` runs for each name (src/llama-vocab.cpp); a pre-tokenizer matching none
is refused, because llama.cpp would fall back to a default split and tokenize text differently.
Other tokenizer models (SentencePiece, WordPiece, WordLevel) are refused in one line.
"""

from __future__ import annotations

import json
import os

from upcycle.errors import UpcycleError

_GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                 "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    # (pre-tokenizer steps, as _steps() writes them) -> llama.cpp's tokenizer.ggml.pre with the same regexes
    ("bytelevel-gpt2",): "gpt-2",
    ("digits", "bytelevel-gpt2"): "smollm",  # "\p{N}" then the GPT-2 split: llama.cpp's STARCODER / SMOLLM
    (f"split:{_LLAMA3_SPLIT}", "bytelevel"): "llama-bpe",
    (f"split:{_QWEN2_SPLIT}", "bytelevel"): "qwen2",
}
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def tokenizer_fields(folder: str, raw: dict) -> list[tuple]:
    """``(key, value, type)`` for every ``tokenizer.*`` field (see the module docstring); an array's element
    type follows from its values."""
    carried = _from_gguf_source(raw)
    return carried if carried is not None else _from_tokenizer_json(folder, raw["vocab_size"])


def _from_gguf_source(raw: dict) -> list[tuple] | None:
    """The source GGUF's own tokenizer fields, when the checkpoint was upcycled from that very file."""
    source = raw.get("upcycle", {}).get("source", {})
    if source.get("kind") not in ("gguf", "alias"):
        return None
    import gguf

    from upcycle.models.sources import open_source

    try:
        with open_source(source["model"]) as src:
            path, fingerprint = src.path, src.fingerprint
    except UpcycleError:
        return None  # moved or gone: the checkpoint's tokenizer.json is converted instead
    if fingerprint != source.get("fingerprint"):
        return None
    reader = gguf.GGUFReader(path)
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        out.append((key, f.contents(), f.types[0]))
    return out


def _steps(pre: dict | None) -> tuple[str, ...]:
    """A tokenizers pre-tokenizer as a tuple of steps ("split:<regex>", "digits", "bytelevel[-gpt2]")."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre["pretokenizers"] for s in _steps(p))
    if kind == "ByteLevel" and not pre.get("add_prefix_space"):  # llama.cpp's BPE adds no prefix space
        return ("bytelevel-gpt2" if pre.get("use_regex", True) else "bytelevel",)
    if kind == "Digits" and pre.get("individual_digits"):
        return ("digits",)
    isolated = pre.get("behavior") == "Isolated" and not pre.get("invert")
    if kind == "Split" and isolated and "Regex" in pre.get("pattern", {}):
        return (f"split:{pre['pattern']['Regex']}",)
    return (json.dumps(pre, sort_keys=True),)


def _from_tokenizer_json(folder: str, vocab_size: int) -> list[tuple]:
    import gguf
    from transformers import AutoTokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise UpcycleError(f"cannot export to GGUF: {folder} has no tokenizer.json (the GGUF carries the tokenizer "
                           "llama.cpp runs)")
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj["model"]
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        kind = "SentencePiece-style BPE" if model.get("type") == "BPE" else model.get("type")
        raise UpcycleError(f"cannot export to GGUF: a {kind} tokenizer (converted here: byte-level BPE; "
                           "a checkpoint upcycled from a GGUF file carries that file's tokenizer)")
    if tj.get("normalizer") not in (None, {"type": "NFC"}):
        raise UpcycleError(f"cannot export to GGUF: the tokenizer normalizes text ({tj['normalizer'].get('type')}), "
                           "which llama.cpp's BPE tokenizer does not")
    steps = _steps(tj.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(steps)
    if pre is None:
        raise UpcycleError("cannot export to GGUF: the tokenizer's pre-tokenizer matches none of llama.cpp's "
                           f"({', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text differently")
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    n = max(vocab_size, max(by_id) + 1)
    if n != vocab_size:
        raise UpcycleError(f"cannot export to GGUF: the tokenizer has ids up to {max(by_id)}, the model "
                           f"{vocab_size} embeddings")
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:  # embedding rows no token uses (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(_CONTROL if added.get(i, {}).get("special") else _USER_DEFINED if i in added else _NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tok = AutoTokenizer.from_pretrained(folder)
    probe = tok("a")["input_ids"]
    string, u32, boolean = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL
    arr = gguf.GGUFValueType.ARRAY
    out = [("tokenizer.ggml.model", "gpt2", string), ("tokenizer.ggml.pre", pre, string),
           ("tokenizer.ggml.tokens", tokens, arr), ("tokenizer.ggml.token_type", types, arr),
           ("tokenizer.ggml.merges", merges, arr)]
    for what in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{what}_token_id", None)
        if tid is not None:
            key = "padding" if what == "pad" else "unknown" if what == "unk" else what
            out.append((f"tokenizer.ggml.{key}_token_id", int(tid), u32))
    out.append(("tokenizer.ggml.add_bos_token", bool(probe) and probe[0] == tok.bos_token_id, boolean))
    out.append(("tokenizer.ggml.add_eos_token", bool(probe) and probe[-1] == tok.eos_token_id, boolean))
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        out.append(("tokenizer.chat_template", template, string))
    return out
