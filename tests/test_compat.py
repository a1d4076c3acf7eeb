"""Each CPU/gloo compat patch: it works, and it fails loudly if Megatron-Core moves its symbol."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from megatron_ec.compat import CompatError, SequenceParallelTorchNorm, apply_cpu_compat
from megatron_ec.compat import cpu_gloo, sync_save
from tests.harness import run_on_ranks

# (patch, module whose symbol it replaces, symbol)
PATCH_TARGETS = [
    (cpu_gloo.patch_rng_tracker, "megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    (cpu_gloo.patch_current_device, "torch.cuda", "current_device"),
    (cpu_gloo.patch_cuda_streams, "torch.cuda", "Stream"),
    (cpu_gloo.patch_default_causal_mask, "megatron.core.fusions.fused_softmax",
     "get_default_causal_mask"),
    (cpu_gloo.patch_split_sizes_to_numpy, "megatron.core.transformer.moe.moe_utils",
     "maybe_move_tensor_to_cpu"),
    (cpu_gloo.patch_uneven_collectives, "megatron.core.tensor_parallel.mappings",
     "_gather_along_first_dim"),
    (sync_save.patch_sync_save_queue, sync_save._FILESYSTEM_ASYNC, "get_write_results_queue"),
    (sync_save.patch_sync_save_queue, sync_save._TORCH_STRATEGY, "TorchDistSaveShardedStrategy"),
]


@pytest.fixture(scope="module", autouse=True)
def compat_applied():
    assert len(apply_cpu_compat()) == len(cpu_gloo.CPU_PATCHES)


@pytest.mark.parametrize("patch,module,symbol", PATCH_TARGETS, ids=lambda x: getattr(x, "__name__", ""))
def test_patch_fails_loudly_when_symbol_moves(patch, module, symbol, monkeypatch):
    monkeypatch.delattr(importlib.import_module(module), symbol)
    with pytest.raises(CompatError, match=symbol):
        patch()


def test_apply_is_idempotent():
    assert apply_cpu_compat() == apply_cpu_compat()


def test_rng_tracker_streams_on_cpu():
    from megatron.core.tensor_parallel import random as rnd
    from megatron.core import parallel_state  # noqa: F401  (the seed reads ranks we pass in)

    rnd.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = rnd.get_cuda_rng_tracker()
    outside = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside), "fork must restore the default stream"
    rnd.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with rnd.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), first), "same seed, same model-parallel stream"
    state = rnd._get_cuda_rng_state()  # activation recompute saves and restores this
    rnd._set_cuda_rng_state(state)


def test_current_device_is_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"


def test_streams_and_events_are_immediate():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pass
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.Event().record()
    torch.cuda.synchronize()


def test_default_causal_mask_on_cpu():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    mask = fused_softmax.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))
    window = utils.get_sliding_window_causal_mask(5, 5, (2, 0))
    assert not window[4, 3] and not window[4, 2] and window[4, 1] and window[0, 1]


def test_split_sizes_become_numpy():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    for module in (moe_utils, token_dispatcher):
        out = module.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
        assert isinstance(out, np.ndarray) and out.tolist() == [3, 1]
    kept = torch.tensor([1.0])
    assert moe_utils.maybe_move_tensor_to_cpu(kept) is kept


def test_sequence_parallel_norm_tags_params():
    from types import SimpleNamespace

    for kind, cls in (("RMSNorm", torch.nn.RMSNorm), ("LayerNorm", torch.nn.LayerNorm)):
        norm = SequenceParallelTorchNorm(SimpleNamespace(normalization=kind, sequence_parallel=True), 8)
        assert isinstance(norm, cls)
        assert all(p.sequence_parallel for p in norm.parameters())
    with pytest.raises(ValueError, match="normalization"):
        SequenceParallelTorchNorm(SimpleNamespace(normalization="L2", sequence_parallel=False), 8)


def uneven_collectives_worker():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from megatron_ec.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(), seed=1)
    rank, group = dist.get_rank(), dist.group.WORLD
    sizes = [3, 1]
    local = torch.arange(sizes[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
    gathered = mappings._gather_along_first_dim(local, group, output_split_sizes=sizes)
    full = torch.arange(8, dtype=torch.float32).reshape(4, 2) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    return gathered, scattered


def test_uneven_gather_and_reduce_scatter_on_gloo():
    results = run_on_ranks(uneven_collectives_worker, world_size=2, timeout=120)
    expected_gather = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(2.0).reshape(1, 2) + 100])
    total = torch.arange(8, dtype=torch.float32).reshape(4, 2) * 3
    for rank, (gathered, scattered) in enumerate(results):
        assert torch.equal(gathered, expected_gather)
        assert torch.equal(scattered, total[:3] if rank == 0 else total[3:])


def test_sync_save_starts_no_manager_process(tmp_path):
    """A torch_dist save leaves no child process behind to outlive a killed trainer."""
    import psutil
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_ec.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(), seed=1)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    weight = torch.arange(6, dtype=torch.float32)
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weight)}, str(tmp_path))
    started = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not started, f"dist_checkpointing.save started processes {started}"
    loaded = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(6))}, str(tmp_path))
    assert torch.equal(loaded["w"], weight)
