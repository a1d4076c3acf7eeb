"""The packed SFT dataset and its builder."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from megatron_ec.data import cache
from megatron_ec.data.config import DataConfig
from megatron_ec.data.corpus import EncodedCorpus, encode_files
from megatron_ec.data.encoding import ChatEncoder
from megatron_ec.data.errors import DataError
from megatron_ec.data.packing import one_per_row, pack_best_fit
from megatron_ec.data.selection import Selection, select_samples
from megatron_ec.data.templates import resolve_chat_template

logger = logging.getLogger(__name__)


class PackedDataset:
    """Training sequences ("rows") of ``seq_length`` tokens, each holding one or more samples.

    ``dataset[i]`` gives row ``i`` as ``[s]`` tensors: ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids`` and ``segment_ids`` (index of the sample within the row, -1 on padding);
    ``batch.collate`` turns a list of rows into the batch contract.

    Args:
        corpus: the tokenised samples.
        selection: which samples are used, and their (truncated) lengths.
        rows: per row, positions into ``selection`` of the samples it holds, in order.
        seq_length: tokens per row.
        pad_id: token id written into padding (any id the model has).
    """

    def __init__(self, corpus: EncodedCorpus, selection: Selection, rows: list[np.ndarray],
                 seq_length: int, pad_id: int):
        self.corpus = corpus
        self.selection = selection
        self.seq_length = seq_length
        self.pad_id = pad_id
        self._row_offsets = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
        self._row_members = np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._row_offsets) - 1

    @property
    def num_samples(self) -> int:
        """Samples used for training (after truncation and drops)."""
        return len(self.selection.sample_ids)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens over all rows."""
        return int(self.selection.lengths.sum())

    def samples_in_row(self, index: int) -> list[int]:
        """Corpus indices of the samples in row ``index``, in row order."""
        members = self._row_members[self._row_offsets[index]:self._row_offsets[index + 1]]
        return self.selection.sample_ids[members].tolist()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        tokens = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        segment_ids = np.full(self.seq_length, -1, dtype=np.int64)
        position_ids = np.zeros(self.seq_length, dtype=np.int64)
        assistant = np.zeros(self.seq_length, dtype=bool)
        cursor = 0
        members = self._row_members[self._row_offsets[index]:self._row_offsets[index + 1]]
        for segment, member in enumerate(members.tolist()):
            length = int(self.selection.lengths[member])
            ids, mask = self.corpus.sample(int(self.selection.sample_ids[member]), length)
            span = slice(cursor, cursor + length)
            tokens[span], assistant[span], segment_ids[span] = ids, mask, segment
            position_ids[span] = np.arange(length)
            cursor += length
        return _with_targets(tokens, assistant, segment_ids, position_ids, self.pad_id)


def _with_targets(tokens: np.ndarray, assistant: np.ndarray, segment_ids: np.ndarray,
                  position_ids: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Adds next-token labels and the loss mask (targets inside the same sample only)."""
    labels = np.full_like(tokens, pad_id)
    labels[:-1] = tokens[1:]
    same_sample = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] >= 0)
    loss_mask = np.zeros(len(tokens), dtype=np.float32)
    loss_mask[:-1] = assistant[1:] & same_sample
    arrays = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
              "position_ids": position_ids, "segment_ids": segment_ids}
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def build_sft_dataset(cfg: DataConfig, tokenizer: Any, vocab_size: int, split: str = "train",
                      output_dir: str | None = None) -> PackedDataset:
    """Reads, tokenises (or loads from cache), truncates and packs one split.

    Args:
        cfg: the data config.
        tokenizer: the model's Hugging Face tokenizer (see ``encoding.load_tokenizer``).
        vocab_size: the model's vocabulary size (may exceed ``len(tokenizer)`` when padded).
        split: ``"train"`` or ``"valid"``.
        output_dir: the run's output folder; the cache goes to ``<output_dir>/data_cache`` unless
            ``cfg.cache_dir`` is set. With neither, nothing is cached.

    Raises:
        DataError: bad records, token ids outside the vocabulary, or nothing left to train on.
        ValueError: ``split`` is unknown or not configured.
    """
    paths = _split_paths(cfg, split)
    template = resolve_chat_template(tokenizer, cfg.chat_template, cfg.fallback_template)
    cache_dir = cfg.cache_dir or (os.path.join(output_dir, "data_cache") if output_dir else None)
    corpus = _load_or_encode(paths, ChatEncoder(tokenizer, template), cfg, vocab_size, cache_dir)
    source = ", ".join(paths)
    selection = select_samples(corpus, cfg.seq_length, cfg.truncation, source)
    if not len(selection.sample_ids):
        raise DataError(
            source,
            f"no sample left to {'validate' if split == 'valid' else 'train'} on "
            f"({len(corpus)} read; dropped: "
            f"{selection.num_too_long} too long, {selection.num_no_target} without answer tokens)",
            "check the records' format and answers, and DataConfig.seq_length/truncation",
        )
    lengths = selection.lengths
    rows = pack_best_fit(lengths, cfg.seq_length) if cfg.packing else one_per_row(len(lengths))
    dataset = PackedDataset(corpus, selection, rows, cfg.seq_length, _pad_id(tokenizer, vocab_size))
    logger.info(
        "%s split: %d samples in %d rows of %d tokens (%.1f%% filled, %d truncated)",
        split, dataset.num_samples, len(dataset), cfg.seq_length,
        100.0 * dataset.num_tokens / (len(dataset) * cfg.seq_length), selection.num_truncated,
    )
    return dataset


def _split_paths(cfg: DataConfig, split: str) -> tuple[str, ...]:
    paths = {"train": cfg.train, "valid": cfg.valid}
    if split not in paths:
        raise ValueError(f"split={split!r} is not supported; use 'train' or 'valid'")
    if paths[split] is None:
        raise ValueError(f"split={split!r} requested but DataConfig.{split} is not set; set it")
    return paths[split]


def _load_or_encode(paths: tuple[str, ...], encoder: ChatEncoder, cfg: DataConfig,
                    vocab_size: int, cache_dir: str | None) -> EncodedCorpus:
    """The tokenised corpus, from the cache when an entry with the same key exists."""
    if cache_dir is None:
        return encode_files(paths, encoder, cfg.format, cfg.ignore_keys, vocab_size)
    settings = {"format": cfg.format, "ignore_keys": sorted(cfg.ignore_keys),
                "template": encoder.template, "vocab_size": vocab_size}
    for path in paths:
        _require_exists(path)
    key = cache.corpus_key(paths, encoder.tokenizer, settings)
    corpus = cache.load_corpus(cache_dir, key)
    if corpus is None:
        corpus = encode_files(paths, encoder, cfg.format, cfg.ignore_keys, vocab_size)
        cache.save_corpus(cache_dir, key, corpus)
    return corpus


def _require_exists(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(path, "no such file or folder", "fix the path in DataConfig")


def _pad_id(tokenizer: Any, vocab_size: int) -> int:
    """The tokenizer's pad id, else its EOS id, else 0: the first that the model has."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None and 0 <= candidate < vocab_size:
            return int(candidate)
    return 0
