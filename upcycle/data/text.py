"""Plain text -> packed sequences for continued pretraining, and the batch collator.

    train, stats = pack_documents(docs, tokenizer, seq_len=512)   # docs: Dataset["text"]
    batch = collate([train[i] for i in range(8)], pad_id=tokenizer.pad_token_id)

Every document is tokenised (with the special tokens the tokenizer adds by itself, e.g. a
BOS) and followed by EOS; the documents are concatenated and cut into sequences of exactly
``seq_len`` tokens. The last, partial sequence is kept: no token is dropped or repeated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from upcycle.errors import UpcycleError

# ``datasets`` is imported where rows are built, not here: importing the package (and the
# training engine) must work without it, as on a GPU machine that lacks it (benchmarks/gpu_check.py).
if TYPE_CHECKING:
    from datasets import Dataset

IGNORE_INDEX = -100
"""Label of positions without a loss (prompt and padding), as in torch / transformers."""


def _encode(batch: dict, tokenizer, eos: int) -> dict:
    # verbose=False: whole plays are far longer than model_max_length, and that is fine here.
    texts = [t or "" for t in batch["text"]]
    ids = tokenizer(texts, verbose=False)["input_ids"]
    return {"input_ids": [x if x[-1:] == [eos] else x + [eos] for x in ids], "blank": [not t.strip() for t in texts]}


def _sequences(flat: np.ndarray, seq_len: int) -> Dataset:
    """``flat`` cut into rows of seq_len (the last one shorter); labels = input_ids."""
    offsets = np.append(np.arange(0, len(flat), seq_len), len(flat)).astype(np.int32)
    from datasets import Dataset

    rows = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32)))
    # labels = input_ids: the model shifts them by one internally (transformers convention).
    return Dataset(pa.table({"input_ids": rows, "labels": rows}))


def pack_documents(docs: Dataset, tokenizer, seq_len: int, *, num_proc: int | None = None,
                   source: str | None = None) -> tuple[Dataset, dict]:
    """(Dataset of ``input_ids`` / ``labels`` rows, stats {documents, tokens, sequences}).

    ``source``: what the documents are, for the error when they hold no text at all."""
    if not len(docs):
        raise UpcycleError("no documents to pack")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UpcycleError("the tokenizer has no eos token; packing text needs one to separate documents")
    encoded = docs.map(_encode, batched=True, remove_columns=docs.column_names, num_proc=num_proc,
                       fn_kwargs={"tokenizer": tokenizer, "eos": eos}, desc="Tokenising")
    if all(encoded["blank"]):  # an empty file would otherwise train on a lone EOS
        raise UpcycleError(f"{source or 'the text'} is empty: no text to train on")
    chunks = encoded.data.column("input_ids").chunks
    flat = np.concatenate([c.flatten().to_numpy() for c in chunks])
    packed = _sequences(flat, seq_len)
    return packed, {"documents": len(docs), "tokens": int(len(flat)), "sequences": len(packed)}


def count_targets(ds: Dataset) -> list[int]:
    """Per row of a tokenised dataset, the tokens it trains on: labels after the causal shift that are not -100."""
    labels = ds.with_format("numpy")["labels"]
    return [int(np.count_nonzero(np.asarray(row)[1:] != IGNORE_INDEX)) for row in labels]


def max_token_id(ds: Dataset) -> int:
    """The largest ``input_ids`` value of a tokenised dataset (what must fit the model's embeddings)."""
    table = getattr(ds, "data", None)
    if hasattr(table, "column"):  # a datasets.Dataset: one pass over its Arrow column
        import pyarrow.compute as pc

        return int(pc.max(pc.list_flatten(table.column("input_ids"))).as_py() or 0)
    return max((max(ds[i]["input_ids"], default=0) for i in range(len(ds))), default=0)  # rows of another kind


def collate(examples: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``{"input_ids", "labels"}`` rows into a batch.

    Returns ``input_ids`` [B, S] (pad_id on padding), ``labels`` [B, S] (-100 on padding) and
    ``attention_mask`` [B, S] (1 on tokens), all int64; S = the longest row, or ``pad_to``.
    Padding is found by length, not by pad_id: a tokenizer's pad token is often its EOS.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({max(lengths)} tokens)")
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        if len(ex["labels"]) != n:
            raise ValueError(f"example {row}: {n} input_ids but {len(ex['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
