"""The tokenised corpus: every sample of a split, as flat arrays.

Samples are stored back to back (``token_ids``, ``assistant_mask``) with ``offsets`` marking
where each starts, so the corpus can be cached as three arrays and sliced without copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

import numpy as np

from megatron_ec.data.encoding import ChatEncoder, EncodedSample
from megatron_ec.data.errors import DataError
from megatron_ec.data.formats import to_conversation
from megatron_ec.data.readers import read_records


@dataclasses.dataclass(frozen=True)
class EncodedCorpus:
    """All tokenised samples of a split, untruncated."""

    token_ids: np.ndarray
    """int32 ``[total_tokens]``: the samples' tokens, back to back."""

    assistant_mask: np.ndarray
    """bool ``[total_tokens]``: True on assistant tokens."""

    offsets: np.ndarray
    """int64 ``[num_samples + 1]``: sample ``i`` is ``token_ids[offsets[i]:offsets[i+1]]``."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``[num_samples]``: tokens per sample."""
        return np.diff(self.offsets)

    def sample(self, index: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and assistant mask of one sample, optionally cut to its first ``length``."""
        start = self.offsets[index]
        stop = self.offsets[index + 1] if length is None else start + length
        return self.token_ids[start:stop], self.assistant_mask[start:stop]


def encode_files(paths: Sequence[str], encoder: ChatEncoder, data_format: str,
                 ignore_keys: Collection[str], vocab_size: int) -> EncodedCorpus:
    """Reads, converts and tokenises every record of the given files, in order.

    Args:
        paths: data files or ``save_to_disk`` folders.
        encoder: renders and tokenises conversations.
        data_format: ``DataConfig.format``.
        ignore_keys: ``DataConfig.ignore_keys``.
        vocab_size: the model's vocabulary size; every token id must be below it.

    Raises:
        DataError: a record is malformed or tokenises to an id the model does not have.
    """
    samples = []
    for path in paths:
        for record in read_records(path):
            conversation = to_conversation(record, data_format, ignore_keys)
            sample = encoder.encode(conversation, record.location)
            _check_vocab(sample, vocab_size, len(encoder.tokenizer), record.location)
            samples.append(sample)
    return _concatenate(samples)


def _check_vocab(sample: EncodedSample, vocab_size: int, tokenizer_size: int,
                 location: str) -> None:
    largest = int(sample.token_ids.max(initial=-1))
    if largest >= vocab_size:
        raise DataError(
            location,
            f"token id {largest} is outside the model's vocabulary (model vocab_size="
            f"{vocab_size}, tokenizer size={tokenizer_size})",
            "use the tokenizer that belongs to the model, or pass the model's vocab_size",
        )


def _concatenate(samples: list[EncodedSample]) -> EncodedCorpus:
    lengths = [len(sample.token_ids) for sample in samples]
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if not samples:
        return EncodedCorpus(np.zeros(0, np.int32), np.zeros(0, bool), offsets)
    token_ids = np.concatenate([sample.token_ids for sample in samples]).astype(np.int32)
    assistant_mask = np.concatenate([sample.assistant_mask for sample in samples])
    return EncodedCorpus(token_ids, assistant_mask, offsets)
