"""Streaming safetensors writer: shards are written tensor by tensor, never held in memory.

``safetensors.torch.save_file`` needs the whole state dict at once, which for an upcycled
model is E times the MLPs. But the safetensors layout is just an 8-byte header length, a
JSON header with every tensor's byte range, then the raw bytes in that order. Conversion
knows every output tensor's name, shape and dtype before it reads any data, so it can
write each shard's header first and then stream the bytes, and peak memory stays at one
tensor (one expert for expert tensors, which are written one expert at a time).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import torch

from upcycle.io import SAFETENSORS_DTYPES

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front.

    Call ``write(name, tensor_part)`` with each tensor's bytes in header order; a tensor
    may arrive in several consecutive parts (e.g. one expert at a time along dim 0).
    ``close()`` checks that every byte promised by the header was written.
    """

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        self.specs = specs
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": _DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        self.data_size = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self._file: BinaryIO = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._index = 0  # tensor being written
        self._written = 0  # bytes of that tensor written so far

    def write(self, name: str, part: torch.Tensor) -> int:
        spec = self.specs[self._index]
        if name != spec.name or part.dtype != spec.dtype:
            raise RuntimeError(f"writer expected {spec.name} ({spec.dtype}), got {name} ({part.dtype})")
        data = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._written += data.nbytes
        if self._written > spec.nbytes:
            raise RuntimeError(f"{name}: more bytes than its shape {spec.shape} holds")
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0
        return data.nbytes

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._index != len(self.specs):
            raise RuntimeError(f"{self.path}: incomplete, stopped at {self.specs[self._index].name}")

    def abort(self) -> None:
        self._file.close()


def write_index(out_dir: str, shards: list[list[TensorSpec]], names: list[str]) -> None:
    """``model.safetensors.index.json`` as transformers writes it (only for sharded output)."""
    if len(shards) == 1:
        return
    weight_map = {spec.name: fname for specs, fname in zip(shards, names) for spec in specs}
    total = sum(spec.nbytes for specs in shards for spec in specs)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")
