"""Bias routing and condensers at TP2/EP2 reproduce TP1/EP1: loss, gradients and bias, 3 steps each;
and the usage of data-parallel ranks with different tokens sums to a single process's over their union.

Floats are compared with the suite's scale-relative `FP32_LAYOUT` (tests/tolerance.py). Biases
are compared bitwise, within a layout and across layouts; see `_assert_no_near_ties` for why that
is the contract here and not a machine-dependent bet.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ec.models.builder import RuntimeOptions
from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
from megatron_ec.models.layout import full_tensors, load_full_tensors
from megatron_ec.moe import state
from megatron_ec.moe.methods import make_method
from megatron_ec.moe.methods.saved import method_from_record, method_record
from megatron_ec.parallel import ParallelConfig, init_parallel, shutdown_parallel
from megatron_ec.training.distributed import wrap_ddp
from tests.harness import run_on_ranks
from tests.tiny import (SEQ, build_tiny, forward_loss, sgd_step, start_phase, tiny_batch,
                        tiny_config)
from tests.tolerance import FP32_LAYOUT, assert_all_close_scaled, assert_close_scaled

GAMMA = 0.05  # large, so that three steps visibly change the routing of the tiny model
LR = 0.05
"""SGD step size. At 0.5 the loss rose in the paper phase and layout rounding differences grew
step over step; at 0.05 every phase's loss stays at or below where the phase started."""
LAYOUTS = [((1, 1), "alltoall"), ((2, 2), "alltoall"), ((2, 2), "allgather")]
PHASES = [
    make_method("bias", gamma=GAMMA),
    make_method("condenser", condenser_mode="paper", gamma=GAMMA, num_condensers=2),
    make_method("condenser", condenser_mode="reference", gamma=GAMMA, num_condensers=[1, 2]),
]
STEPS = 3
TIE_MARGIN = 2.0
"""How far (in FP32_LAYOUT limits) every reference usage must sit from its layer's mean: each
usage is checked to within one limit, so u_e - mean(u) moves by at most two and keeps its sign."""


def _build(parallel, method):
    return build_tiny(parallel, tiny_config(), RuntimeOptions(seq_length=SEQ), method)


def _train(model, tcfg, steps: int):
    """SGD on the DDP gradient; the bias hook once per step. Returns losses, last grads and the
    reduced usage shares of every step ({layer: [E]} per step)."""
    ddp = wrap_ddp(model, tcfg)
    losses, usage = [], []
    for step in range(steps):
        loss, grads = sgd_step(ddp, model, tiny_batch(seed=step), LR)
        state.bias_update_step(model)
        losses.append(loss.item())
        # Each data-parallel rank trains on the same batch, so the reduced usage counts it DP
        # times (4 at TP1/EP1, 2 at TP2/EP2); its shares are what the layouts have in common.
        usage.append({r.layer_index: r.last_usage / r.last_usage.sum()
                      for r in state.ec_routers(model)})
    return losses, grads, usage


DP_LAYOUTS = [(1, 1), (2, 2)]
"""(TP, EP) on 4 ranks: data parallel 4, and 2 with tensor (sequence) parallel ranks inside."""
DP_METHOD = make_method("bias", gamma=GAMMA)


def dp_batch(dp_rank: int) -> dict[str, torch.Tensor]:
    """Data-parallel rank `dp_rank`'s tokens: different on every DP rank."""
    return tiny_batch(seed=100 + dp_rank)


def union_batch(dp_size: int) -> dict[str, torch.Tensor]:
    batches = [dp_batch(r) for r in range(dp_size)]
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def _usage_and_bias(model, batch):
    """One training forward (it counts usage), then the bias hook: ({layer: usage}, biases)."""
    model.train()
    forward_loss(model, batch)
    state.bias_update_step(model)
    return {r.layer_index: r.last_usage.clone() for r in state.ec_routers(model)}, \
        state.selection_biases(model)


def _dp_usage(tmp_dir) -> dict:
    """{(TP, EP): (DP size, usage, biases)} with each DP rank routing its own `dp_batch`."""
    from megatron.core import parallel_state

    results = {}
    for tp, ep in DP_LAYOUTS:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
        init_parallel(parallel, seed=5)
        model, _ = _build(parallel, method_from_record(method_record(DP_METHOD)))
        (save_model_weights if (tp, ep) == (1, 1) else load_model_weights)(
            model, f"{tmp_dir}/dp_start")
        batch = dp_batch(parallel_state.get_data_parallel_rank())
        results[(tp, ep)] = (parallel_state.get_data_parallel_world_size(),
                             *_usage_and_bias(model, batch))
    return results


def router_layouts_worker(tmp_dir):
    """Per layout and phase: (losses, last grads, biases, condensers, usage), and under "dp"
    the `_dp_usage` results; every rank."""
    results = {"dp": _dp_usage(tmp_dir)}
    for (tp, ep), dispatcher in LAYOUTS:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                  token_dispatcher=dispatcher)
        init_parallel(parallel, seed=1234)
        weights, biases = None, None
        for index, phase in enumerate(PHASES):
            method = method_from_record(method_record(phase))  # a fresh copy per layout
            model, tcfg = _build(parallel, method)
            if weights is None:
                (save_model_weights if (tp, ep) == (1, 1) else load_model_weights)(
                    model, f"{tmp_dir}/start")
            else:
                load_full_tensors(model, weights)
                state.load_selection_biases(model, biases)
                start_phase(model, method)
            losses, grads, usage = _train(model, tcfg, steps=STEPS)
            weights, biases = full_tensors(model), state.selection_biases(model)
            condensers = dict(getattr(method.decisions, "condensers", {}))
            results[((tp, ep), dispatcher, index)] = (losses, grads, biases, condensers, usage)
    return results


def _assert_no_near_ties(usage_steps, where: str) -> None:
    """The bias moves by gamma * sign(u_e - mean u): a pure function of the usage's signs. So
    the biases of two layouts are bitwise equal exactly when no expert's usage sits within
    rounding noise of its layer's mean (the usage itself matches to FP32_LAYOUT, checked below;
    the top-k choice behind it is guarded by the loss and gradient checks, which a flipped token
    fails by far). Bitwise equality is therefore sound once the reference run keeps every expert
    `TIE_MARGIN` limits from the mean; if this fails, change the seed, not the tolerance."""
    for step, per_layer in enumerate(usage_steps):
        for layer, usage in per_layer.items():
            gap = (usage - usage.mean()).abs().min().item()
            limit = FP32_LAYOUT.limit(usage)
            assert gap > TIE_MARGIN * limit, f"{where}, step {step}, layer {layer}: usage " \
                f"{gap:.2e} from the mean, a near tie (limit {limit:.2e})"


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Both tests read one 4-rank launch: (per-rank results, its directory)."""
    tmp_dir = tmp_path_factory.mktemp("router_layouts")
    return run_on_ranks(router_layouts_worker, world_size=4, args=(str(tmp_dir),),
                        timeout=600), tmp_dir


def test_bias_and_condenser_phases_match_across_layouts(launch):
    per_rank, _ = launch
    reference = per_rank[0]
    for index in range(len(PHASES)):
        ref_losses, ref_grads, ref_biases, ref_condensers, ref_usage = \
            reference[((1, 1), "alltoall", index)]
        assert any(b.abs().max() > 0 for b in ref_biases.values())
        if index > 0:
            assert all(ref_condensers.values())
        assert max(ref_losses) <= ref_losses[0] + 1e-3, f"phase {index}: loss rose {ref_losses}"
        _assert_no_near_ties(ref_usage, f"phase {index}")
        for layout in LAYOUTS[1:]:
            for rank, results in enumerate(per_rank):
                losses, grads, biases, condensers, usage = results[(*layout, index)]
                where = f"phase {index} at {layout}, rank {rank}"
                assert_close_scaled(torch.tensor(losses), torch.tensor(ref_losses), FP32_LAYOUT,
                                    f"{where}: losses")
                for step, (got, want) in enumerate(zip(usage, ref_usage)):
                    assert_all_close_scaled(got, want, FP32_LAYOUT, f"{where}: usage step {step}")
                assert condensers == ref_condensers, where
                for layer, bias in biases.items():
                    assert torch.equal(bias, ref_biases[layer]), f"{where}: bias of layer {layer}"
                    assert torch.equal(bias, per_rank[0][(*layout, index)][2][layer]), where
                assert_all_close_scaled(grads, ref_grads, FP32_LAYOUT, f"{where}: grad")


def _single_process_usage(ckpt_dir, batch):
    """The reference: one process, TP1/EP1, the union of the DP ranks' batches."""
    parallel = ParallelConfig()
    init_parallel(parallel, seed=5)
    try:
        model, _ = _build(parallel, method_from_record(method_record(DP_METHOD)))
        load_model_weights(model, ckpt_dir)
        return _usage_and_bias(model, batch)
    finally:
        shutdown_parallel()


def test_usage_is_reduced_over_data_parallel_ranks(launch):
    """Each DP rank routes different tokens; after `bias_update_step` every rank holds the usage
    and bias of one process that routed them all (a missing DP reduction leaves each rank its
    own share, and the bias follows the wrong signs)."""
    per_rank, tmp_dir = launch
    for layout in DP_LAYOUTS:
        dp_size = per_rank[0]["dp"][layout][0]
        ref_usage, ref_biases = _single_process_usage(f"{tmp_dir}/dp_start", union_batch(dp_size))
        _assert_no_near_ties([ref_usage], f"union of {dp_size} DP batches")
        assert any(b.abs().max() > 0 for b in ref_biases.values())
        for rank, results in enumerate(per_rank):
            _, usage, biases = results["dp"][layout]
            where = f"(TP, EP) {layout}, DP {dp_size}, rank {rank}"
            assert_all_close_scaled(usage, ref_usage, FP32_LAYOUT, f"{where}: usage")
            for layer, bias in biases.items():
                assert torch.equal(bias, ref_biases[layer]), f"{where}: bias of layer {layer}"
