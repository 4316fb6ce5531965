"""``build_datasets``: a DataConfig and a tokenizer -> (train, eval, report), ready for the trainer.

    train, eval_, report = build_datasets(DataConfig(kind="chat", train="dialogue",
                                                     curate=CurateConfig()), tokenizer, seed=0)
    batch = collate([train[i] for i in range(8)], pad_id=tokenizer.pad_token_id)

Rows are ``{"input_ids": list[int], "labels": list[int]}`` (labels -100 where there is no
loss; the model shifts labels internally). Train rows keep the source's order (text: document
order; chat: the curation's round-robin order): the trainer's sampler shuffles.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from upcycle.errors import UpcycleError

from .chat import encode_chats
from .config import DataConfig
from .curate import curate, normalise, prompt_text, quality_filter
from .corpora import load_chat, load_text
from .text import pack_documents

if TYPE_CHECKING:  # datasets: imported where rows are built (see text.py)
    from datasets import Dataset


def _n_eval(n: int, fraction: float) -> int:
    """Units to hold out: at least one, and at least one left to train on."""
    return min(n - 1, max(1, round(n * fraction))) if n >= 2 and fraction > 0 else 0


def _split_documents(docs: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None, str]:
    """Seeded split by whole document (a sequence never mixes train and eval text); a single document
    is split by position (``_split_by_position``). Returns (train, eval or None, how)."""
    if len(docs) == 1 and fraction > 0:
        return _split_by_position(docs, fraction)
    how = f"{fraction:g} of the documents, seed {seed}"
    n_eval = _n_eval(len(docs), fraction)
    if not n_eval:
        return docs, None, how
    held = set(np.random.default_rng(seed).permutation(len(docs))[:n_eval].tolist())
    return (docs.select([i for i in range(len(docs)) if i not in held]),
            docs.select([i for i in range(len(docs)) if i in held]), how)


def _split_by_position(docs: Dataset, fraction: float) -> tuple[Dataset, Dataset | None, str]:
    """One document (a single .txt file): its last ``fraction`` of the characters held out, from a line break.

    A whole-document split cannot hold out a fraction of one document, so every single-file run
    would evaluate nothing (``eval_every`` silently idle). The tail, rather than seeded random
    spans: one cut leaves the held-out text contiguous and unseen (random spans would leave a
    boundary with the training text at each one, and packing would glue their neighbours into
    the same sequences); it is the usual split of a single corpus file (nanoGPT's Shakespeare:
    the last 10% for validation). Starting at a line break keeps a line from being split.
    """
    from datasets import Dataset

    text = docs[0]["text"] or ""
    cut = len(text) - round(len(text) * fraction)
    line = text.find("\n", cut)
    if line != -1:
        cut = line + 1
    head, tail = text[:cut], text[cut:]
    how = f"its last {fraction:g} by position: a single document"
    if not head.strip() or not tail.strip():
        return docs, None, how
    return Dataset.from_dict({"text": [head]}), Dataset.from_dict({"text": [tail]}), how


def _split_pool(pool: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict] | None, str]:
    """Seeded split by normalised prompt: a held-out prompt never appears in train.

    Eval takes one example per held-out prompt (the pool repeats some prompts a hundred
    times; eval should not); the other copies are used nowhere.
    """
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(pool):
        groups.setdefault(normalise(prompt_text(ex["messages"])), []).append(i)
    members = list(groups.values())
    held = np.random.default_rng(seed).permutation(len(members))[: _n_eval(len(members), fraction)]
    how = f"{fraction:g} of the prompts, seed {seed}"
    if not len(held):
        return pool, None, how
    out = {i for k in held for i in members[k]}
    return [ex for i, ex in enumerate(pool) if i not in out], [pool[members[k][0]] for k in sorted(held)], how


def _subset(n_rows: int, limit: int | None, seed: int) -> list[int] | None:
    """Sorted seeded random rows to keep under ``limit``; None when all are kept."""
    if limit is None or limit >= n_rows:
        return None
    return sorted(np.random.default_rng(seed).permutation(n_rows)[:limit].tolist())


def _nonempty(n: int, split: str, spec: str) -> None:
    if n == 0:
        raise UpcycleError(f"data.{split}: {spec} holds no documents or examples")


def build_datasets(cfg: DataConfig, tokenizer, *, seed: int = 0, num_proc: int | None = None,
                   log: Callable[[str], object] = print) -> tuple[Dataset, Dataset | None, dict]:
    """(train, eval or None, report) for ``cfg``; report is plain JSON (counts per split).

    Eval: ``cfg.eval`` if set (its held-out split if it has one, else all of it), else the train
    source's held-out split (shakespeare's held-out plays, a hub dataset's validation/test
    split), else a seeded ``cfg.eval_fraction`` of the train documents (text; a single document:
    its last ``eval_fraction`` by position) or prompts (chat), else None. Chat curation applies to the train pool only,
    after the eval split. ``num_proc`` parallelises tokenisation (``Dataset.map``).
    """
    cfg.validate()
    build = _build_text if cfg.kind == "text" else _build_chat
    train, eval_, report = build(cfg, tokenizer, seed, num_proc)
    report = {"kind": cfg.kind, "seq_len": cfg.seq_len, **report}
    for split in ("train", "eval"):
        if report[split] is not None:
            stats = ", ".join(f"{k} {v}" for k, v in report[split].items() if k != "source")
            log(f"data {split}: {report[split]['source']}: {stats}")
    if "curation" in report:
        cur = report["curation"]
        log(f"data curation: {cur['pool']} -> {cur['after_filters']} after filters -> {cur['kept']} kept "
            f"across {cur['groups']} {cur['balance_by']} groups")
    return train, eval_, report


def _train_and_eval(cfg: DataConfig, load, split, seed: int):
    """(train, eval or None, eval's description) from ``load(spec, cfg) -> (all, held-out or None)``,
    by the eval rule of ``build_datasets``; ``split`` carves eval out of train when nothing else gives one."""
    train, heldout = load(cfg.train, cfg)
    _nonempty(len(train), "train", cfg.train)
    if cfg.eval is not None:
        eval_all, eval_held = load(cfg.eval, cfg)
        ev, source = (eval_held, f"{cfg.eval} (held-out split)") if eval_held else (eval_all, cfg.eval)
        _nonempty(len(ev), "eval", cfg.eval)
        return train, ev, source
    if heldout:
        return train, heldout, f"{cfg.train} (held-out split)"
    train, ev, how = split(train, cfg.eval_fraction, seed)
    return train, ev, f"{cfg.train} ({how})"


def _build_text(cfg: DataConfig, tokenizer, seed: int, num_proc: int | None):
    docs, eval_docs, eval_source = _train_and_eval(cfg, load_text, _split_documents, seed)
    train, train_stats = pack_documents(docs, tokenizer, cfg.seq_len, num_proc=num_proc, source=f"data.train {cfg.train}")
    keep = _subset(len(train), cfg.max_train_examples, seed)
    if keep is not None:
        train = train.select(keep)
        train_stats.update(sequences=len(train), tokens=int(sum(len(x) for x in train["input_ids"])))
    report = {"train": {"source": cfg.train, **train_stats}, "eval": None}
    eval_ = None
    if eval_docs is not None:
        eval_, eval_stats = pack_documents(eval_docs, tokenizer, cfg.seq_len, num_proc=num_proc,
                                           source=f"the evaluation text {eval_source}")
        report["eval"] = {"source": eval_source, **eval_stats}
    return train, eval_, report


def _build_chat(cfg: DataConfig, tokenizer, seed: int, num_proc: int | None):
    pool, eval_pool, eval_source = _train_and_eval(cfg, load_chat, _split_pool, seed)
    report: dict = {}  # the curation report goes last
    if cfg.curate is not None:
        pool, report["curation"] = curate(pool, cfg.curate, seed)
        # Held-out loss selects LIMA's checkpoint: score it on data of the quality trained on.
        eval_pool = quality_filter(eval_pool, cfg.curate, Counter()) if eval_pool else eval_pool
        if not pool:
            raise UpcycleError(f"data.curate: no example of {cfg.train} passes the filters "
                               f"(removed: {report['curation']['removed']}); relax the thresholds")
    keep = _subset(len(pool), cfg.max_train_examples, seed)
    if keep is not None:
        pool = [pool[i] for i in keep]
    encode = dict(seq_len=cfg.seq_len, train_on_prompt=cfg.train_on_prompt, system_prompt=cfg.system_prompt,
                  num_proc=num_proc)
    train, train_stats = encode_chats(pool, tokenizer, **encode)
    if not len(train):
        raise UpcycleError(f"data.train: no example of {cfg.train} has an assistant token left to train on "
                           f"(seq_len {cfg.seq_len}); raise data.seq_len or check the data")
    report = {"train": {"source": cfg.train, **train_stats}, "eval": None, **report}
    eval_ = None
    if eval_pool:
        eval_, eval_stats = encode_chats(eval_pool, tokenizer, **encode)
        report["eval"] = {"source": eval_source, **eval_stats}
        eval_ = eval_ if len(eval_) else None  # nothing to score: the report still says why
    return train, eval_, report
