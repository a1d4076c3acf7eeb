"""The global gradient norm at TP/EP/ETP layouts equals the TP1/EP1 norm; clipping reaches it."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
from megatron_ec.models.layout import full_tensors
from megatron_ec.parallel import ParallelConfig, init_parallel
from megatron_ec.training.distributed import finalize_grads, wrap_ddp
from megatron_ec.training.optimizer import clip_grads, global_grad_norm
from tests.harness import run_on_ranks
from tests.tiny import build_tiny, forward_loss, tiny_batch
from tests.tolerance import FP32_LAYOUT, assert_close_scaled

LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 1), (2, 2, 2)]  # (TP, EP, ETP)


def _norms(layout, ckpt_dir) -> tuple[float, float, float]:
    tp, ep, etp = layout
    parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=etp)
    init_parallel(parallel, seed=11)
    model, tcfg = build_tiny(parallel)
    if layout == LAYOUTS[0]:
        save_model_weights(model, ckpt_dir)
    else:
        load_model_weights(model, ckpt_dir)
    ddp = wrap_ddp(model, tcfg)
    ddp.zero_grad_buffer()
    forward_loss(ddp, tiny_batch()).backward()
    finalize_grads(ddp)
    params = list(model.parameters())
    norm = global_grad_norm(params)
    # the same gradients gathered into TP1/EP1 tensors: no shard counted twice, none missed
    gathered = math.sqrt(sum(float(g.double().pow(2).sum())
                             for g in full_tensors(model, lambda p: p.main_grad).values()))
    for param in params:
        param.grad = param.main_grad.clone()
    clip_grads(params, norm / 4, norm)
    return norm, gathered, global_grad_norm(params, grad_of=lambda p: p.grad)


def norms_worker(tmp_dir):
    results = {layout: _norms(layout, f"{tmp_dir}/ref") for layout in LAYOUTS}
    return results if dist.get_rank() == 0 else None


def test_global_grad_norm_matches_tp1_ep1(tmp_path):
    results = run_on_ranks(norms_worker, world_size=4, args=(str(tmp_path),), timeout=600)[0]
    reference = results[LAYOUTS[0]][0]
    torch_norm = results[LAYOUTS[0]][1]
    # The same gradients, summed in fp64 in another order: equal up to the last bits.
    assert math.isclose(reference, torch_norm, rel_tol=1e-9)
    for layout, (norm, gathered, clipped) in results.items():
        assert math.isclose(norm, gathered, rel_tol=1e-9), (layout, norm, gathered)
        assert_close_scaled(norm, reference, FP32_LAYOUT, f"{layout}: grad norm vs TP1/EP1")
        # fp32 gradients scaled by one coefficient: a few fp32 roundings, relative
        assert math.isclose(clipped, norm / 4, rel_tol=1e-5), (layout, clipped, norm / 4)
