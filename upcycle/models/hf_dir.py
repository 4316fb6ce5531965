"""A Hugging Face model directory as a model source: config.json + safetensors (sharded or not)."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.io import Info, one_line, read_safetensors_header
from upcycle.models.base import (
    TOKENIZER_FILES,
    Source,
    auto_tokenizer,
    load_config,
    natural_key,
)
from upcycle.arch import skeleton


def _checkpoint_to_model_names(model, keys) -> dict[str, str]:
    """Checkpoint key -> state-dict name, renamed as ``from_pretrained`` renames (transformers v5
    saves some legacy names, e.g. GPT-NeoX ``embed_out`` for ``lm_head``). Keys without a slot in
    the model (old ``rotary_emb.inv_freq`` buffers...) are left out."""
    meta = model.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [w for w in get_model_conversion_mapping(model) if isinstance(w, WeightRenaming)]
    except ImportError:  # pragma: no cover - transformers without the v5 loading machinery
        renamings, rename_source_key = [], lambda key, *a: (key, None)
    out = {}
    for key in keys:
        new, _ = rename_source_key(key, renamings, [], model.base_model_prefix, meta)
        new = key if new not in meta and key in meta else new
        if new in meta:
            out[key] = new
    return out


def _close_handle(handle) -> None:
    if hasattr(handle, "__exit__"):
        handle.__exit__(None, None, None)


class HFDirSource(Source):
    """A Hugging Face model directory: config.json + model.safetensors, or an index + shards."""

    def __init__(self, spec: str, folder: Path):
        self.spec, self.kind, self.path = spec, "hf-dir", folder.resolve()
        if not (self.path / "config.json").is_file():
            ggufs = sorted(self.path.glob("*.gguf"))
            hint = f" (to use the GGUF file, pass it itself: {ggufs[0]})" if ggufs else ""
            raise UpcycleError(f"{spec} has no config.json: not a Hugging Face model directory{hint}")
        self.config = load_config(self.path, spec)
        disk: dict[str, tuple[str, Info]] = {}  # checkpoint key -> (file, info)
        for file, keys in self._discover().items():
            header = read_safetensors_header(self.path / file)
            for key in keys if keys is not None else header:
                if key not in header:
                    raise UpcycleError(f"{spec}: the index puts {key} in {file}, but that shard does not hold it")
                if key in disk:
                    raise UpcycleError(f"{spec}: tensor {key} is in both {disk[key][0]} and {file}")
                disk[key] = (file, header[key])
        renamed = _checkpoint_to_model_names(skeleton(self.config), disk)
        if len(set(renamed.values())) < len(renamed):
            raise UpcycleError(f"{spec}: two checkpoint tensors map to the same model tensor")
        self.unmapped = sorted(k for k in disk if k not in renamed)
        self._where = {renamed[k]: (file, k) for k, (file, _) in disk.items() if k in renamed}
        self._info = {renamed[k]: info for k, (_, info) in disk.items() if k in renamed}
        self._names = sorted(self._where, key=natural_key)
        self._handles: dict[str, object] = {}
        floats: Counter = Counter()
        for shape, dtype in self._info.values():
            if dtype.is_floating_point:
                floats[dtype] += math.prod(shape)  # by size: fp32 norms must not outvote bf16 matrices
        self.default_dtype = floats.most_common(1)[0][0] if floats else torch.float32

    def _discover(self) -> dict[str, list[str] | None]:
        """Weight file -> the keys it should hold (None: whatever its header lists)."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict) and weight_map
            except Exception:
                raise UpcycleError(f"corrupted index {index}: expected a JSON object with a 'weight_map'") from None
            shards: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                shards.setdefault(file, []).append(key)
            missing = [f for f in sorted(shards) if not (self.path / f).is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UpcycleError(f"{self.spec}: shard {missing[0]}{more} named by {index.name} is missing")
            return dict(sorted(shards.items()))
        if (self.path / "model.safetensors").is_file():
            return {"model.safetensors": None}
        shards = sorted(self.path.glob("model-*-of-*.safetensors"))
        if shards:  # no index, but the names say how many shards there must be
            total = int(re.search(r"-of-(\d+)", shards[0].name).group(1))
            if len(shards) != total:
                raise UpcycleError(f"{self.spec}: found {len(shards)} of {total} weight shards and no index")
            return {p.name: None for p in shards}
        if any(next(self.path.glob(pat), None) for pat in ("*.bin", "*.pt", "*.pth")):
            raise UpcycleError(
                f"{self.spec} has only PyTorch .bin weights; upcycle needs safetensors: re-save it once with "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"
            )
        raise UpcycleError(f"{self.spec} has no weights: expected model.safetensors or model-*-of-*.safetensors")

    def get_tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, key = self._where[name]
        if file not in self._handles:
            # Pages read through a shard's mmap count as resident until it is unmapped: keep
            # one shard open at a time, so memory stays near one shard, not the whole model.
            while self._handles:
                _close_handle(self._handles.pop(next(iter(self._handles))))
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file].get_tensor(key)

    def close(self) -> None:
        for handle in self._handles.values():
            _close_handle(handle)
        self._handles.clear()

    def _weight_files(self) -> list[Path]:
        return [self.path / f for f in sorted({file for file, _ in self._where.values()})]

    def save_tokenizer(self, out_dir) -> bool:
        present = [f for f in TOKENIZER_FILES if (self.path / f).is_file()]
        for f in present:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path / f, Path(out_dir) / f)
        return bool(present)

    def load_tokenizer(self):
        if not any((self.path / f).is_file() for f in TOKENIZER_FILES):
            raise UpcycleError(f"{self.spec} has no tokenizer files")
        return auto_tokenizer(self.spec, self.path)

    def generation_config(self):
        from transformers import GenerationConfig

        if not (self.path / "generation_config.json").is_file():
            return super().generation_config()
        try:
            return GenerationConfig.from_pretrained(str(self.path))
        except Exception as exc:
            raise UpcycleError(f"cannot read {self.path / 'generation_config.json'}: {one_line(exc)}") from None
