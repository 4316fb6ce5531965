"""A llama.cpp GGUF file as a model source: memory-mapped, each tensor dequantised on demand.

``gguf`` is imported only when a GGUF file is opened: machines that never read one need not have it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.io import one_line
from upcycle.models.base import Source, auto_tokenizer, load_config, natural_key
from upcycle.arch import skeleton

# GGUF storage types get_tensor returns as they are; every quantised type comes back as float32.
_GGUF_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}


class GGUFSource(Source):
    """A llama.cpp GGUF file, memory-mapped; each tensor dequantised on demand."""

    def __init__(self, spec: str, path: Path, kind: str):
        import gguf

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
        self.config = load_config(self.path.parent, spec, gguf_file=self.path.name)
        self._reader, self._arch = reader, arch
        self._has_tokenizer = "tokenizer.ggml.model" in reader.fields
        hf_of = self._hf_names()
        # No output.weight with tied embeddings: lm_head is simply absent, as in an HF checkpoint.
        self._tensors = {hf_of[t.name]: t for t in reader.tensors if t.name in hf_of}
        self.unmapped = [t.name for t in reader.tensors if t.name not in hf_of]  # e.g. llama3 rope_freqs
        self._info = {n: (tuple(int(d) for d in reversed(t.shape.tolist())), _GGUF_DTYPES.get(t.tensor_type.name,
                      torch.float32)) for n, t in self._tensors.items()}
        self._names = sorted(self._tensors, key=natural_key)
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
        for hf_name in skeleton(self.config).state_dict():
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
            raise UpcycleError(f"{self.spec}: tensor {t.name}: {one_line(exc)}") from None
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
        return auto_tokenizer(self.spec, self.path.parent, gguf_file=self.path.name)


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py).

    Per head, HF keeps the rotary rows as two halves (rotate_half); llama.cpp interleaves them
    in pairs. Rows viewed as [n_head, dim/2, 2] -> [n_head, 2, dim/2]. For k, n_head is the number
    of KV heads. Same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
