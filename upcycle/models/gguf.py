"""A llama.cpp GGUF file as a model source, read exactly as transformers' own GGUF loader reads it.

Memory-mapped; each tensor is dequantised on demand and handed to transformers' per-family tensor
processor (``transformers.modeling_gguf_pytorch_utils.TENSOR_PROCESSORS``: Llama's q/k un-permute,
Gemma's and Nemotron's 1 + w norms, Bloom's qkv regrouping, GPT-2's transposes), named by
transformers' own GGUF -> state-dict map (``get_gguf_hf_weights_map``), with the config transformers
builds (``load_gguf_checkpoint(path, return_tensors=False)["config"]``). What is read exactly is
decided in ``gguf_rules``; every other file is refused in one line, never read approximately.

``gguf`` is imported only when a GGUF file is opened: machines that never read one need not have it.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch

from upcycle.arch import skeleton
from upcycle.errors import UpcycleError
from upcycle.io import one_line
from upcycle.models.base import Source, auto_tokenizer, natural_key
from upcycle.models.gguf_rules import EXACT, check_metadata, refusal

# GGUF storage types get_tensor returns as they are; every quantised type comes back as float32.
_GGUF_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}


class GGUFSource(Source):
    """A llama.cpp GGUF file, memory-mapped; each tensor dequantised on demand, as transformers reads it."""

    def __init__(self, spec: str, path: Path, kind: str):
        import gguf
        from transformers import modeling_gguf_pytorch_utils as hf_gguf

        self.spec, self.kind, self.path = spec, kind, path.resolve()
        size = self.path.stat().st_size
        try:
            reader = gguf.GGUFReader(self.path, "r")
            arch = reader.fields["general.architecture"].contents()
        except Exception as exc:
            raise UpcycleError(f"corrupted or truncated GGUF file {self.path} ({size} bytes): {one_line(exc)}") from None
        for t in reader.tensors:  # the reader slices its mmap lazily: a short file can slip through
            if t.data_offset + t.n_bytes > size:
                raise UpcycleError(f"truncated GGUF file {self.path}: tensor {t.name} ends at byte "
                                   f"{t.data_offset + t.n_bytes}, the file has {size}")
        self._reader, self._arch = reader, arch
        why = refusal(arch, arch in hf_gguf.GGUF_SUPPORTED_ARCHITECTURES)
        if why is not None:
            raise UpcycleError(f"cannot read {spec} exactly: GGUF family {arch!r} {why}; upcycle its Hugging Face "
                               f"checkpoint instead (GGUF families read exactly: {', '.join(EXACT)})")
        self.config, config_dict = _transformers_config(self.path, spec)
        why = check_metadata(arch, {k: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")},
                             hf_gguf.GGUF_TO_TRANSFORMERS_MAPPING["config"].get(arch, {}), self.config)
        if why is not None:
            raise UpcycleError(f"cannot read {spec} exactly: {why}; upcycle its Hugging Face checkpoint instead")
        self._has_tokenizer = "tokenizer.ggml.model" in reader.fields
        model = skeleton(self.config)
        # The processor reads its hyperparameters from transformers' GGUF config dict, not the config object
        # (Llama's un-permute is skipped where the file has no head_count_kv): pass it the same dict.
        self._processor = hf_gguf.TENSOR_PROCESSORS.get(arch, hf_gguf.TensorProcessor)(config=config_dict)
        try:
            with _name_map_built_once():
                self._key_map = hf_gguf.get_gguf_hf_weights_map(model, self._processor)
        except Exception as exc:
            raise UpcycleError(f"{spec}: transformers cannot map this GGUF file's tensors: {one_line(exc)}") from None
        state = model.state_dict()
        self._tensors = self._place(state)
        self.unmapped = []  # every tensor has its slot: _place refuses a file with one that has none
        # Shapes are the model's (a processor may transpose); dtypes the storage's, float32 once dequantised.
        self._info = {n: (tuple(state[n].shape), _GGUF_DTYPES.get(t.tensor_type.name, torch.float32))
                      for n, t in self._tensors.items()}
        self._names = sorted(self._tensors, key=natural_key)
        # Only matrices decide: llama.cpp keeps norms in F32 even in an F16 file.
        mats = {t.tensor_type.name for t in self._tensors.values() if len(t.shape) >= 2}
        self.default_dtype = _GGUF_DTYPES[mats.pop()] if mats in ({"F16"}, {"BF16"}) else torch.float32

    def _place(self, state: dict) -> dict:
        """State-dict name -> GGUF tensor; refuses a tensor transformers would drop or a size that does not fit."""
        by_gguf = {t.name: t for t in self._reader.tensors}
        dropped = [n for n in by_gguf if n not in self._key_map]
        if dropped:
            raise UpcycleError(f"cannot read {self.spec} exactly: transformers' GGUF loader drops its tensor"
                               f"{'s' if len(dropped) > 1 else ''} {', '.join(dropped[:3])}"
                               f"{', ...' if len(dropped) > 3 else ''} (the model it builds from this file has no "
                               f"slot for {'them' if len(dropped) > 1 else 'it'}); upcycle its Hugging Face "
                               f"checkpoint instead")
        if getattr(self.config, "tie_word_embeddings", False) and "output.weight" in by_gguf and "token_embd.weight" in by_gguf:
            # transformers ties Falcon's and Bloom's lm_head to the embeddings whatever the file holds.
            out, emb = by_gguf.pop("output.weight"), by_gguf["token_embd.weight"]
            if out.tensor_type != emb.tensor_type or not np.array_equal(out.data, emb.data):
                raise UpcycleError(f"cannot read {self.spec} exactly: its output.weight differs from token_embd.weight, "
                                   f"and transformers ties them for GGUF family {self._arch!r}")
        placed = {}
        for gname, t in by_gguf.items():
            name = self._key_map[gname]
            want = state[name].numel()
            if int(np.prod(t.shape)) != want:
                raise UpcycleError(f"cannot read {self.spec} exactly: transformers' GGUF config does not fit its tensor "
                                   f"{gname} ({int(np.prod(t.shape))} elements, {name} has {want})")
            placed[name] = t
        return placed

    def get_tensor(self, name: str) -> torch.Tensor:
        shape, dtype = self._info[name]
        if self._reader is None:
            raise UpcycleError(f"{self.spec}: source is closed")
        t = self._tensors[name]
        weights = _dequantized(t, self.spec)
        # A processor may divert a tensor through parsed_parameters (GPT-2's output.weight): give it a
        # scratch one per tensor, so reading stays one tensor at a time.
        scratch: dict = {"tensors": {}}
        result = self._processor.process(weights=weights, name=t.name, tensor_key_mapping=self._key_map,
                                         parsed_parameters=scratch)
        if result.name is None:
            if list(scratch["tensors"]) != [name]:
                raise UpcycleError(f"{self.spec}: transformers' GGUF processor turned {t.name} into "
                                   f"{sorted(scratch['tensors'])}, not {name}")
            x = scratch["tensors"][name]
        else:
            if self._key_map.get(result.name) != name:
                raise UpcycleError(f"{self.spec}: transformers' GGUF processor renamed {t.name} to {result.name}")
            w = result.weights
            if not (w.flags.writeable and w.flags.c_contiguous):  # still the read-only mmap, or a transposed view
                w = np.array(w, order="C")
            x = torch.from_numpy(w)
        if tuple(x.shape) != shape:
            raise UpcycleError(f"{self.spec}: tensor {t.name} reads as {tuple(x.shape)}, {name} is {shape}")
        return x.to(dtype)

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
        return auto_tokenizer(self.spec, self.path.parent, gguf_file=self.path.name)


@contextlib.contextmanager
def _name_map_built_once():
    """``get_gguf_hf_weights_map`` recurses into every module (~400 in a 30-layer model) and rebuilds gguf's
    tensor name map in each, ~35 ms apiece: memoise that pure function while it runs (same map, built once)."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _transformers_config(path: Path, spec: str):
    """(config, config dict) as ``AutoConfig.from_pretrained(folder, gguf_file=...)`` builds them, parsing the
    file's metadata once: transformers' GGUF config is ``from_dict`` of ``load_gguf_checkpoint``'s dict."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_dict = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(dict(config_dict))
    except Exception as exc:
        raise UpcycleError(f"cannot read the model config of {spec}: {one_line(exc)}") from None
    config._name_or_path = str(path.parent)  # as from_pretrained(folder, gguf_file=...) records it
    return config, config_dict


def _dequantized(t, spec: str) -> np.ndarray:
    """One tensor as numpy, as transformers' ``gguf.dequantize`` gives it, except that F16 stays F16 and the
    read-only mmap is not copied here (only what the processor leaves untouched is copied, once)."""
    import gguf

    kind = t.tensor_type.name
    try:
        if kind == "BF16":  # numpy has no bfloat16: widen the raw bits (exact)
            return (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        if kind in _GGUF_DTYPES:
            return t.data
        return gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as exc:
        raise UpcycleError(f"{spec}: tensor {t.name}: {one_line(exc)}") from None
