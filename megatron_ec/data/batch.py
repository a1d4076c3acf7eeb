"""The batch contract: turning rows into the micro-batch the trainer consumes.

Shapes: ``b`` sequences (rows) of ``s`` tokens. Every tensor is on the CPU.

=================  ===============  =====================================================
key                shape, dtype     meaning
=================  ===============  =====================================================
``tokens``         [b, s] int64     input token ids; padding holds the pad id
``labels``         [b, s] int64     next-token targets: ``labels[:, t] = tokens[:, t+1]``;
                                    the last position and padding hold the pad id
``loss_mask``      [b, s] float32   1 where ``labels[:, t]`` is an assistant token of the
                                    same sample as ``tokens[:, t]``, else 0
``position_ids``   [b, s] int64     0, 1, ... restarting for each packed sample; 0 on padding
``attention_mask`` [b, 1, s, s]     **True = masked out** (Megatron convention): a query may
                   bool             attend to keys at or before it in the same sample only.
                                    Padding queries see only themselves (so no softmax row is
                                    fully masked) and padding keys are hidden from real
                                    tokens.
``padding_mask``   [b, s] bool      **True = padding token** (MCore's MoE router convention)
=================  ===============  =====================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask", "padding_mask")


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks rows from ``PackedDataset.__getitem__`` into the batch contract above.

    Args:
        rows: per-row dicts with ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (``[s]``)
            and ``segment_ids`` (``[s]`` int64: the sample's index within its row, -1 on padding).
    """
    stacked = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    segment_ids = stacked.pop("segment_ids")
    stacked["attention_mask"] = attention_mask_from_segments(segment_ids)
    stacked["padding_mask"] = segment_ids < 0
    return stacked


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal, block-diagonal attention mask, True = masked out.

    Args:
        segment_ids: int ``[b, s]``, the packed sample each token belongs to, -1 on padding.

    Returns:
        bool ``[b, 1, s, s]`` (query, key).
    """
    seq_length = segment_ids.shape[1]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    same_sample = segment_ids[:, :, None] == segment_ids[:, None, :]
    is_real = (segment_ids >= 0)[:, :, None]
    allowed = causal & same_sample & is_real
    allowed |= torch.eye(seq_length, dtype=torch.bool)
    return (~allowed).unsqueeze(1)
