"""Assigning samples to training sequences (rows).

Packing uses best-fit decreasing: samples are placed longest first, each into the row whose free
space fits it most tightly (a new row when none fits). It is deterministic (ties broken by sample
order), fills rows well, and does not depend on the seed: shuffling happens later, over rows.
"""

from __future__ import annotations

import bisect

import numpy as np


def pack_best_fit(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Groups samples into rows of at most ``capacity`` tokens.

    Args:
        lengths: int ``[num_samples]``, each ``<= capacity``.
        capacity: tokens per row.

    Returns:
        One int64 array of sample positions (indices into ``lengths``) per row, each in
        ascending order.
    """
    assert int(lengths.max(initial=0)) <= capacity, "samples must be truncated before packing"
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free_rows: list[tuple[int, int]] = []  # (free tokens, row index), sorted.
    for position in order.tolist():
        length = int(lengths[position])
        slot = bisect.bisect_left(free_rows, (length, -1))
        if slot < len(free_rows):
            free, row = free_rows.pop(slot)
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(position)
        if free > length:
            bisect.insort(free_rows, (free - length, row))
    return [np.sort(np.asarray(row, dtype=np.int64)) for row in rows]


def one_per_row(num_samples: int) -> list[np.ndarray]:
    """Padding mode: every sample gets a row of its own."""
    return [np.asarray([position], dtype=np.int64) for position in range(num_samples)]
