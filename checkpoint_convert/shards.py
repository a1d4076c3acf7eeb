"""Streaming safetensors writer: each tensor goes to disk as soon as it is produced.

The names, shapes and dtypes are planned first (the exporter derives them from the rule table), so
every shard's header can be written before its data and no shard is ever held in memory. The
files follow HF's sharded layout: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`. The format: an 8-byte little-endian header length, a JSON header
(`{name: {dtype, shape, data_offsets}}`, padded with spaces to 8 bytes), then the raw data.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}
_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float64: "F64"}
INDEX = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (HF's decimal units; KiB/MiB/GiB are binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: use a number with an optional unit, e.g. 5GB or 500MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


@dataclass(frozen=True)
class Planned:
    """One tensor to be written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def plan_shards(items: Iterable[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Cut the tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets
    a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _header(shard: list[Planned]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in shard:
        header[item.name] = {"dtype": _ST_NAMES[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(out_dir: Path, shards: list[list[Planned]],
                 tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Write `tensors` (in plan order) into the planned shards; returns the file names.

    Raises:
        RuntimeError: a tensor does not match its planned name, shape or dtype, or the stream
            ends early or runs long (the plan and the producer disagree: a bug).
    """
    names = shard_names(len(shards))
    stream = iter(tensors)
    for shard, file_name in zip(shards, names):
        with open(out_dir / file_name, "wb") as handle:
            handle.write(_header(shard))
            for item in shard:
                name, tensor = next(stream, (None, None))
                if tensor is None or Planned(name, tuple(tensor.shape), tensor.dtype) != item:
                    raise RuntimeError(f"shard writer: got {name}, planned {item}")
                handle.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
    if next(stream, None) is not None:
        raise RuntimeError("shard writer: more tensors than planned")
    if len(shards) > 1:
        _write_index(out_dir, shards, names)
    return names


def _write_index(out_dir: Path, shards: list[list[Planned]], names: list[str]) -> None:
    weight_map = {item.name: name for shard, name in zip(shards, names) for item in shard}
    total = sum(item.nbytes for shard in shards for item in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
