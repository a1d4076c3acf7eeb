"""The converter's pread reader returns exactly `tensor[index]` for every slice pattern the
loader uses (whole rows, column pieces, a fused expert's block), with and without row buffering;
the save's zero-copy alias of a view holds the view's bytes in a storage of its own size."""

from __future__ import annotations

import io
import itertools

import torch
from safetensors.torch import save_file

from checkpoint_convert import tensor_io
from checkpoint_convert.tensor_io import OpenFiles, data_offsets, read_selection
from megatron_ec.models.dist_ckpt import exact_storage


def test_every_selection_matches_slicing(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    tensors = {"experts": torch.randn(4, 6, 5, generator=gen).bfloat16(),
               "matrix": torch.randn(7, 3, generator=gen),
               "vector": torch.arange(9, dtype=torch.int64), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    offsets, files = data_offsets(path), OpenFiles()
    cuts = [slice(None), slice(1, 3), slice(2, 2), slice(0, 1), slice(1, 99)]
    for row_buffer in (tensor_io.ROW_BUFFER_BYTES, 24, 1):  # buffered, several chunks, per row
        monkeypatch.setattr(tensor_io, "ROW_BUFFER_BYTES", row_buffer)
        for name, tensor in tensors.items():
            for index in itertools.product(cuts, repeat=tensor.dim()):
                got = read_selection(files.fd(path), offsets[name][0], tuple(tensor.shape),
                                     tensor.dtype, index)
                assert torch.equal(got, tensor[index]), (name, index, row_buffer)
    files.close()


def test_exact_storage_aliases_without_copy():
    param = torch.randn(8, 4).bfloat16()
    half = param[2:6]
    alias = exact_storage(half)
    assert alias.data_ptr() == half.data_ptr()
    assert alias.untyped_storage().nbytes() == half.numel() * half.element_size()
    saved, reference = io.BytesIO(), io.BytesIO()
    torch.save(alias, saved)
    torch.save(half.clone(), reference)
    assert saved.getvalue() == reference.getvalue()
    assert exact_storage(param) is param  # owns its storage already
