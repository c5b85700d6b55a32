"""A streaming safetensors writer: the header first (shapes are known from the plan), then each tensor's
bytes as soon as it exists, so memory holds one tensor at a time instead of a whole shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from studio.sources import DTYPE_CODES, TensorInfo, copy_bytes


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """The safetensors header for (name, dtype, shape, nbytes) entries, in order, padded to 8 bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_tensor(out, tensor: torch.Tensor) -> None:
    """Append a tensor's bytes (C order, little-endian as on every platform torch supports)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel():
        out.write(memoryview(flat.view(torch.uint8).numpy()))


def write_shard(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], int]],
                produce: Iterable[torch.Tensor | TensorInfo], metadata: dict[str, str] | None = None,
                on_bytes: Callable[[int], None] | None = None) -> None:
    """Write one shard. `produce` yields, in header order, a tensor to write or a TensorInfo to copy verbatim."""
    with open(path, "wb", buffering=0) as out:
        out.write(header_bytes(entries, metadata or {"format": "pt"}))
        for (name, dtype, shape, nbytes), item in zip(entries, produce, strict=True):
            if isinstance(item, TensorInfo):
                copy_bytes(item, out)
            else:
                if item.dtype != dtype or tuple(item.shape) != tuple(shape):
                    raise AssertionError(f"{name}: produced {item.dtype} {list(item.shape)}, planned {dtype} {shape}")
                write_tensor(out, item)
            if on_bytes:
                on_bytes(nbytes)
        os.fsync(out.fileno())  # on disk before the folder is renamed into place
