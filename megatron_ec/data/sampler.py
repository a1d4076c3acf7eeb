"""Deterministic, resumable, data-parallel sampling of micro-batches.

Epoch ``e`` visits the rows of a ``PackedDataset`` in the order
``numpy.random.default_rng([seed, e]).permutation(num_rows)`` (row order if ``shuffle`` is off).
The order is consumed in *global micro-batches* of ``micro_batch_size * dp_size`` rows;
data-parallel rank ``r`` takes rows ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of
each, so the ranks' slices are disjoint and together cover the global micro-batch. An epoch
ends at the last whole ``global_batch_size`` (the trainer's optimizer-step batch; the global
micro-batch when not given): the tail is skipped (drop-last), so every rank always gets a full
micro-batch in lockstep and no step straddles two epochs.

Because epochs are cut in global batches, which do not depend on the data-parallel size, every
data-parallel layout with the same global batch size sees the same rows in every optimizer step
(split differently into micro-batches), and a state saved at one layout resumes at another.

The state (epoch, rows consumed in the epoch) is the same on every rank, so any rank may save it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megatron_ec.data.batch import collate
from megatron_ec.data.dataset import PackedDataset


class BatchSampler:
    """Yields this rank's micro-batches, forever, in a seed-determined order.

    Args:
        dataset: the packed rows.
        micro_batch_size: rows per micro-batch on one rank (``b`` of the batch contract).
        dp_rank: this rank's index in the data-parallel group.
        dp_size: the data-parallel world size.
        seed: seed of the per-epoch shuffle (``DataConfig.seed``).
        shuffle: shuffle each epoch (``DataConfig.shuffle``); False keeps row order.
        global_batch_size: rows per optimizer step over all ranks, a multiple of
            ``micro_batch_size * dp_size``; epochs are cut in whole global batches. None: one
            global micro-batch.

    Raises:
        ValueError: bad sizes, or fewer rows than one global batch.
    """

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 global_batch_size: int | None = None):
        _check_layout(micro_batch_size, dp_rank, dp_size)
        global_batch_size = global_batch_size or micro_batch_size * dp_size
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of "
                             f"micro_batch_size x dp_size = {micro_batch_size * dp_size}")
        _check_enough_rows(len(dataset), global_batch_size, micro_batch_size, dp_size)
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.rows_per_epoch = len(dataset) // global_batch_size * global_batch_size
        """Rows visited per epoch: the whole global batches."""
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    @property
    def global_micro_batch_size(self) -> int:
        """Rows consumed over all data-parallel ranks per micro-batch."""
        return self.micro_batch_size * self.dp_size

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches each rank gets per epoch."""
        return self.rows_per_epoch // self.global_micro_batch_size

    def next_row_indices(self) -> list[int]:
        """Advances by one global micro-batch and returns this rank's row indices."""
        if self.position + self.global_micro_batch_size > self.rows_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        start = self.position + self.dp_rank * self.micro_batch_size
        self.position += self.global_micro_batch_size
        return self._order[start:start + self.micro_batch_size].tolist()

    def next_micro_batch(self) -> dict[str, torch.Tensor]:
        """Returns this rank's next micro-batch, in the batch contract of ``batch.collate``."""
        return collate([self.dataset[index] for index in self.next_row_indices()])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_micro_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is, plus what must match on resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a saved state, so the following micro-batches are the ones that would
        have followed in the saved run (at any data-parallel layout, when the global batch
        size is the same).

        Raises:
            ValueError: the data or the shuffle settings differ from the saved run.
        """
        for key in ("seed", "shuffle", "num_rows"):
            current = self.state_dict()[key]
            if state[key] != current:
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this run has {current!r}; "
                    "resume with the same data, DataConfig and seed, or start a fresh run"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))


def eval_micro_batches(dataset: PackedDataset, micro_batch_size: int, dp_rank: int = 0,
                       dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Every row exactly once, in order, split over data-parallel ranks like ``BatchSampler``.

    The last global micro-batch is filled up with all-padding rows (zero loss mask), so every
    rank yields the same number of micro-batches.
    """
    _check_layout(micro_batch_size, dp_rank, dp_size)
    global_size = micro_batch_size * dp_size
    for step_start in range(0, len(dataset), global_size):
        start = step_start + dp_rank * micro_batch_size
        indices = range(start, start + micro_batch_size)
        yield collate([dataset[i] if i < len(dataset) else _padding_row(dataset) for i in indices])


def _padding_row(dataset: PackedDataset) -> dict[str, torch.Tensor]:
    length = dataset.seq_length
    return {
        "tokens": torch.full((length,), dataset.pad_id, dtype=torch.int64),
        "labels": torch.full((length,), dataset.pad_id, dtype=torch.int64),
        "loss_mask": torch.zeros(length, dtype=torch.float32),
        "position_ids": torch.zeros(length, dtype=torch.int64),
        "segment_ids": torch.full((length,), -1, dtype=torch.int64),
    }


def _check_layout(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(
            f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}: "
            "need micro_batch_size >= 1 and 0 <= dp_rank < dp_size"
        )


def _check_enough_rows(num_rows: int, global_batch_size: int, micro_batch_size: int,
                       dp_size: int) -> None:
    if num_rows < global_batch_size:
        raise ValueError(
            f"only {num_rows} sequences for a global batch of {global_batch_size} "
            f"(micro-batches of {micro_batch_size} x {dp_size} ranks); add data, lower "
            "global_batch_size, micro_batch_size or the "
            "data-parallel size, or use a shorter seq_length / packing=False for more sequences"
        )
