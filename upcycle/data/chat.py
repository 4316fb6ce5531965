"""Conversations -> token ids with the loss on the assistant turns only (SFT).

    ds, stats = encode_chats(pool, tokenizer, seq_len=512)   # pool: [{"messages": [...]}, ...]

Each conversation is rendered with ``tokenizer.apply_chat_template``. An assistant turn's
tokens are found by rendering prefixes: ``messages[:i]`` with the generation prompt is what
the model sees at inference, ``messages[:i + 1]`` adds the reply; the tokens in between (the
reply and the end-of-turn tokens the template emits after it) get labels, everything else
-100. This needs every prefix's text to be a prefix of the whole conversation's text; a
template that breaks that (e.g. rewrites earlier turns) is an error, not a silent mis-mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.errors import UpcycleError
from upcycle.io import one_line

from .text import IGNORE_INDEX

if TYPE_CHECKING:  # datasets: imported where rows are built (see text.py)
    from datasets import Dataset


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises for e.g. roles that do not alternate
        raise UpcycleError(
            f"the chat template failed on a conversation: {type(exc).__name__}: {one_line(exc)}") from None


def _tokens(tokenizer, text: str) -> list[int]:
    # The template writes every special token (BOS included) itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def encode_chat(messages: list[dict], tokenizer, seq_len: int, *, train_on_prompt: bool = False,
                system_prompt: str | None = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one conversation, cut to ``seq_len`` tokens.

    An assistant message that opens the conversation answers no prompt: it is context, not trained.
    """
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    text = _render(tokenizer, messages, generation_prompt=False)
    ids = _tokens(tokenizer, text)
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or all(m["role"] == "system" for m in messages[:i]):
                continue
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            turn = _render(tokenizer, messages[: i + 1], generation_prompt=False)
            if not (turn.startswith(prompt) and text.startswith(turn)):
                raise UpcycleError(
                    f"the tokenizer's chat template does not render assistant turn {i} as a continuation of "
                    f"the conversation before it, so its tokens cannot be found for the loss mask; use a "
                    f"template that keeps earlier turns unchanged, or data.train_on_prompt: true"
                )
            # The texts are prefixes of each other; their tokens may still differ at a boundary (BPE
            # merges "\n" with a reply that opens with a space): the merged token counts as the reply's.
            start = _common_prefix(_tokens(tokenizer, prompt), ids)
            if start >= seq_len:  # this turn and the later ones are truncated away
                break
            end = _common_prefix(_tokens(tokenizer, turn), ids)
            labels[start:end] = ids[start:end]
    return ids[:seq_len], labels[:seq_len], len(ids) > seq_len


def _encode_batch(batch: dict, tokenizer, seq_len: int, train_on_prompt: bool, system_prompt: str | None) -> dict:
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "trainable": [], "length": []}
    for messages in batch["messages"]:
        ids, labels, truncated = encode_chat(messages, tokenizer, seq_len, train_on_prompt=train_on_prompt,
                                             system_prompt=system_prompt)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(truncated)
        out["trainable"].append(sum(label != IGNORE_INDEX for label in labels))
        out["length"].append(len(ids))
    return out


def encode_chats(pool: list[dict], tokenizer, seq_len: int, *, train_on_prompt: bool = False,
                 system_prompt: str | None = None, num_proc: int | None = None) -> tuple[Dataset, dict]:
    """(Dataset of ``input_ids`` / ``labels`` rows, stats) of ``load_chat_pool`` examples.

    Conversations longer than ``seq_len`` are truncated; those left without a trained token
    (no assistant turn, or all of it cut off) are dropped. Stats: examples, sequences, tokens,
    trainable_tokens, truncated, dropped_empty.
    """
    if not pool:
        raise UpcycleError("no conversations to encode")
    if not getattr(tokenizer, "chat_template", None):
        raise UpcycleError("the tokenizer has no chat template; chat data needs one (or use data.kind: text)")
    from datasets import Dataset

    messages = Dataset.from_dict({"messages": [
        [{"role": m["role"], "content": m["content"]} for m in ex["messages"]] for ex in pool]})
    encoded = messages.map(
        _encode_batch, batched=True, remove_columns=["messages"], num_proc=num_proc, desc="Tokenising",
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "train_on_prompt": train_on_prompt,
                   "system_prompt": system_prompt},
    )
    trainable, truncated, length = encoded["trainable"], encoded["truncated"], encoded["length"]
    kept = [i for i, n in enumerate(trainable) if n > 0]
    encoded = encoded.select(kept).remove_columns(["truncated", "trainable", "length"])
    stats = {
        "examples": len(pool),
        "sequences": len(kept),
        "tokens": sum(length[i] for i in kept),
        "trainable_tokens": sum(trainable),
        "truncated": sum(truncated[i] for i in kept),
        "dropped_empty": len(pool) - len(kept),
    }
    return encoded, stats
