"""Validation during training: the token-weighted loss over every sequence of `data.valid`.

`valid_loss = sum(loss x loss_mask) / sum(loss_mask)` over all validation sequences, i.e. the
same token weighting as the training loss (`training.loop`), computed as if the whole validation
set were one batch. The rows are split over data-parallel ranks by `data.eval_micro_batches`
(every row exactly once, in order; the last global micro-batch is filled with all-padding rows
whose loss mask is zero, so they count for nothing); the two sums are all-reduced over the
data-parallel group.

Evaluation never changes the routing state: the model runs in eval mode under `torch.no_grad()`,
and the routers count usage only in training forwards with grad enabled (`moe.router`), so the
usage accumulators stay untouched and the bias (moved only by `bias_update_step`) cannot move.
The sums stay on the device of the model's outputs until one host read at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ec.data import PackedDataset, eval_micro_batches
from megatron_ec.training.distributed import micro_batch_losses


@dataclass(frozen=True)
class ValidationResult:
    """What one evaluation reports (over all data-parallel ranks)."""

    loss: float
    """Token-weighted mean cross entropy over every loss-mask token of the validation set."""
    tokens: int
    """Loss tokens of the validation set."""

    def record(self) -> dict[str, float | int]:
        """The `metrics.jsonl` fields."""
        return {"valid_loss": self.loss, "valid_tokens": self.tokens}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: PackedDataset, micro_batch_size: int,
             dp_rank: int = 0, dp_size: int = 1, group=None) -> ValidationResult:
    """The validation loss of `model` on `dataset` (collective over the data-parallel group).

    Args:
        model: the (DDP-wrapped) model; returns per-token losses when given labels. Its train/eval
            mode is restored afterwards.
        dataset: the packed validation rows.
        micro_batch_size: rows per forward on each rank.
        dp_rank, dp_size: this rank's place in the data-parallel group.
        group: the data-parallel process group (None: the default group).
    """
    was_training = model.training
    model.eval()
    try:
        sums = None  # [loss x mask, mask] in fp64, on the device of the model's outputs
        for batch in eval_micro_batches(dataset, micro_batch_size, dp_rank, dp_size):
            losses, loss_mask = micro_batch_losses(model, batch)
            micro = torch.stack([(losses.float() * loss_mask).sum().double(),
                                 loss_mask.sum().double()])
            sums = micro if sums is None else sums + micro
    finally:
        model.train(was_training)
    assert sums is not None, "eval_micro_batches yields at least one micro-batch per rank"
    if dist.is_initialized() and dp_size > 1:
        dist.all_reduce(sums, group=group)
    loss_sum, tokens = sums.tolist()
    return ValidationResult(loss=loss_sum / max(tokens, 1.0), tokens=int(tokens))
