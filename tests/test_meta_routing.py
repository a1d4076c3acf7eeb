"""The routing hot path on the `meta` device: no host sync, no CPU literal (docs/DESIGN.md
"GPU discipline").

Meta tensors have shapes and dtypes but no values: `.item()`, `.tolist()`, `bool()`,
`nonzero()` and boolean-mask indexing raise, and so does mixing in a CPU tensor that is not a
scalar. Whatever runs here would run on a GPU without stalling the launch queue: `route()`,
`expert_usage()`, `update_bias()`, `ECRouter`'s forward and `end_step` (the bias update), and the
HF `RestoredGate`. Value checks stay on the host (`ECRouter.set_condensers`) or behind
`MEGATRON_EC_DEBUG_ROUTING=1`.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_ec.models.builder import RuntimeOptions
from megatron_ec.models.hf_gate import RestoredGate
from megatron_ec.moe import state
from megatron_ec.moe.methods import make_method
from megatron_ec.moe.routing import (
    DEBUG_ENV,
    RoutingConfig,
    add_placeholders,
    expert_usage,
    num_slots,
    route,
    update_bias,
)
from megatron_ec.parallel import ParallelConfig, init_parallel, shutdown_parallel
from tests.tiny import BATCH, SEQ, build_tiny, start_phase, tiny_config

META = torch.device("meta")
T, E, K = 12, 8, 3


def test_meta_refuses_value_reads():
    """The premise of this file: on meta every value read raises."""
    x = torch.ones(4, device=META)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool((x > 0).all()),
                 lambda: x.nonzero(), lambda: x[x > 0], lambda: torch.stack([x, torch.ones(4)])):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


CONFIGS = [
    dict(score_function=score, condenser_mode=mode, norm_topk_prob=norm)
    for score, mode, norm in itertools.product(("softmax", "sigmoid"), ("paper", "reference"),
                                               (False, True))
] + [dict(score_function="softmax", num_groups=4, group_topk=2, condenser_mode="paper"),
     dict(score_function="sigmoid", scaling_factor=2.5, condenser_mode="reference")]


def _meta_inputs(with_condensers: bool):
    logits_TE = torch.empty(T, E, device=META)
    bias_E = torch.empty(E, dtype=torch.float32, device=META)
    condensers_R = torch.empty(2, dtype=torch.long, device=META) if with_condensers else None
    return logits_TE, bias_E, condensers_R


@pytest.fixture(autouse=True)
def no_debug_reads(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


@pytest.mark.parametrize("with_condensers", [False, True])
@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: "-".join(map(str, f.values())))
def test_route_usage_and_bias_update_run_on_meta(fields, with_condensers):
    cfg = RoutingConfig(num_experts=E, topk=K, **fields)
    logits_TE, bias_E, condensers_R = _meta_inputs(with_condensers)
    logits_TE.requires_grad_(True)
    probs_TE, map_TE = route(logits_TE, cfg, bias_E, condensers_R)
    assert probs_TE.device == META and map_TE.device == META
    assert probs_TE.shape == map_TE.shape == (T, E) and map_TE.dtype == torch.bool
    probs_TE.sum().backward()  # the gradient path reads no values either
    assert logits_TE.grad.shape == (T, E)

    real_T = torch.empty(T, dtype=torch.bool, device=META)
    for signal in ("soft", "hard"):
        usage_E = expert_usage(logits_TE, cfg, bias_E, token_mask_T=real_T, signal=signal,
                               condensers=condensers_R)
        assert usage_E.shape == (E,) and usage_E.device == META
    if cfg.condenser_mode == "paper" or not with_condensers:
        usage_E = expert_usage(logits_TE, cfg, bias_E, routing_map_TE=map_TE, signal="hard",
                               condensers=condensers_R)
        assert usage_E.device == META
    for direction in ("sparsify", "balance"):
        moved_E = update_bias(bias_E, usage_E, 1e-3, direction)
        assert moved_E.shape == (E,) and moved_E.dtype == torch.float32
    slots = num_slots(cfg, 2 if with_condensers else 0) + 1
    assert add_placeholders(map_TE, slots).device == META


def test_restored_gate_runs_on_meta():
    """The HF gate (evaluation): ids without `nonzero()`, condensers checked at install."""
    cfg = RoutingConfig(num_experts=E, topk=K, condenser_mode="reference")
    weight = torch.nn.Parameter(torch.empty(E, 16, device=META))
    gate = RestoredGate(weight, cfg, torch.empty(E, device=META), [1, 3], fp32_weights=False)
    logits, weights_TK, ids_TK = gate(torch.empty(2, 5, 16, device=META, dtype=torch.bfloat16))
    assert ids_TK.shape == weights_TK.shape == (10, K + 2)
    assert weights_TK.dtype == torch.bfloat16 and logits.shape == (10, E)
    with pytest.raises(ValueError, match="distinct"):
        RestoredGate(weight, cfg, None, [1, 1], fp32_weights=False)


# --- the Megatron-Core router: built on the host, moved to meta, run in a training forward -------


@pytest.fixture(scope="module")
def one_rank():
    init_parallel(ParallelConfig(), seed=7)
    yield
    shutdown_parallel()


def _meta_routers(method):
    model, _ = build_tiny(ParallelConfig(), tiny_config(), RuntimeOptions(seq_length=SEQ), method)
    for router in state.ec_routers(model):
        router.selection_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4, 0.0, 0.2]))
    start_phase(model, method)  # condensers validated and set here, on the host
    routers = state.ec_routers(model)
    for router in routers:
        router.to(META)
        router.train()
    return routers


ROUTER_METHODS = {
    "sft": dict(name="sft"),
    "bias-hard": dict(name="bias", gamma=1e-3, usage_signal="hard"),
    "condenser-paper": dict(name="condenser", num_condensers=2, gamma=1e-3),
    "condenser-reference-per-layer-r": dict(name="condenser", condenser_mode="reference",
                                            num_condensers=[1, 2], gamma=1e-3),
    "condenser-paper-replicated": dict(name="condenser", num_condensers=[1, 2], gamma=1e-3,
                                       condenser_placement="replicated"),
    "condenser-reference-replicated": dict(name="condenser", condenser_mode="reference",
                                           num_condensers=[1, 2], gamma=1e-3,
                                           condenser_placement="replicated"),
}


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("which", sorted(ROUTER_METHODS))
def test_router_forward_and_end_step_run_on_meta(one_rank, which, padding):
    fields = dict(ROUTER_METHODS[which])
    method = make_method(fields.pop("name"), **fields)
    for router in _meta_routers(method):
        assert router.selection_bias.device == META and router.condenser_ids.device == META
        hidden = torch.empty(SEQ, BATCH, router.config.hidden_size, device=META,
                             requires_grad=True)
        padding_mask = torch.empty(SEQ, BATCH, dtype=torch.bool, device=META) if padding else None
        probs, routing_map = router(hidden, padding_mask=padding_mask)
        assert probs.shape == routing_map.shape == (SEQ * BATCH, router.config.num_moe_experts)
        assert probs.device == META
        weights = router.take_condenser_weights()  # replicated placement: for the MoE layer
        assert (weights is not None) == ("replicated" in which)
        if weights is not None:
            assert weights.device == META and weights.shape[1] == router.condenser_ids.numel()
            probs = probs + weights.sum()
        probs.sum().backward()
        stats = router.step_statistics()  # what bias_update_step all-reduces
        assert stats.device == META and stats.shape == (router.config.num_moe_experts + 2,)
        router.end_step(stats)  # the bias update, last_usage, last_gate, reset
        assert router.selection_bias.device == META and router.last_gate.device == META


def test_debug_switch_turns_the_value_checks_back_on(monkeypatch):
    """MEGATRON_EC_DEBUG_ROUTING=1 reads values on any device: on meta that must raise."""
    cfg = RoutingConfig(num_experts=E, topk=K)
    logits_TE, bias_E, condensers_R = _meta_inputs(with_condensers=True)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises((RuntimeError, NotImplementedError)):
        route(logits_TE, cfg, bias_E, condensers_R)
    monkeypatch.setenv(DEBUG_ENV, "0")
    route(logits_TE, cfg, bias_E, condensers_R)
