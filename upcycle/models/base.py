"""What every model source is: a dense checkpoint opened for streaming, tensor by tensor.

The formats live in ``hf_dir.py`` (Hugging Face directories) and ``gguf.py`` (llama.cpp files);
``sources.open_source`` picks one from what the user passed.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from contextlib import nullcontext
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.io import Info, one_line

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    # A multimodal checkpoint's processor: it must still load and run after conversion.
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
_HASH_CHUNK = 8 << 20


def natural_key(name: str) -> list:
    """Sort key: "layers.2" before "layers.10" (digits sit at odd indices of the split, so types never mix)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))]


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


def load_config(folder: Path, spec: str, **kwargs):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), **kwargs)
    except Exception as exc:
        raise UpcycleError(f"cannot read the model config of {spec}: {one_line(exc)}") from None
    return config


def auto_tokenizer(spec: str, folder: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as exc:
        raise UpcycleError(f"cannot read the tokenizer of {spec}: {one_line(exc)}") from None
