"""The torch AdamW state saved at one TP/EP/ETP layout loads at another, moment for moment, and the
per-rank state of earlier versions still loads at its own layout (refused at any other)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_ec.models.layout import full_tensors
from megatron_ec.parallel import ParallelConfig, init_parallel
from megatron_ec.training import checkpoint
from megatron_ec.training.config import TrainConfig
from megatron_ec.training.distributed import finalize_grads, wrap_ddp
from megatron_ec.training.optimizer import TorchAdamW
from tests.harness import run_on_ranks
from tests.tiny import build_tiny, forward_loss, tiny_batch

# (TP, EP, ETP) on 4 ranks; TP1/EP1 is data-parallel 4, TP2/EP2/ETP2 data-parallel 2
SAVE_AT, LOAD_AT = (1, 1, 1), [(2, 2, 2), (2, 2, 1), (1, 2, 1)]
MOMENTS = ("exp_avg", "exp_avg_sq")


def _assemble(layout):
    tp, ep, etp = layout
    parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=etp)
    init_parallel(parallel, seed=5)
    model, tcfg = build_tiny(parallel)
    ddp = wrap_ddp(model, tcfg)
    return model, ddp, TorchAdamW(model, TrainConfig(lr=1e-2))


def _train_steps(model, ddp, optimizer, steps: int) -> None:
    for step in range(steps):
        ddp.zero_grad_buffer()
        forward_loss(ddp, tiny_batch(seed=step)).backward()
        finalize_grads(ddp)
        optimizer.step()


def _moments(model, optimizer) -> dict:
    """{moment: TP1/EP1 tensors}, plus the step counts, gathered from any layout."""
    state = optimizer.inner.state
    # clone: a replicated tensor comes back as the live state tensor, which training updates
    found = {m: full_tensors(model, lambda p, m=m: state[p][m].clone()) for m in MOMENTS}
    found["steps"] = sorted({float(s["step"]) for s in state.values()})
    return found


def _state_dir(tmp: Path, name: str) -> Path:
    path = tmp / name / "train_state"
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return path


def reshard_worker(tmp: str) -> dict:
    tmp = Path(tmp)
    model, ddp, optimizer = _assemble(SAVE_AT)
    _train_steps(model, ddp, optimizer, 2)
    results = {"saved": _moments(model, optimizer)}
    optimizer.save(_state_dir(tmp, "sharded"), model)
    legacy = _state_dir(tmp, "legacy")  # the format of earlier versions: one file per rank
    torch.save(optimizer.inner.state_dict(), legacy / f"optimizer_rank{dist.get_rank():05d}.pt")
    if dist.get_rank() == 0:
        torch.save({"step": 2, "sampler": {}, "layout": checkpoint.current_layout(),
                    "schedule": {}}, legacy / checkpoint.COMMON)
    for layout in LOAD_AT:
        model, ddp, optimizer = _assemble(layout)
        optimizer.load(tmp / "sharded" / "train_state", model)
        results[layout] = _moments(model, optimizer)
        if layout == LOAD_AT[0]:  # and back: a state trained further at TP2/EP2/ETP2, at TP1/EP1
            _train_steps(model, ddp, optimizer, 1)
            results["trained_on"] = _moments(model, optimizer)
            optimizer.save(_state_dir(tmp, "back"), model)
            try:
                checkpoint.load_train_state(tmp / "legacy", model, optimizer)
            except ValueError as err:
                results["legacy_refused"] = str(err)
    model, ddp, optimizer = _assemble(SAVE_AT)
    optimizer.load(tmp / "back" / "train_state", model)
    results["back"] = _moments(model, optimizer)
    model, ddp, optimizer = _assemble(SAVE_AT)
    optimizer.load(tmp / "legacy" / "train_state", model)
    results["legacy"] = _moments(model, optimizer)
    return results if dist.get_rank() == 0 else None


def _assert_equal(expected: dict, got: dict, what) -> None:
    assert got["steps"] == expected["steps"], what
    for moment in MOMENTS:
        assert got[moment].keys() == expected[moment].keys(), what
        for name, tensor in expected[moment].items():
            assert torch.equal(got[moment][name], tensor), (what, moment, name)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optimizer_reshard")
    return run_on_ranks(reshard_worker, world_size=4, args=(str(tmp),), timeout=600)[0]


def test_moments_reshard_exactly_in_both_directions(results):
    assert results["saved"]["steps"] == [2.0]
    assert any(t.abs().max() > 0 for t in results["saved"]["exp_avg"].values())
    for layout in LOAD_AT:
        _assert_equal(results["saved"], results[layout], layout)
    assert results["trained_on"]["steps"] == [3.0]
    _assert_equal(results["trained_on"], results["back"], "TP2/EP2/ETP2 -> TP1/EP1")


def test_per_rank_state_of_earlier_versions_loads_at_its_own_layout_only(results):
    _assert_equal(results["saved"], results["legacy"], "legacy")
    assert "by an earlier version" in results["legacy_refused"]
    assert "resume it with the saved layout" in results["legacy_refused"]
