"""Safetensors tensors read with `pread` into fresh tensors: no memory map, few large reads.

`safe_open(...).get_slice` reads through a memory map: every page it touches counts in the
process's resident set until the file is closed (a 5 GB shard: 5 GB of RSS), and the data
arrives one page fault at a time. Here a selection is read with one `os.preadv` per contiguous
run of rows straight into the result tensor (or, for a selection inside the rows, into a bounded
row buffer), so a rank holds only the tensors it asked for and reads only their bytes (rows of
a column slice are read whole). The header is parsed here for the data offsets; `safe_open`
still validates each file when it is opened (`hf_checkpoint`).
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from pathlib import Path

import torch

ROW_BUFFER_BYTES = 64 * 2**20
"""Largest row buffer for a selection that is not whole rows (TP column slices, fused parts)."""


class OpenFiles:
    """At most `limit` read-only file descriptors, least recently used closed first."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._fds: OrderedDict[Path, int] = OrderedDict()

    def fd(self, path: Path) -> int:
        if path in self._fds:
            self._fds.move_to_end(path)
            return self._fds[path]
        self._fds[path] = fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # reads follow the file order: a larger read-ahead
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if len(self._fds) > self.limit:
            os.close(self._fds.popitem(last=False)[1])
        return self._fds[path]

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """{key: (absolute start, end)} of every tensor's bytes in a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    return {key: (base + info["data_offsets"][0], base + info["data_offsets"][1])
            for key, info in header.items() if key != "__metadata__"}


def pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous tensor `out` with the bytes of `fd` at `offset`."""
    if out.numel() == 0:
        return
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += count


def _normalize(index, shape: tuple[int, ...]) -> list[slice]:
    """One step-1 slice per dim, clipped to the shape."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or not all(isinstance(i, slice) for i in index):
        raise TypeError(f"index {index!r}: only slices, at most one per dim")
    full = list(index) + [slice(None)] * (len(shape) - len(index))
    out = []
    for part, size in zip(full, shape):
        start, stop, step = part.indices(size)
        if step != 1:
            raise TypeError(f"index {index!r}: slices with a step are not supported")
        out.append(slice(start, max(start, stop)))
    return out


def read_selection(fd: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype,
                   index) -> torch.Tensor:
    """`tensor[index]` of the row-major tensor stored at `offset` of `fd`, as a new tensor."""
    parts = _normalize(index, shape)
    # File bytes land in host memory; the loader moves them to the parameter's device.
    out = torch.empty([p.stop - p.start for p in parts], dtype=dtype, device="cpu")
    if not shape:
        pread_into(fd, out, offset)
    else:
        _fill(out, fd, offset, shape, parts)
    return out


def _fill(out: torch.Tensor, fd: int, offset: int, shape: tuple[int, ...],
          parts: list[slice]) -> None:
    rows, rest = parts[0], parts[1:]
    row_bytes = torch.Size(shape[1:]).numel() * out.element_size()
    if all(p.start == 0 and p.stop == n for p, n in zip(rest, shape[1:])):
        pread_into(fd, out, offset + rows.start * row_bytes)  # whole rows: one read
        return
    if row_bytes > ROW_BUFFER_BYTES:  # one row is too big to buffer: recurse into each row
        for i in range(rows.start, rows.stop):
            _fill(out[i - rows.start], fd, offset + i * row_bytes, shape[1:], rest)
        return
    step = max(1, ROW_BUFFER_BYTES // max(row_bytes, 1))
    for start in range(rows.start, rows.stop, step):
        stop = min(start + step, rows.stop)
        buffer = out.new_empty((stop - start, *shape[1:]))
        pread_into(fd, buffer, offset + start * row_bytes)
        out[start - rows.start: stop - rows.start].copy_(buffer[(slice(None), *rest)])
