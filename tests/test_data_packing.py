"""Packing, padding mode, truncation and the batch contract."""

import logging

import numpy as np
import pytest
import torch
from tests.data_testing import alpaca_records, char_tokenizer, write_jsonl

from megatron_ec.data import BATCH_KEYS, ChatEncoder, DataConfig, build_sft_dataset, collate
from megatron_ec.data.formats import to_conversation
from megatron_ec.data.packing import pack_best_fit
from megatron_ec.data.readers import read_records
from megatron_ec.data.templates import BUILTIN_TEMPLATES

SEQ_LENGTH = 400  # An alpaca sample of the char tokenizer is ~150 tokens: 2 fit per row.


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    records = alpaca_records(7)
    records[3]["output"] = "a much longer answer " * 4 + "7"
    return write_jsonl(str(tmp_path_factory.mktemp("data") / "train.jsonl"), records)


def _build(data_file, tokenizer, **overrides):
    cfg = DataConfig(train=data_file, **{"seq_length": SEQ_LENGTH, **overrides})
    return build_sft_dataset(cfg, tokenizer, vocab_size=len(tokenizer))


def _encoded_samples(data_file, tokenizer):
    """Each sample's (ids, mask), built directly with the encoder, not via the dataset."""
    encoder = ChatEncoder(tokenizer, BUILTIN_TEMPLATES["alpaca"])
    records = read_records(data_file)
    return [encoder.encode(to_conversation(record, "auto", ())) for record in records]


def _expected_row(samples, sample_ids, pad_id):
    """tokens, loss_mask, position_ids, attention_mask (True = masked) of one packed row."""
    tokens = np.full(SEQ_LENGTH, pad_id)
    loss_mask = np.zeros(SEQ_LENGTH, np.float32)
    positions = np.zeros(SEQ_LENGTH, np.int64)
    allowed = np.eye(SEQ_LENGTH, dtype=bool)
    start = 0
    for sample_id in sample_ids:
        ids, mask = samples[sample_id].token_ids, samples[sample_id].assistant_mask
        stop = start + len(ids)
        tokens[start:stop], positions[start:stop] = ids, np.arange(len(ids))
        loss_mask[start:stop - 1] = mask[1:]  # Position t predicts token t+1 of the same sample.
        allowed[start:stop, start:stop] = np.tril(np.ones((len(ids), len(ids)), bool))
        start = stop
    return tokens, loss_mask, positions, ~allowed


def test_best_fit_places_every_sample_once_within_capacity():
    lengths = np.array([5, 9, 3, 7, 10, 1, 4, 6])
    rows = pack_best_fit(lengths, capacity=10)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
    assert all(lengths[row].sum() <= 10 for row in rows)
    assert len(rows) == 5  # ceil(45 / 10) rows: the packing is tight.


def test_packed_rows_match_independent_construction(data_file, chars):
    dataset = _build(data_file, chars)
    samples = _encoded_samples(data_file, chars)
    assert len(dataset) < len(samples), "several samples must share a row"
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert set(batch) == set(BATCH_KEYS)
    for row in range(len(dataset)):
        tokens, loss_mask, positions, masked = _expected_row(
            samples, dataset.samples_in_row(row), dataset.pad_id)
        np.testing.assert_array_equal(batch["tokens"][row].numpy(), tokens)
        np.testing.assert_array_equal(batch["labels"][row, :-1].numpy(), tokens[1:])
        np.testing.assert_array_equal(batch["loss_mask"][row].numpy(), loss_mask)
        np.testing.assert_array_equal(batch["position_ids"][row].numpy(), positions)
        np.testing.assert_array_equal(batch["attention_mask"][row, 0].numpy(), masked)
        np.testing.assert_array_equal(batch["padding_mask"][row].numpy(), _expected_padding(
            samples, dataset.samples_in_row(row)))


def _expected_padding(samples, sample_ids):
    used = sum(len(samples[i].token_ids) for i in sample_ids)
    return np.arange(SEQ_LENGTH) >= used


def test_batch_dtypes_and_shapes(data_file, chars):
    dataset = _build(data_file, chars)
    batch = collate([dataset[0], dataset[1]])
    expected = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                "position_ids": torch.int64, "attention_mask": torch.bool,
                "padding_mask": torch.bool}
    assert {key: value.dtype for key, value in batch.items()} == expected
    assert batch["attention_mask"].shape == (2, 1, SEQ_LENGTH, SEQ_LENGTH)
    assert all(batch[key].shape == (2, SEQ_LENGTH) for key in expected if key != "attention_mask")


def test_packed_samples_do_not_see_each_other(data_file, chars):
    """Attention outputs of a packed sample do not change when its neighbours change."""
    dataset = _build(data_file, chars)
    row = next(i for i in range(len(dataset)) if len(dataset.samples_in_row(i)) >= 2)
    batch = collate([dataset[row]])
    first_length = int((batch["position_ids"][0, 1:] == 0).nonzero()[0]) + 1
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1, 1, SEQ_LENGTH, 8, generator=generator)
    changed = values.clone()
    changed[..., first_length:, :] = torch.randn(changed[..., first_length:, :].shape)
    allowed = ~batch["attention_mask"]
    attention = torch.nn.functional.scaled_dot_product_attention
    out = attention(values, values, values, allowed)
    out_changed = attention(changed, changed, changed, allowed)
    torch.testing.assert_close(out[..., :first_length, :], out_changed[..., :first_length, :])
    assert not torch.isnan(out).any(), "padding rows must keep their diagonal"


def test_padding_mode_puts_one_sample_per_row(data_file, chars):
    dataset = _build(data_file, chars, packing=False)
    samples = _encoded_samples(data_file, chars)
    assert len(dataset) == len(samples)
    batch = collate([dataset[i] for i in range(len(dataset))])
    for row, sample in enumerate(samples):
        length = len(sample.token_ids)
        assert dataset.samples_in_row(row) == [row]
        expected_padding = [False] * length + [True] * (SEQ_LENGTH - length)
        assert batch["padding_mask"][row].tolist() == expected_padding
        assert batch["loss_mask"][row, length - 1:].sum() == 0
        masked = batch["attention_mask"][row, 0]
        assert masked[length:, :].logical_not().sum() == SEQ_LENGTH - length  # Only diagonal.
        assert masked[:length, length:].all()


def test_right_truncation_keeps_the_first_tokens(data_file, chars):
    samples = _encoded_samples(data_file, chars)
    longest = max(range(len(samples)), key=lambda i: len(samples[i].token_ids))
    seq_length = len(samples[longest].token_ids) - 5
    dataset = build_sft_dataset(DataConfig(train=data_file, seq_length=seq_length, packing=False),
                                chars, len(chars))
    assert dataset.selection.num_truncated == 1
    np.testing.assert_array_equal(dataset[longest]["tokens"].numpy(),
                                  samples[longest].token_ids[:seq_length])


def test_drop_truncation_drops_long_samples_with_one_warning(data_file, chars, caplog):
    samples = _encoded_samples(data_file, chars)
    seq_length = max(len(sample.token_ids) for sample in samples) - 1
    cfg = DataConfig(train=data_file, seq_length=seq_length, truncation="drop")
    with caplog.at_level(logging.WARNING, logger="megatron_ec.data"):
        dataset = build_sft_dataset(cfg, chars, len(chars))
    assert dataset.num_samples == len(samples) - 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("Dropped 1 samples")
