"""Deterministic shuffling, data-parallel slices and resumption of the batch sampler."""

import pytest
import torch
from tests.data_testing import alpaca_records, char_tokenizer, write_jsonl

from megatron_ec.data import BatchSampler, DataConfig, build_sft_dataset, eval_micro_batches


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = write_jsonl(str(tmp_path_factory.mktemp("data") / "train.jsonl"), alpaca_records(23))
    tokenizer = char_tokenizer()
    return build_sft_dataset(DataConfig(train=path, seq_length=200, packing=False),
                             tokenizer, len(tokenizer))


def _indices(sampler, steps):
    return [sampler.next_row_indices() for _ in range(steps)]


def test_same_seed_same_order_and_other_seed_other_order(dataset):
    first = _indices(BatchSampler(dataset, 2, seed=5), 20)
    assert first == _indices(BatchSampler(dataset, 2, seed=5), 20)
    assert first != _indices(BatchSampler(dataset, 2, seed=6), 20)


def test_epochs_are_permutations_and_differ(dataset):
    sampler = BatchSampler(dataset, 3, seed=1)
    per_epoch = sampler.micro_batches_per_epoch
    assert per_epoch == len(dataset) // 3
    epochs = [sum(_indices(sampler, per_epoch), []) for _ in range(2)]
    assert all(len(set(epoch)) == per_epoch * 3 for epoch in epochs)
    assert epochs[0] != epochs[1]
    assert sampler.epoch == 1


def test_no_shuffle_keeps_row_order(dataset):
    assert _indices(BatchSampler(dataset, 4, shuffle=False), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_data_parallel_ranks_split_each_global_batch(dataset):
    dp_size, micro = 3, 2
    ranks = [BatchSampler(dataset, micro, rank, dp_size, seed=9) for rank in range(dp_size)]
    single = BatchSampler(dataset, micro * dp_size, seed=9)
    for _ in range(2 * single.micro_batches_per_epoch + 1):  # Crosses epoch boundaries.
        slices = [sampler.next_row_indices() for sampler in ranks]
        assert sum(slices, []) == single.next_row_indices()
        assert len(set(sum(slices, []))) == micro * dp_size


def test_resumed_sampler_yields_identical_micro_batches(dataset):
    original = BatchSampler(dataset, 2, dp_rank=1, dp_size=2, seed=3)
    for _ in range(7):
        original.next_micro_batch()
    state = original.state_dict()
    resumed = BatchSampler(dataset, 2, dp_rank=1, dp_size=2, seed=3)
    resumed.load_state_dict(state)
    for _ in range(6):  # 7 + 6 steps of 4 rows cross the 23-row epoch boundary.
        expected, actual = original.next_micro_batch(), resumed.next_micro_batch()
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), key


def test_resume_with_other_seed_is_refused(dataset):
    state = BatchSampler(dataset, 2, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed=3 but this run has 4"):
        BatchSampler(dataset, 2, seed=4).load_state_dict(state)


def test_too_few_rows_for_a_global_batch(dataset):
    with pytest.raises(ValueError, match="only 23 sequences"):
        BatchSampler(dataset, 8, dp_rank=0, dp_size=3)
    with pytest.raises(ValueError, match="only 23 sequences for a global batch of 24"):
        BatchSampler(dataset, 2, global_batch_size=24)
    with pytest.raises(ValueError, match="not a multiple"):
        BatchSampler(dataset, 2, dp_size=2, global_batch_size=6)
    with pytest.raises(ValueError, match="dp_rank"):
        BatchSampler(dataset, 1, dp_rank=2, dp_size=2)


def test_eval_batches_cover_every_row_once(dataset):
    seen = []
    counts = []
    for rank in range(2):
        batches = list(eval_micro_batches(dataset, 5, rank, 2))
        counts.append(len(batches))
        for batch in batches:
            for row in range(5):
                if not batch["padding_mask"][row].all():
                    seen.append(batch["tokens"][row])
    assert counts[0] == counts[1] == 3
    assert len(seen) == len(dataset)
    expected = torch.stack([dataset[i]["tokens"] for i in range(len(dataset))])
    assert torch.equal(torch.stack(sorted(seen, key=lambda t: t.tolist())),
                       torch.stack(sorted(expected, key=lambda t: t.tolist())))



def _step_rows(samplers, accumulation) -> list[int]:
    """The rows of one optimizer step over all data-parallel ranks, in global order."""
    return [row for _ in range(accumulation) for s in samplers for row in s.next_row_indices()]


def test_every_data_parallel_size_sees_the_same_global_batches_and_resumes_across(dataset):
    global_batch = 4  # 23 rows: 5 steps per epoch at any data-parallel size, 3 rows skipped
    accumulation = {1: 2, 2: 1, 4: 1}
    layouts = {dp: [BatchSampler(dataset, global_batch // dp // accumulation[dp], rank, dp,
                                 seed=2, global_batch_size=global_batch) for rank in range(dp)]
               for dp in accumulation}
    steps = [[_step_rows(layouts[dp], accumulation[dp]) for _ in range(12)] for dp in layouts]
    assert steps[0] == steps[1] == steps[2]
    assert all(len(set(rows)) == global_batch for rows in steps[0])
    assert layouts[1][0].epoch == 2  # two whole epochs of 5 steps, then 2 steps of the third
    resumed = [BatchSampler(dataset, 2, rank, 2, seed=2, global_batch_size=global_batch)
               for rank in range(2)]
    for sampler in resumed:
        sampler.load_state_dict(layouts[1][0].state_dict())  # saved at DP1, resumed at DP2
    expected = [_step_rows(layouts[1], 2) for _ in range(4)]
    assert [_step_rows(resumed, 1) for _ in range(4)] == expected
