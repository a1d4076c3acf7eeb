"""Truncation policy and the removal of samples that have nothing to train on."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from megatron_ec.data.corpus import EncodedCorpus

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The samples kept for training and how many were cut or dropped."""

    sample_ids: np.ndarray
    """int64 ``[num_kept]``: indices into the corpus, in corpus order."""

    lengths: np.ndarray
    """int64 ``[num_kept]``: tokens used of each kept sample (after truncation)."""

    num_truncated: int
    """Kept samples cut to ``seq_length`` (policy ``"right"``)."""

    num_too_long: int
    """Samples dropped for being longer than ``seq_length`` (policy ``"drop"``)."""

    num_no_target: int
    """Samples dropped because no assistant token is left to predict after truncation."""


def select_samples(corpus: EncodedCorpus, seq_length: int, truncation: str,
                   source: str) -> Selection:
    """Applies the truncation policy and drops samples without trainable tokens.

    A sample is trainable when some token after its first is an assistant token (the first
    token of a sample is never a target). Each kind of drop is reported in one warning.

    Args:
        corpus: the tokenised samples.
        seq_length: the maximum tokens per sample.
        truncation: ``"right"`` (keep the first ``seq_length`` tokens) or ``"drop"``.
        source: names the data in the warnings (e.g. the file list).
    """
    full_lengths = corpus.lengths
    too_long = full_lengths > seq_length
    if truncation == "drop":
        keep = ~too_long
    else:
        keep = np.ones(len(corpus), dtype=bool)
    lengths = np.minimum(full_lengths, seq_length)
    trainable = _has_targets(corpus, lengths)
    num_no_target = int(np.count_nonzero(keep & ~trainable))
    keep &= trainable
    num_too_long = int(np.count_nonzero(too_long)) if truncation == "drop" else 0
    _warn_drops(num_too_long, num_no_target, seq_length, source)
    return Selection(
        sample_ids=np.flatnonzero(keep),
        lengths=lengths[keep],
        num_truncated=int(np.count_nonzero(too_long & keep)),
        num_too_long=num_too_long,
        num_no_target=num_no_target,
    )


def _has_targets(corpus: EncodedCorpus, lengths: np.ndarray) -> np.ndarray:
    """Per sample, whether any assistant token is at positions ``1 .. length-1``."""
    # Cumulative count of assistant tokens lets every sample be checked without a loop.
    counts = np.concatenate([[0], np.cumsum(corpus.assistant_mask, dtype=np.int64)])
    first = corpus.offsets[:-1] + 1
    stop = corpus.offsets[:-1] + lengths
    return counts[np.maximum(stop, first)] - counts[first] > 0


def _warn_drops(num_too_long: int, num_no_target: int, seq_length: int, source: str) -> None:
    if num_too_long:
        logger.warning(
            "Dropped %d samples of %s longer than seq_length=%d (truncation='drop'); "
            "use truncation='right' or a larger seq_length to keep them",
            num_too_long, source, seq_length,
        )
    if num_no_target:
        logger.warning(
            "Dropped %d samples of %s with no assistant tokens to train on within "
            "seq_length=%d (empty answers, or prompts filling the whole sequence)",
            num_no_target, source, seq_length,
        )
