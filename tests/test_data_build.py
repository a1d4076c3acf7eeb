"""build_sft_dataset: errors, drops, the tokenisation cache and non-JSONL inputs."""

import dataclasses
import logging
import os

import numpy as np
import pytest
import torch
from tests.data_testing import alpaca_records, char_tokenizer, write_jsonl

from megatron_ec.data import DataConfig, DataError, build_sft_dataset


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(str(tmp_path / "train.jsonl"), alpaca_records(6))


def _rows(dataset):
    return [dataset[i] for i in range(len(dataset))]


def _assert_same_rows(first, second):
    assert len(first) == len(second)
    for row_a, row_b in zip(_rows(first), _rows(second), strict=True):
        assert all(torch.equal(row_a[key], row_b[key]) for key in row_a)


def test_malformed_line_fails_the_build_with_file_and_line(tmp_path, chars):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON .*; fix or remove the line$"):
        build_sft_dataset(DataConfig(train=str(path)), chars, len(chars))


def test_samples_without_trainable_tokens_are_dropped_with_one_warning(tmp_path, chars, caplog):
    records = alpaca_records(4)
    records[1]["instruction"] = records[2]["instruction"] = "x" * 300  # Prompt fills the sequence.
    path = write_jsonl(str(tmp_path / "train.jsonl"), records)
    with caplog.at_level(logging.WARNING, logger="megatron_ec.data"):
        dataset = build_sft_dataset(DataConfig(train=path, seq_length=256), chars, len(chars))
    assert dataset.num_samples == 2 and dataset.selection.num_no_target == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("Dropped 2 samples")


def test_nothing_left_to_train_on_is_an_error(data_file, chars):
    with pytest.raises(DataError, match=r"no sample left to train on \(6 read; .*6 without answer"):
        build_sft_dataset(DataConfig(train=data_file, seq_length=20), chars, len(chars))


def test_token_ids_beyond_the_model_vocabulary_name_the_sample(data_file, chars):
    with pytest.raises(DataError) as error:
        build_sft_dataset(DataConfig(train=data_file), chars, vocab_size=50)
    message = str(error.value)
    assert message.startswith(f"{data_file}:1: token id ")
    assert "model vocab_size=50, tokenizer size=101" in message


def test_second_build_loads_the_cache_without_tokenising(data_file, chars, tmp_path, monkeypatch):
    cfg = DataConfig(train=data_file, seq_length=300, cache_dir=str(tmp_path / "cache"))
    first = build_sft_dataset(cfg, chars, len(chars))
    assert [name for name in os.listdir(tmp_path / "cache") if not name.endswith(".npz")] == []

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was called on a cache hit")

    monkeypatch.setattr(type(chars), "__call__", refuse)
    monkeypatch.setattr(type(chars), "apply_chat_template", refuse)
    _assert_same_rows(first, build_sft_dataset(cfg, chars, len(chars)))


def test_cache_key_follows_file_contents_and_config(data_file, chars, tmp_path):
    cache_dir = tmp_path / "cache"
    cfg = DataConfig(train=data_file, seq_length=300, cache_dir=str(cache_dir))
    build_sft_dataset(cfg, chars, len(chars))
    build_sft_dataset(dataclasses.replace(cfg, chat_template="chatml"), chars, len(chars))
    write_jsonl(data_file, alpaca_records(5))
    assert build_sft_dataset(cfg, chars, len(chars)).num_samples == 5
    assert len(os.listdir(cache_dir)) == 3


def test_cache_goes_next_to_the_output_dir(data_file, chars, tmp_path):
    output_dir = str(tmp_path / "run")
    build_sft_dataset(DataConfig(train=data_file), chars, len(chars), output_dir=output_dir)
    assert len(os.listdir(tmp_path / "run" / "data_cache")) == 1


def test_parquet_and_save_to_disk_build_the_same_dataset(data_file, chars, tmp_path):
    import datasets

    table = datasets.Dataset.from_list(alpaca_records(6))
    table.to_parquet(str(tmp_path / "train.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    reference = build_sft_dataset(DataConfig(train=data_file), chars, len(chars))
    for source in (tmp_path / "train.parquet", tmp_path / "saved"):
        _assert_same_rows(reference, build_sft_dataset(DataConfig(train=source), chars, len(chars)))


def test_several_files_and_the_valid_split(data_file, chars, tmp_path):
    other = write_jsonl(str(tmp_path / "other.jsonl"), alpaca_records(3))
    cfg = DataConfig(train=[data_file, other], valid=other, packing=False)
    train = build_sft_dataset(cfg, chars, len(chars))
    valid = build_sft_dataset(cfg, chars, len(chars), split="valid")
    assert (train.num_samples, valid.num_samples) == (9, 3)
    np.testing.assert_array_equal(train[6]["tokens"].numpy(), valid[0]["tokens"].numpy())
    with pytest.raises(ValueError, match="DataConfig.valid is not set"):
        build_sft_dataset(DataConfig(train=data_file), chars, len(chars), split="valid")
