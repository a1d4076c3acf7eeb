"""Per-expert gradient norms (`training.expert_grad_norms`) equal a direct computation on the same
gradients gathered into full TP1/EP1 tensors, at EP/ETP/data-parallel layouts and with the
distributed optimizer's sharded buffers; one launch of 4 ranks."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.distributed as dist

from megatron_ec.models.layout import full_tensors
from megatron_ec.parallel import ParallelConfig, init_parallel
from megatron_ec.training.distributed import finalize_grads, wrap_ddp
from megatron_ec.training.expert_grad_norms import ExpertGradNorms
from tests.harness import run_on_ranks
from tests.tiny import build_tiny, forward_loss, tiny_batch
from tests.tolerance import FP32_LAYOUT, assert_close_scaled

LAYOUTS = [(1, 1, 1, False), (1, 2, 1, False), (2, 2, 2, False), (1, 1, 1, True)]
"""(TP, EP, ETP, distributed optimizer) on 4 ranks: expert-data-parallel 4, 2 and 1, and the
distributed optimizer's bucket shards over 4 data-parallel ranks."""
_EXPERT = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.")


def direct_norms(grads: dict[str, torch.Tensor]) -> dict[int, list[float]]:
    """The oracle: for each expert, sqrt of the sum of squares of its full tensors' entries, a
    Python loop over the gathered TP1/EP1 gradients."""
    squares: dict[int, dict[int, float]] = {}
    for name, grad in grads.items():
        match = _EXPERT.search(name)
        if match:
            layer, expert = int(match.group(1)), int(match.group(2))
            total = 0.0
            for value in grad.double().flatten().tolist():
                total += value * value
            squares.setdefault(layer, {}).setdefault(expert, 0.0)
            squares[layer][expert] += total
    return {layer: [math.sqrt(per[e]) for e in sorted(per)] for layer, per in squares.items()}


def _layout_norms(layout, ckpt_dir):
    from megatron.core import parallel_state as ps

    tp, ep, etp, distributed = layout
    parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=etp)
    init_parallel(parallel, seed=11)
    model, tcfg = build_tiny(parallel)
    ddp = wrap_ddp(model, tcfg, use_distributed_optimizer=distributed)
    ddp.zero_grad_buffer()
    # Two batches over the data-parallel ranks (the same mean gradient at DP 2 and 4): the local
    # gradients differ from the reduced ones, so a stale or double-counted element shows.
    forward_loss(ddp, tiny_batch(seed=ps.get_data_parallel_rank() % 2)).backward()
    finalize_grads(ddp)
    norms = ExpertGradNorms(ddp, model, ckpt_dir, write=False).norms()
    if distributed:
        _gather_shards(ddp)
    oracle = direct_norms(full_tensors(model, lambda p: p.main_grad))
    return norms, oracle


def _gather_shards(ddp) -> None:
    """main_grad outside this rank's bucket shard is stale under the distributed optimizer: put
    every rank's reduced shard in place on all ranks (for the oracle only)."""
    for group in list(ddp.bucket_groups) + list(ddp.expert_parallel_bucket_groups):
        size = group.intra_distributed_optimizer_instance_size
        rank = group.intra_distributed_optimizer_instance_rank
        for bucket in group.buckets:
            shard = bucket.grad_data.numel() // size
            full = torch.zeros_like(bucket.grad_data)
            full[rank * shard:(rank + 1) * shard] = bucket.grad_data[rank * shard:
                                                                     (rank + 1) * shard]
            dist.all_reduce(full, group=group.intra_distributed_optimizer_instance_group)
            bucket.grad_data.copy_(full)


def grad_norms_worker(ckpt_dir):
    results = {layout: _layout_norms(layout, ckpt_dir) for layout in LAYOUTS}
    return results if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("expert_grad_norms")
    return run_on_ranks(grad_norms_worker, world_size=4, args=(str(path),), timeout=600)[0]


def test_norms_equal_a_direct_computation_at_every_layout(results):
    for layout, (norms, oracle) in results.items():
        assert sorted(norms) == sorted(oracle) == [1, 2], layout
        for layer in oracle:
            assert all(n is not None for n in norms[layer])
            assert_close_scaled(torch.tensor(norms[layer]), torch.tensor(oracle[layer]),
                                FP32_LAYOUT, f"{layout} layer {layer}")


def _with_grad(*shape: int, seed: int) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(*shape))
    param.main_grad = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return param


def test_stacked_and_indexed_expert_tensors_split_per_expert():
    """GPU layouts on the host: legacy GroupedMLP's stacked weight1 [H, E_local * 2F] / weight2
    [E_local * F, H] and TEGroupedMLP's linear_fc*.weight<i>, whole and through a partial
    (distributed-optimizer) element range, against a loop over the elements."""
    from types import SimpleNamespace

    from megatron_ec.training.expert_grad_norms import _expert_tensors

    hidden, ffn, experts = 3, 2, [4, 5]  # global ids of this rank's two local experts
    stacked = torch.nn.Module()
    stacked.weight1 = _with_grad(hidden, 2 * 2 * ffn, seed=1)
    stacked.weight2 = _with_grad(2 * ffn, hidden, seed=2)
    indexed = torch.nn.Module()
    indexed.linear_fc1 = torch.nn.Module()
    indexed.linear_fc1.weight0 = _with_grad(2 * ffn, hidden, seed=3)
    indexed.linear_fc1.weight1 = _with_grad(2 * ffn, hidden, seed=4)

    def owner(name, flat_index, shape):
        """Local expert of one element, from the layouts' definitions."""
        row, col = divmod(flat_index, shape[1])
        if name == "weight1":
            return col // (2 * ffn)
        if name == "weight2":
            return row // ffn
        return int(name[-1])

    for module in (stacked, indexed):
        tensors = _expert_tensors(0, SimpleNamespace(experts=module, local_expert_indices=experts))
        names = dict((id(p), n) for n, p in module.named_parameters())
        assert len(tensors) == 2
        for tensor in tensors:
            numel = tensor.param.numel()
            for owned in ((0, numel), (3, numel - 2)):
                tensor.owned = owned
                expected = [0.0] * 6
                flat = tensor.param.main_grad.flatten().tolist()
                for index in range(*owned):
                    local = owner(names[id(tensor.param)], index, tensor.param.shape)
                    expected[experts[local]] += flat[index] ** 2
                got = tensor.squares_E(6, torch.device("cpu"))
                assert max(abs(a - b) for a, b in zip(got.tolist(), expected)) < 1e-12
