"""Streaming safetensors writer: tensors go to disk shard by shard, in HF's sharded layout.

At most one shard is held in memory. Shards are written under temporary names and renamed to
`model-0000i-of-0000n.safetensors` (+ `model.safetensors.index.json`) at the end, or to
`model.safetensors` if everything fit in one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}
INDEX = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (HF's decimal units; KiB/MiB/GiB are binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: use a number with an optional unit, e.g. 5GB or 500MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


class ShardWriter:
    """Collect named tensors and write them to `out_dir` in shards of at most `max_shard_bytes`
    (a single tensor larger than that gets a shard of its own)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard{len(self._files):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the files, write the index if sharded; returns file names."""
        if self._pending or not self._files:
            self._flush()
        count = len(self._files)
        names = (["model.safetensors"] if count == 1 else
                 [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        weight_map = {}
        for (path, keys), name in zip(self._files, names):
            path.rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names
