"""Typed configuration of the data pipeline: what to read, how to tokenise it, what to keep.

    cfg = from_dict(DataConfig, {"kind": "chat", "train": "dialogue", "curate": {"target": 1000}})
    cfg.validate()          # one-line UpcycleError naming the bad field

YAML recipes mirror these dataclasses under ``data:``; ``upcycle.config.from_dict`` rejects
unknown keys (listing the valid ones) and wrong types, ``validate`` checks the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from upcycle.errors import UpcycleError


@dataclass
class CurateConfig:
    """LIMA-style curation of a chat pool (Zhou et al. 2023): quality filters, then diversity.

    An example's *prompt* is its user turns joined, its *response* its assistant turns joined;
    the default thresholds suit the ``dialogue`` pool (chatterbot Q/A + chitchat conversations).
    """

    target: int = 1000
    """Examples to keep (LIMA: 1000). A smaller filtered pool is kept whole (the report says so)."""
    min_prompt_chars: int = 10
    """Drop examples whose prompt is shorter (a bare "Hello?" teaches nothing)."""
    min_response_chars: int = 40
    """Drop examples whose response is shorter ("Yes.", "1963": too terse to show a style)."""
    max_response_chars: int = 4000
    """Drop examples whose response is longer (about 1k tokens: mostly cut off at seq_len anyway)."""
    min_alpha_fraction: float = 0.5
    """Drop responses where letters are less than this fraction of the non-space characters
    (mostly digits, symbols or markup; code snippets sit around 0.6-0.75)."""
    dedup: bool = True
    """Keep one example per prompt (normalised: lowercase, punctuation and whitespace collapsed);
    the one with the longest response wins."""
    near_dup_threshold: float | None = None
    """Also drop examples (prompt + response) whose word-trigram Jaccard similarity (MinHash
    estimate) to a kept one reaches this value, e.g. 0.8; None: off (it finds nothing in
    ``dialogue`` beyond the exact duplicates, so it is not worth its second there)."""
    balance_by: Literal["topic", "source"] = "topic"
    """Round-robin across these groups (seeded shuffle inside each) so no group dominates."""

    def validate(self) -> None:
        if self.target < 1:
            raise UpcycleError(f"data.curate.target must be at least 1, got {self.target}")
        for name in ("min_prompt_chars", "min_response_chars"):
            if getattr(self, name) < 0:
                raise UpcycleError(f"data.curate.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_response_chars < max(1, self.min_response_chars):
            raise UpcycleError(
                f"data.curate.max_response_chars must be >= 1 and >= min_response_chars "
                f"({self.min_response_chars}), got {self.max_response_chars}"
            )
        if not 0.0 <= self.min_alpha_fraction <= 1.0:
            raise UpcycleError(f"data.curate.min_alpha_fraction must be in [0, 1], got {self.min_alpha_fraction}")
        if self.near_dup_threshold is not None and not 0.0 < self.near_dup_threshold <= 1.0:
            raise UpcycleError(
                f"data.curate.near_dup_threshold must be in (0, 1] or null, got {self.near_dup_threshold}"
            )
        if self.balance_by not in ("topic", "source"):
            raise UpcycleError(f"data.curate.balance_by must be 'topic' or 'source', got {self.balance_by!r}")


@dataclass
class DataConfig:
    """Where training examples come from and how they become token sequences."""

    kind: Literal["text", "chat"] = "text"
    """``text``: documents packed into fixed-length sequences (continued pretraining).
    ``chat``: conversations rendered with the tokenizer's chat template, loss on assistant turns."""
    train: str = "shakespeare"
    """A built-in (shakespeare, chatterbot, chitchat, dialogue), a file, directory or glob of
    .txt/.jsonl/.json/.parquet files, or a Hugging Face hub dataset name."""
    eval: str | None = None
    """Same forms as ``train``; a source with a held-out split (shakespeare: hamlet, macbeth,
    twelfth night; a hub dataset's validation/test split) gives that split. None: the train
    source's held-out split if it has one, else a seeded ``eval_fraction`` of the train
    documents (text; a single document, e.g. one .txt file: its last ``eval_fraction``, by
    position) or prompts (chat)."""
    eval_fraction: float = 0.02
    """Fraction held out for evaluation when ``eval`` is None and the source has no split; 0: no eval."""
    seq_len: int = 512
    """Text: length of every packed sequence (the last may be shorter). Chat: maximum length;
    longer conversations are truncated."""
    text_column: str = "text"
    """Text: the column holding a document (.jsonl/.json/.parquet). A .txt file is one document."""
    messages_column: str = "messages"
    """Chat: column of ``[{"role", "content"}, ...]`` lists (ShareGPT ``{"from", "value"}`` with
    human/gpt roles is accepted too). Rows without it use the prompt/response columns."""
    prompt_column: str = "prompt"
    """Chat: single-turn prompt column; Alpaca's ``instruction`` (+ ``input``) is the fallback."""
    response_column: str = "response"
    """Chat: single-turn response column; Alpaca's ``output`` is the fallback."""
    system_prompt: str | None = None
    """Chat: prepended as a system message to every conversation that has none."""
    train_on_prompt: bool = False
    """Chat: also compute the loss on system/user/template tokens (default: assistant turns only)."""
    max_train_examples: int | None = None
    """Keep a seeded random subset of this many train sequences (text) or examples (chat)."""
    curate: CurateConfig | None = None
    """Chat only: LIMA-style curation of the train pool before tokenisation."""

    def validate(self) -> None:
        if self.kind not in ("text", "chat"):
            raise UpcycleError(f"data.kind must be 'text' or 'chat', got {self.kind!r}")
        if not isinstance(self.train, str) or not self.train.strip():
            raise UpcycleError("data.train must name a dataset (a built-in, a path or a hub name)")
        if self.eval is not None and not self.eval.strip():
            raise UpcycleError("data.eval must name a dataset or be null")
        if not (math.isfinite(self.eval_fraction) and 0.0 <= self.eval_fraction < 1.0):
            raise UpcycleError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.seq_len < 2:
            raise UpcycleError(f"data.seq_len must be at least 2 (a next-token target), got {self.seq_len}")
        for name in ("text_column", "messages_column", "prompt_column", "response_column"):
            if not getattr(self, name):
                raise UpcycleError(f"data.{name} must be a non-empty column name")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise UpcycleError(f"data.max_train_examples must be at least 1 or null, got {self.max_train_examples}")
        if self.kind == "text":
            # Chat-only settings would silently do nothing on text: refuse instead.
            for name in ("system_prompt", "curate"):
                if getattr(self, name) is not None:
                    raise UpcycleError(f"data.{name} applies to kind: chat only (data.kind is text)")
            if self.train_on_prompt:
                raise UpcycleError("data.train_on_prompt applies to kind: chat only (text trains on every token)")
        if self.curate is not None:
            self.curate.validate()
