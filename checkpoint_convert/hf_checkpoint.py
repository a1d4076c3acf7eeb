"""A lazy, read-only view of an HF checkpoint directory under a family's canonical tensor names.

Safetensors files (one, or shards with `model.safetensors.index.json`) are validated by
`safe_open` and read with `pread` (`tensor_io`), so a rank reads only the rows it asks for and no
file stays memory-mapped. Pickled `.bin` files are
opened only with `torch.load(weights_only=True, mmap=True)`. Other on-disk spellings of a tensor
(the family's `hf_aliases`, fused `[E, ...]` expert tensors, MXFP4 `_blocks`/`_scales` pairs of the
family's `mxfp4_tensors`, dequantised on read) appear under their canonical names.
"""

from __future__ import annotations

import pickle
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_convert.errors import ConversionError
from checkpoint_convert.mapping import fill, pattern_regex
from checkpoint_convert.mxfp4 import Mxfp4Tensor
from checkpoint_convert.tensor_io import OpenFiles, data_offsets, read_selection
from megatron_ec.models.family import Family
from megatron_ec.textfile import TextFileError, read_json

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
              "F16": torch.float16, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool,
              "U8": torch.uint8}
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


class _SafetensorsTensor:
    """One tensor of a safetensors file; indexing reads only the selected rows (`tensor_io`)."""

    def __init__(self, files: OpenFiles, path: Path, start: int, header_slice) -> None:
        self._files, self._path, self._start = files, path, start
        self.shape = tuple(header_slice.get_shape())
        self.dtype = _ST_DTYPES.get(header_slice.get_dtype())

    def __getitem__(self, index) -> torch.Tensor:
        return read_selection(self._files.fd(self._path), self._start, self.shape, self.dtype,
                              index)


@dataclass
class _Source:
    """Where a canonical tensor lives: file, on-disk key, and (fused experts) which block."""

    path: Path
    key: str
    tensor: object
    """`_SafetensorsTensor` or a memory-mapped torch.Tensor."""
    expert: int | None = None
    part: int = 0
    num_parts: int = 1

    @property
    def where(self) -> str:
        return f"{self.path}[{self.key}]"

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.tensor.shape)
        if self.expert is None:
            return shape
        return (shape[1] // self.num_parts, *shape[2:])

    def read(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along `dim`, cut at the end of the tensor."""
        shape = self.shape
        index = [slice(None)] * len(shape)
        index[dim] = slice(min(start, shape[dim]), min(stop, shape[dim]))
        if self.expert is None:
            return self.tensor[tuple(index)]
        offset = self.part * shape[0]
        rows = index[0]
        index[0] = slice(offset + (rows.start or 0), offset + (rows.stop or shape[0]))
        return self.tensor[(slice(self.expert, self.expert + 1), *index)][0]


def _zero_pad(piece: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Append zero rows along `dim` up to `length` (Megatron's vocab padding)."""
    if piece.shape[dim] == length:
        return piece
    pad_shape = list(piece.shape)
    pad_shape[dim] = length - piece.shape[dim]
    return torch.cat([piece, piece.new_zeros(pad_shape)], dim=dim)


class HFCheckpoint:
    """The tensors of an HF model directory, by canonical name, read lazily."""

    def __init__(self, hf_dir: str | Path, family: Family) -> None:
        self.hf_dir = Path(hf_dir)
        self._aliases = [(pattern_regex(alt), canon) for alt, canon in family.hf_aliases.items()]
        self._fused = [(pattern_regex(f.fused), f) for f in family.fused_experts]
        self._mxfp4 = [(pattern_regex(f"{name}_{part}"), name, part)
                       for name in family.mxfp4_tensors for part in ("blocks", "scales")]
        self._sources: dict[str, _Source] = {}
        self.bytes_read = 0
        """Bytes this process has read so far (a rank reads only its slices; MXFP4 tensors count
        at their dequantised size)."""
        files = OpenFiles()
        weakref.finalize(self, files.close)
        quantized: dict[str, dict[str, _Source]] = {}
        for path in weight_files(self.hf_dir):
            for key, tensor in _open(path, files).items():
                source = _Source(path, key, tensor)
                if self._stash_mxfp4(source, quantized):
                    continue
                for name, canonical in self._canonical(source):
                    self._add(name, canonical)
        for name, pair in quantized.items():
            self._add(name, _mxfp4_source(name, pair))

    def names(self) -> list[str]:
        return list(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._sources[name].shape

    def dtype(self, name: str) -> torch.dtype | None:
        return self._sources[name].tensor.dtype

    def where(self, name: str) -> str:
        """`file[on-disk key]` of a canonical tensor, for error messages."""
        return self._sources[name].where

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None
             ) -> torch.Tensor:
        """Rows [start, stop) of `name` along `dim` (whole tensor by default), zero past the end,
        as a new tensor that shares memory with nothing (the loader may adopt its storage)."""
        source = self._sources[name]
        stop = source.shape[dim] if stop is None else stop
        piece = source.read(dim, start, stop)
        if isinstance(source.tensor, torch.Tensor):  # a memory-mapped pickle: copy it out
            piece = piece.clone()
        self.bytes_read += piece.numel() * piece.element_size()
        return _zero_pad(piece, dim, stop - start)

    def total_bytes(self) -> int:
        """Size of every tensor of the checkpoint, in its on-disk dtype."""
        return sum(torch.Size(s.shape).numel() * (s.tensor.dtype.itemsize if s.tensor.dtype else 0)
                   for s in self._sources.values())

    def _stash_mxfp4(self, source: _Source, quantized: dict) -> bool:
        """Keep an MXFP4 `_blocks`/`_scales` tensor for pairing; False if it is not one."""
        for regex, pattern, part in self._mxfp4:
            match = regex.match(source.key)
            if match:
                name = fill(pattern, match.groupdict().get("layer"))
                quantized.setdefault(name, {})[part] = source
                return True
        return False

    def _canonical(self, source: _Source) -> list[tuple[str, _Source]]:
        for regex, canonical in self._aliases:
            match = regex.match(source.key)
            if match:
                groups = match.groupdict()
                return [(fill(canonical, groups.get("layer"), groups.get("expert")), source)]
        for regex, fused in self._fused:
            match = regex.match(source.key)
            if match:
                return self._split_fused(source, fused, match.group("layer"))
        return [(source.key, source)]

    def _split_fused(self, source: _Source, fused, layer: str) -> list[tuple[str, _Source]]:
        shape, num_parts = tuple(source.tensor.shape), len(fused.parts)
        if len(shape) < 2 or shape[1] % num_parts:
            raise ConversionError(source.where, f"fused expert tensor of shape {shape} cannot hold "
                                  f"{num_parts} equal blocks per expert",
                                  "check that config.json matches the weights")
        return [(fill(part, layer, expert),
                 _Source(source.path, source.key, source.tensor, expert, index, num_parts))
                for expert in range(shape[0]) for index, part in enumerate(fused.parts)]

    def _add(self, name: str, source: _Source) -> None:
        if name in self._sources:
            raise ConversionError(source.where, f"holds {name}, which "
                                  f"{self._sources[name].where} already holds",
                                  "keep one copy (per-expert or fused layout, not both)")
        self._sources[name] = source


def _mxfp4_source(name: str, pair: dict[str, _Source]) -> _Source:
    """The dequantising source of one MXFP4 blocks/scales pair (both must be present)."""
    missing = [part for part in ("blocks", "scales") if part not in pair]
    if missing:
        where = next(iter(pair.values())).where
        raise ConversionError(where, f"MXFP4 tensor without its {name}_{missing[0]}",
                              "copy every shard of the checkpoint")
    blocks, scales = pair["blocks"], pair["scales"]
    try:
        tensor = Mxfp4Tensor(blocks.tensor, scales.tensor)
    except ValueError as err:
        raise ConversionError(blocks.where, str(err), "re-download the checkpoint") from None
    return _Source(blocks.path, blocks.key, tensor)


def weight_files(hf_dir: Path) -> list[Path]:
    """The weight files of an HF directory: an index's shards, one file, or all of one kind."""
    for index_name in _INDEXES:
        index = hf_dir / index_name
        if index.is_file():
            return _indexed_files(index)
    for single in _SINGLES:
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    files = sorted(hf_dir.glob("*.safetensors")) or sorted(hf_dir.glob("*.bin"))
    if not files:
        raise ConversionError(str(hf_dir), "no model weights (*.safetensors or *.bin)",
                              "pass the directory save_pretrained wrote")
    return files


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = read_json(index)["weight_map"]
    except TextFileError as err:
        raise ConversionError(err.location, err.problem, "re-save the model or delete the index"
                              ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConversionError(str(index), f"unreadable index ({err})",
                              "re-save the model or delete the index") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise ConversionError(str(path), "listed in the index but missing",
                                  "copy every shard of the checkpoint")
    return files


def _open(path: Path, files: OpenFiles) -> dict[str, object]:
    if path.suffix == ".safetensors":
        return _open_safetensors(path, files)
    return _open_pickle(path)


def _open_safetensors(path: Path, files: OpenFiles) -> dict[str, object]:
    """The tensors of a file, from its header (validated now; the data is read on demand)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            offsets = data_offsets(path)
            return {key: _SafetensorsTensor(files, path, offsets[key][0], handle.get_slice(key))
                    for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - SafetensorError is not importable by name
        raise ConversionError(str(path), f"corrupt safetensors file ({err})",
                              "re-download or re-save it") from None


def _open_pickle(path: Path) -> dict[str, object]:
    """A `.bin` state dict, loaded only as plain tensors (never arbitrary pickled objects)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(str(path), f"not loadable with torch.load(weights_only=True) "
                              f"({first_line})", "convert it to safetensors where you trust "
                              "its origin, or use a safetensors checkpoint") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(str(path), "is not a state dict of tensors",
                              "pass a checkpoint written by save_pretrained")
    return state
