"""Bias routing and condensers at TP2/EP2 reproduce TP1/EP1: loss, gradients and bias, 3 steps each."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ec.models.builder import RuntimeOptions
from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
from megatron_ec.models.layout import full_tensors, load_full_tensors
from megatron_ec.moe import state
from megatron_ec.moe.methods import make_method
from megatron_ec.moe.methods.saved import method_from_record, method_record
from megatron_ec.parallel import ParallelConfig, init_parallel
from megatron_ec.training.distributed import finalize_grads, wrap_ddp
from tests.harness import run_on_ranks
from tests.tiny import SEQ, build_tiny, forward_loss, start_phase, tiny_batch, tiny_config

GAMMA = 0.05  # large, so that three steps visibly change the routing of the tiny model
LR = 0.5
LAYOUTS = [((1, 1), "alltoall"), ((2, 2), "alltoall"), ((2, 2), "allgather")]
PHASES = [
    make_method("bias", gamma=GAMMA),
    make_method("condenser", condenser_mode="paper", gamma=GAMMA, num_condensers=2),
    make_method("condenser", condenser_mode="reference", gamma=GAMMA, num_condensers=[1, 2]),
]


def _build(parallel, method):
    return build_tiny(parallel, tiny_config(), RuntimeOptions(seq_length=SEQ), method)


def _train(model, tcfg, steps: int):
    """SGD on the DDP gradient; the bias hook once per step. Returns losses and last grads."""
    ddp = wrap_ddp(model, tcfg)
    losses = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        loss = forward_loss(ddp, tiny_batch(seed=step))
        loss.backward()
        finalize_grads(ddp)
        grads = full_tensors(model, lambda p: p.main_grad)
        with torch.no_grad():
            for param in model.parameters():
                param -= LR * param.main_grad
        state.bias_update_step(model)
        losses.append(loss.item())
    return losses, grads


def router_layouts_worker(tmp_dir):
    """Per layout and phase: (losses, last grads, biases, condensers); biases from every rank."""
    results = {}
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
            losses, grads = _train(model, tcfg, steps=3)
            weights, biases = full_tensors(model), state.selection_biases(model)
            condensers = dict(getattr(method.decisions, "condensers", {}))
            results[((tp, ep), dispatcher, index)] = (losses, grads, biases, condensers)
    return results


def test_bias_and_condenser_phases_match_across_layouts(tmp_path):
    per_rank = run_on_ranks(router_layouts_worker, world_size=4, args=(str(tmp_path),),
                            timeout=600)
    reference = per_rank[0]
    for index in range(len(PHASES)):
        ref_losses, ref_grads, ref_biases, ref_condensers = reference[((1, 1), "alltoall", index)]
        assert any(b.abs().max() > 0 for b in ref_biases.values())
        if index > 0:
            assert all(ref_condensers.values())
        for layout in LAYOUTS[1:]:
            for rank, results in enumerate(per_rank):
                losses, grads, biases, condensers = results[(*layout, index)]
                where = f"phase {index} at {layout}, rank {rank}"
                assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5, where
                assert condensers == ref_condensers, where
                for layer, bias in biases.items():
                    assert torch.equal(bias, ref_biases[layer]), f"{where}: bias of layer {layer}"
                    assert torch.equal(bias, per_rank[0][(*layout, index)][2][layer]), where
                for name, grad in grads.items():
                    diff = (grad - ref_grads[name]).abs().max().item()
                    assert diff < 1e-5, f"{where}: grad of {name} differs by {diff}"
