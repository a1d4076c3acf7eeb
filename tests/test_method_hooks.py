"""The trainer's per-micro-batch method hook: `micro_batch_loss` reaches the gradients; SFT's aux
loss goes through the seam (coefficient, linearity, = the Switch formula computed naively)."""

from __future__ import annotations

import pytest
import torch

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


def _switch_aux_loss(h_TH, weight_EH, real_T, topk: int, coeff: float):
    """The Switch load-balancing loss of one layer and micro-batch from its formula, real tokens
    only: coeff * E * sum_e f_e P_e, f_e = (tokens that chose e) / (T k) (no gradient),
    P_e = mean over tokens of softmax(logits)_e."""
    p_TE = torch.softmax((h_TH[real_T].double() @ weight_EH.double().T), dim=-1)
    chosen_TE = torch.zeros_like(p_TE).scatter(1, p_TE.topk(topk, dim=-1).indices, 1.0)
    num_tokens, num_experts = p_TE.shape
    f_E = chosen_TE.sum(dim=0) / (num_tokens * topk)
    return coeff * num_experts * (f_E * p_TE.mean(dim=0)).sum()


def _naive_aux_gradients(weights, coeff: float, batches):
    """d(mean over micro-batches of the per-layer Switch losses, summed over layers) / d(router
    weights) through the whole model (later layers' losses reach earlier routers through the
    hidden states), on a plain SFT model."""
    from tests.tiny import tiny_config

    model, _ = build_tiny(PARALLEL, tiny_config(aux_loss_coeff=coeff), method=make_method("sft"))
    model.load_state_dict(weights)
    model.train()
    routers = state.ec_routers(model)
    inputs = []
    hooks = [r.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for r in routers]
    total = 0.0
    for batch in batches:
        inputs.clear()
        model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
              labels=batch["labels"], padding_mask=batch["padding_mask"])
        real_T = ~batch["padding_mask"].T.reshape(-1)  # [S, B] flattened, as the router sees
        for h_SBH, router in zip(inputs, routers):
            total = total + _switch_aux_loss(h_SBH.reshape(-1, h_SBH.shape[-1]), router.weight,
                                             real_T, tiny_config().topk, coeff)
    for hook in hooks:
        hook.remove()
    return torch.autograd.grad(total / len(batches), [r.weight for r in routers])


def test_sft_aux_loss_equals_the_switch_formula():
    """The router-weight gradients that `aux_loss: true` adds are those of the per-layer Switch
    loss (Megatron-Core's `switch_load_balancing_loss_func`) from a naive float64 formula,
    summed over the MoE layers and averaged over the step's micro-batches, padding excluded."""
    from tests.tiny import tiny_config

    coeff, batches = 0.1, [tiny_batch(seed=7), tiny_batch(seed=8)]
    grads = {}
    for aux_loss in (False, True):
        method = make_method("sft", aux_loss=aux_loss)
        model, tcfg = build_tiny(PARALLEL, tiny_config(aux_loss_coeff=coeff), method=method)
        if aux_loss:
            model.load_state_dict(weights)
        weights = model.state_dict()
        ddp = wrap_ddp(model, tcfg)
        ddp.zero_grad_buffer()
        forward_backward(ddp, batches, method)
        grads[aux_loss] = [r.weight.main_grad.clone() for r in state.ec_routers(model)]
    wants = _naive_aux_gradients(weights, coeff, batches)
    assert len(wants) == len(grads[True]) > 1
    for index, want in enumerate(wants):
        got = grads[True][index] - grads[False][index]
        assert want.abs().max() > 0
        assert_close_scaled(got, want.float(), FP32_ORACLE, f"aux gradient of router {index}")
