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


def test_sft_aux_loss_reaches_the_router_gradient():
    """SFT with `aux_loss`: the family's coefficient enters through `aux_loss_coeff` (Megatron-
    Core's load-balancing loss); the router gradient changes, linearly in the coefficient."""
    from tests.tiny import tiny_config

    batches = [tiny_batch(seed=4), tiny_batch(seed=5)]

    def router_grads(coeff, aux_loss, weights=None):
        method = make_method("sft", aux_loss=aux_loss)
        model, tcfg = build_tiny(PARALLEL, tiny_config(aux_loss_coeff=coeff), method=method)
        assert tcfg.moe_aux_loss_coeff == (coeff if aux_loss else 0.0)
        if weights is not None:
            model.load_state_dict(weights)
        ddp = wrap_ddp(model, tcfg)
        ddp.zero_grad_buffer()
        forward_backward(ddp, batches, method)
        return model.state_dict(), [r.weight.main_grad.clone() for r in state.ec_routers(model)]

    weights, without = router_grads(0.1, aux_loss=False)
    _, with_aux = router_grads(0.1, aux_loss=True, weights=weights)
    _, with_double = router_grads(0.2, aux_loss=True, weights=weights)
    for layer, (plain, aux, double) in enumerate(zip(without, with_aux, with_double)):
        delta = aux - plain
        assert delta.abs().max() > 1e-3 * plain.abs().max(), f"layer {layer}: aux had no effect"
        assert_close_scaled(double - plain, 2 * delta, FP32_ORACLE, f"layer {layer}: 2 x coeff")
