"""Files in and out: atomic writes, atomic output directories, and readers of what others wrote.

    with atomic_dir("runs/moe", overwrite=True) as tmp:   # fill tmp; it becomes runs/moe at the end
        ...
    write_json("runs/cpt/summary.json", summary)          # written aside, renamed into place
    config = read_model_config("runs/moe")                # config.json as a dict, one-line errors

Every writer in the package goes through here, so there is one temp-then-rename rule: a
kill at any moment leaves either the old file or directory or the new one, never half of
one. Temporaries sit beside their target (same filesystem, so the rename is atomic) and
carry the writer's pid, so a later run can tell a dead writer's leftovers from a live one's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from upcycle.errors import UpcycleError

TMP_MARK = ".upcycle-tmp-"
OLD_MARK = ".upcycle-old-"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

Info = tuple[tuple[int, ...], torch.dtype]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line (third-party messages span many)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- writing


def _tmp_name(path: str, mark: str = TMP_MARK) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{mark}{os.getpid()}")


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path`` to write a file to; it replaces ``path`` on success."""
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_dir(out: str, *, overwrite: bool = False, exists_message: str | None = None):
    """Yield an empty temporary directory beside ``out``; on success it becomes ``out``.

    An existing ``out`` is an UpcycleError unless ``overwrite``; then it is moved aside and
    removed only once the new directory is in place. On any failure (Ctrl-C included) the
    temporary directory goes and ``out`` is as it was. Leftovers of killed writers of the
    same ``out`` are cleaned up first (``remove_stale``). ``exists_message``: the error for an
    existing ``out``.
    """
    exists_message = exists_message or f"{out} already exists"
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if os.path.isdir(parent):
        remove_stale(parent, os.path.basename(out))
    if os.path.exists(out) and not overwrite:
        raise UpcycleError(exists_message)
    os.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(out) and not overwrite:  # appeared while we were writing
            raise UpcycleError(exists_message)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: str, out: str) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = _tmp_name(out, OLD_MARK)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def remove_stale(parent: str, name: str | None = None) -> None:
    """Clean up after killed writers in ``parent`` (of ``name`` only, if given): remove their
    temporary directories, and put back a replaced directory if the kill came between moving
    it aside and moving the new one in. Leftovers of live processes are left alone."""
    for entry in os.listdir(parent):
        for mark in (TMP_MARK, OLD_MARK):
            target, sep, pid = entry.rpartition(mark)
            if not (sep and target.startswith(".") and pid.isdigit()) or _alive(int(pid)):
                continue
            target = target[1:]
            if name is not None and target != name:
                continue
            path = os.path.join(parent, entry)
            if mark == OLD_MARK and not os.path.lexists(os.path.join(parent, target)):
                os.rename(path, os.path.join(parent, target))
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- reading


def read_json_object(path: str, what: str) -> dict:
    """A JSON object from ``path``; a one-line UpcycleError for an unreadable file or another JSON value."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UpcycleError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise UpcycleError(f"{path} is not {what} (expected a JSON object)")
    return raw


def read_model_config(path: str) -> dict:
    """``config.json`` of model directory ``path`` as a dict (its ``upcycle`` section, if any, checked to be an object)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UpcycleError(f"checkpoint not found: {path}")
    if not os.path.isfile(cfg_path):
        raise UpcycleError(f"{path} has no config.json: not a model directory")
    raw = read_json_object(cfg_path, "a model config")
    if not isinstance(raw.get("upcycle", {}), dict):
        raise UpcycleError(f"{cfg_path} is not a model config (its 'upcycle' entry is not an object)")
    return raw


def is_upcycled_dir(path: str) -> bool:
    """True for a model directory whose config.json has an ``upcycle`` section."""
    try:
        return os.path.isdir(path) and "upcycle" in read_model_config(path)
    except UpcycleError:
        return False


def read_safetensors_header(path: str | Path) -> dict[str, Info]:
    """Tensor name -> (shape, dtype); checks the file holds every byte its header promises."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise UpcycleError(f"corrupted or truncated safetensors file {path}: unreadable header")
        try:
            header, entries = json.loads(f.read(n)), {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                shape, dtype = tuple(int(d) for d in info["shape"]), SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = (int(x) for x in info["data_offsets"])
                if begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"offsets of {name} do not match its shape and dtype")
                entries[name] = (shape, dtype, end)
        except Exception as exc:
            raise UpcycleError(f"corrupted safetensors file {path}: bad header ({one_line(exc)})") from None
    needed = 8 + n + max((e[2] for e in entries.values()), default=0)
    if needed > size:
        raise UpcycleError(f"truncated safetensors file {path}: its header needs {needed} bytes, the file has {size}")
    return {name: (shape, dtype) for name, (shape, dtype, _) in entries.items()}


def read_safetensors(path: str) -> dict:
    """Every tensor of a safetensors file (CPU); a missing or damaged file is one UpcycleError line."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    except Exception as e:  # safetensors raises several types for damaged or missing files
        raise UpcycleError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
