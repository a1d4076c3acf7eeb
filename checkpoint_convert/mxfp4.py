"""MXFP4 expert tensors (GPT-OSS hub checkpoints) dequantised on import.

On disk a quantised weight `W` of logical shape `[E, cols, rows]` (GPT-OSS's in-memory layout,
e.g. `gate_up_proj [E, H, 2I]`) is stored transposed and packed, per expert and output row:
- `<name>_blocks [E, rows, cols / 32, 16]` uint8: 32 FP4 (e2m1) codes per block, two per byte,
  the LOW nibble first (element 2j is `byte & 0xF`, element 2j + 1 is `byte >> 4`);
- `<name>_scales [E, rows, cols / 32]` uint8: one shared power of two per block, biased by 127
  (the OCP MX E8M0 scale).
An element is `FP4[code] * 2 ** (scale - 127)`. Every such value is exactly representable in
bf16 and fp32 (at most two significant bits, exponents within both formats' range; the largest
code at scale 255 overflows to inf in both), so dequantising is exact.

Export never writes MXFP4: fine-tuned weights are not on the FP4 grid, and requantising them is a
lossy choice (rounding mode, scale selection) that belongs to a deployment tool, not to a
converter whose contract is "what you trained is what you get".

Shape legend: E experts, R output rows, G blocks per row, B = 16 bytes per block.
"""

from __future__ import annotations

import torch

BLOCK = 32
"""FP4 elements per shared scale."""
SCALE_BIAS = 127
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The 16 FP4 e2m1 codes: bit 3 is the sign, bits 0-2 index the magnitudes."""


def dequantize(blocks_ERGB: torch.Tensor, scales_ERG: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`[E, R, G, B]` blocks and `[E, R, G]` scales -> the logical `[E, G * B * 2, R]` tensor.

    Raises:
        ValueError: the shapes or dtypes are not an MXFP4 pair.
    """
    if blocks_ERGB.dtype != torch.uint8 or scales_ERG.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks_ERGB.dtype} and "
                         f"{scales_ERG.dtype}")
    if blocks_ERGB.dim() != 4 or tuple(blocks_ERGB.shape[:-1]) != tuple(scales_ERG.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks_ERGB.shape)} do not match scales "
                         f"{tuple(scales_ERG.shape)} (want [E, R, G, 16] and [E, R, G])")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks_ERGB.device)
    codes = torch.stack([blocks_ERGB & 0x0F, blocks_ERGB >> 4], dim=-1).long()  # [E, R, G, B, 2]
    values = table[codes].flatten(-3)  # [E, R, G * B * 2]: each block's 32 elements in order
    exponents = (scales_ERG.to(torch.int32) - SCALE_BIAS).repeat_interleave(BLOCK, dim=-1)
    return torch.ldexp(values, exponents.float()).to(dtype).transpose(1, 2).contiguous()


class Mxfp4Tensor:
    """A lazy `[E, cols, rows]` view of an on-disk blocks/scales pair; indexing reads and
    dequantises only the experts selected on dim 0 (the converter reads one expert at a time)."""

    def __init__(self, blocks, scales, dtype: torch.dtype = torch.bfloat16) -> None:
        """Args:
            blocks, scales: tensors or lazy on-disk tensors (shape, dtype, `[index]` reads).
            dtype: the dequantised dtype (exact in bf16 and fp32).
        """
        num_experts, rows, groups, width = tuple(blocks.shape)
        if tuple(scales.shape) != (num_experts, rows, groups) or width * 2 != BLOCK:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales "
                             f"{tuple(scales.shape)} (want [E, R, G, 16] and [E, R, G])")
        self._blocks, self._scales = blocks, scales
        self.shape = (num_experts, groups * BLOCK, rows)
        self.dtype = dtype

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        experts, rest = index[0], index[1:]
        if not isinstance(experts, slice):
            raise TypeError("Mxfp4Tensor is indexed with a slice on the expert dim")
        full = dequantize(self._blocks[experts], self._scales[experts], self.dtype)
        return full[(slice(None), *rest)]
