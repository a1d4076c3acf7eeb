"""The trainer's per-micro-batch method hook: `micro_batch_loss` reaches the gradients."""

from __future__ import annotations

import pytest

from megatron_ec.moe import state
from megatron_ec.moe.methods import make_method
from megatron_ec.parallel import ParallelConfig, init_parallel, shutdown_parallel
from megatron_ec.training.distributed import wrap_ddp
from megatron_ec.training.loop import forward_backward
from tests.tiny import build_tiny, tiny_batch
from tests.tolerance import FP32_ORACLE, assert_close_scaled

PARALLEL = ParallelConfig()


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_parallel(PARALLEL, seed=3)
    yield
    shutdown_parallel()


def test_micro_batch_loss_is_added_per_micro_batch():
    model, tcfg = build_tiny(PARALLEL)
    ddp = wrap_ddp(model, tcfg)
    method = make_method("sft")
    batches = [tiny_batch(seed=0), tiny_batch(seed=1)]

    def router_grads(extra):
        ddp.zero_grad_buffer()
        method.micro_batch_loss = extra
        forward_backward(ddp, batches, method)
        return [r.weight.main_grad.clone() for r in state.ec_routers(model)]

    plain = router_grads(lambda m: None)
    # 0.5 |W|^2 per micro-batch, divided by the 2 micro-batches and summed: gradient W.
    extra = router_grads(lambda m: sum(0.5 * (r.weight ** 2).sum() for r in state.ec_routers(m)))
    for router, without, with_extra in zip(state.ec_routers(model), plain, extra):
        assert_close_scaled(with_extra - without, router.weight.detach(), FP32_ORACLE,
                            f"extra-loss gradient of layer {router.layer_index}")
