"""ECRouter inside a GPTModel on one process: gradients, fp32 bias, when usage counts."""

from __future__ import annotations

import pytest
import torch

import dataclasses

from megatron_ec.models.builder import RuntimeOptions
from megatron_ec.moe import state
from megatron_ec.moe.methods import Method, build_method, make_method
from megatron_ec.moe.methods.saved import load_method, save_method
from megatron_ec.parallel import ParallelConfig, init_parallel, shutdown_parallel
from tests.tiny import SEQ, build_tiny, forward_loss, start_phase, tiny_batch, tiny_config

PARALLEL = ParallelConfig()


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_parallel(PARALLEL, seed=7)
    yield
    shutdown_parallel()


def build(method: Method, **runtime):
    return build_tiny(PARALLEL, tiny_config(), RuntimeOptions(seq_length=SEQ, **runtime), method)


def with_learned_bias(model):
    """Give every layer a distinct bias so condenser choice is not arbitrary."""
    for router in state.ec_routers(model):
        router.selection_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4, 0.0, 0.2]))


def capture_logits(model) -> list[torch.Tensor]:
    captured = []
    for router in state.ec_routers(model):
        gating = router.gating

        def keep(x, gating=gating):
            logits = gating(x)
            logits.retain_grad()
            captured.append(logits)
            return logits

        router.gating = keep
    return captured


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_condensers_get_gradient_on_every_token(mode):
    method = make_method("condenser", condenser_mode=mode, num_condensers=2)
    model, _ = build(method)
    with_learned_bias(model)
    start_phase(model, method)
    # the two lowest biases
    assert all(ids == [1, 3] for ids in method.decisions.condensers.values())
    logits = capture_logits(model)
    batch = tiny_batch()
    forward_loss(model, batch).backward()
    real = ~batch["padding_mask"].T.reshape(-1)  # router tokens are [s, b] flattened
    for logits_SBE in logits:
        grad_TE = logits_SBE.grad.reshape(-1, 6)[real]
        assert bool((grad_TE[:, [1, 3]] != 0).all()), "a condenser logit got no gradient"
    for router in state.ec_routers(model):
        experts = router.layer_index
        layer = model.decoder.layers[experts].mlp.experts.local_experts
        for e in (1, 3):
            assert layer[e].linear_fc1.weight.grad.abs().sum() > 0


def test_bias_stays_fp32_in_bf16_models():
    from megatron.core.transformer.module import Float16Module

    method = make_method("bias", gamma=5e-5)
    model, tcfg = build(method, precision="bf16")
    wrapped = Float16Module(tcfg, model).to(torch.bfloat16)
    routers = state.ec_routers(wrapped)
    assert all(p.dtype == torch.bfloat16 for p in model.decoder.parameters())
    for router in routers:
        assert router.selection_bias.dtype == torch.float32
        assert router.usage_accum.dtype == torch.float32
        router.selection_bias.fill_(0.1)
        router.usage_accum.copy_(torch.tensor([5.0, 1, 1, 1, 1, 1]))  # expert 0 popular
    state.bias_update_step(wrapped)
    expected = torch.tensor(0.1, dtype=torch.float32) + torch.tensor(5e-5, dtype=torch.float32)
    for router in routers:
        assert router.selection_bias[0] == expected
        assert router.selection_bias[0] != 0.1
    # the same step in bf16 is lost, so the check above can fail
    assert torch.tensor(0.1, dtype=torch.bfloat16) + 5e-5 == torch.tensor(0.1, dtype=torch.bfloat16)


def one_training_forward(model, batch):
    model.train()
    forward_loss(model, batch).backward()
    return torch.stack([r.usage_accum.clone() for r in state.ec_routers(model)])


def test_recompute_counts_usage_once_and_moves_bias_once():
    method = make_method("bias", gamma=1e-2)
    plain, _ = build(method)
    recomputed, _ = build(method, recompute="full")
    recomputed.load_state_dict(plain.state_dict())
    batch = tiny_batch()
    calls = []
    for router in state.ec_routers(recomputed):
        router.routing = _recording(router.routing, calls)
    usage_plain = one_training_forward(plain, batch)
    usage_recompute = one_training_forward(recomputed, batch)
    assert len(calls) == 4, "recompute must route every MoE layer twice (forward + backward)"
    assert usage_plain.sum() > 0
    torch.testing.assert_close(usage_recompute, usage_plain, rtol=0, atol=1e-5)
    state.bias_update_step(recomputed)
    for router in state.ec_routers(recomputed):
        moved = router.selection_bias.abs()
        assert bool(((moved == 0) | (moved == torch.tensor(1e-2))).all()), "bias moved twice"
        assert moved.max() > 0


def test_eval_never_counts_or_moves_the_bias():
    method = make_method("bias", gamma=1e-2)
    model, _ = build(method)
    model.eval()
    with torch.no_grad():
        forward_loss(model, tiny_batch())
    forward_loss(model, tiny_batch())  # eval mode with grad enabled: still not training
    model.train()
    with torch.no_grad():
        forward_loss(model, tiny_batch())
    state.bias_update_step(model)
    for router in state.ec_routers(model):
        assert router.usage_accum.sum() == 0 and bool((router.selection_bias == 0).all())


@pytest.mark.parametrize("signal", ["soft", "hard"])
def test_padding_never_counts(signal):
    method = make_method("bias", usage_signal=signal)
    model, _ = build(method)
    batch = tiny_batch()
    other = dict(batch, tokens=batch["tokens"].clone())
    other["tokens"][batch["padding_mask"]] = 7  # change only the padded positions
    usage = one_training_forward(model, batch)
    for router in state.ec_routers(model):
        router.usage_accum.zero_()
    assert torch.equal(one_training_forward(model, other), usage)
    real_tokens = (~batch["padding_mask"]).sum().item()
    per_token = 1 if signal == "soft" else tiny_config().topk
    torch.testing.assert_close(usage.sum(dim=1), torch.full((2,), float(real_tokens * per_token)))


def test_condenser_phase_needs_a_learned_bias():
    method = make_method("condenser", num_condensers=2)
    model, _ = build(method)
    with pytest.raises(ValueError, match="bias is all zeros.*bias-phase checkpoint"):
        start_phase(model, method)
    listed = make_method("condenser", num_condensers=2, condensers={1: [4, 5], 2: [0, 2]})
    model, _ = build(listed)
    start_phase(model, listed)  # listed condensers need no bias
    assert [r.condenser_ids.tolist() for r in state.ec_routers(model)] == [[4, 5], [0, 2]]


def test_per_layer_r_and_reference_placeholders():
    method = make_method("condenser", condenser_mode="reference", num_condensers=[0, 2])
    model, tcfg = build(method)
    assert tcfg.moe_router_topk == 4  # k + max r
    with_learned_bias(model)
    start_phase(model, method)
    maps = []
    for router in state.ec_routers(model):
        router.routing = _recording(router.routing, maps)
    forward_loss(model, tiny_batch())
    assert [int(m.sum(1).unique().item()) for m in maps] == [4, 4]
    assert method.decisions.condensers == {1: [], 2: [1, 3]}


def _recording(routing, sink):
    def wrapped(logits, padding_mask=None):
        probs, routing_map = routing(logits, padding_mask)
        sink.append(routing_map)
        return probs, routing_map
    return wrapped


def test_partial_condenser_list_is_filled_from_the_bias():
    method = make_method("condenser", num_condensers=2, condensers={2: [0, 5]})
    model, _ = build(method)
    with_learned_bias(model)
    chosen = start_phase(model, method)
    assert chosen.decisions.condensers == {1: [1, 3], 2: [0, 5]}  # layer 1 from the bias, 2 listed
    assert [r.condenser_ids.tolist() for r in state.ec_routers(model)] == [[1, 3], [0, 5]]
    # The starting checkpoint's J is kept for unlisted layers (J is fixed once chosen).
    source = make_method("condenser", decisions={"condensers": {1: [2, 4], 2: [1, 3]}})
    carried = start_phase(model, make_method("condenser", condensers={2: [0, 5]}), source)
    assert carried.decisions.condensers == {1: [2, 4], 2: [0, 5]}


@pytest.mark.parametrize("listed, message", [
    ({0: [1, 2]}, r"method.condensers\[0\]=\[1, 2\]: layer 0 is not a MoE layer"),
    ({1: [1]}, r"lists 1 experts but method.num_condensers gives r=2"),
    ({1: [1, 6]}, r"expert ids must be distinct and in \[0, 6\)"),
    ({1: [3, 3]}, r"expert ids must be distinct"),
])
def test_listed_condensers_are_validated(listed, message):
    method = make_method("condenser", num_condensers=2, condensers=listed)
    model, _ = build(method)
    with_learned_bias(model)
    with pytest.raises(ValueError, match=message):
        start_phase(model, method)


def _recording_logits(router, sink):
    routing = router.routing

    def wrapped(logits, padding_mask=None):
        probs, routing_map = routing(logits, padding_mask)
        sink.append((logits.detach().reshape(-1, logits.shape[-1]), probs, routing_map))
        return probs, routing_map
    router.routing = wrapped


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_persistent_path_ablation_is_plain_biased_topk(mode):
    """Paper Sec. 6.3: without the forcing, layer routing = top-k of s + b, nothing else changed."""
    method = make_method("condenser", condenser_mode=mode, num_condensers=2)
    model, _ = build(method)
    with_learned_bias(model)
    start_phase(model, method)
    router = state.ec_routers(model)[1]  # layer 2, condensers [1, 3]
    cfg, bias_E = router.routing_cfg, router.selection_bias.clone()
    assert cfg.score_function == "softmax" and cfg.scaling_factor == 1.0  # the oracle below
    records = []
    _recording_logits(router, records)
    model.eval()
    ablated = dataclasses.replace(method.config, force_condensers=False)
    build_method(ablated, method.decisions).apply(model)
    with torch.no_grad():
        forward_loss(model, tiny_batch())
    (logits_TE, probs_TE, routing_map_TE), = records
    assert torch.equal(router.selection_bias, bias_E)

    # Independent oracle: plain top-k on the biased logits, gates from softmax of the unbiased
    # (paper) or biased (reference) logits, renormalised over the k experts iff the family does.
    k = cfg.topk
    ids_TK = torch.topk(logits_TE + bias_E, k, dim=-1).indices
    assert not torch.equal(ids_TK.sort(-1).values,
                           torch.topk(logits_TE, k, dim=-1).indices.sort(-1).values), \
        "the bias must change some selections, or the test cannot see it applied"
    gate_logits_TE = logits_TE + bias_E if mode == "reference" else logits_TE
    gates_TK = torch.softmax(gate_logits_TE, dim=-1).gather(1, ids_TK)
    if cfg.norm_topk_prob:
        gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
    expected_TE = torch.zeros_like(probs_TE).scatter(1, ids_TK, gates_TK)

    selected_TE = probs_TE != 0  # placeholder slots (reference mode) carry exactly zero weight
    assert torch.equal(selected_TE, expected_TE != 0), "selection is not top-k of s + b"
    assert torch.equal(routing_map_TE & selected_TE, selected_TE)
    assert bool((routing_map_TE.sum(-1) == router.slots).all())  # dispatcher slot count kept
    torch.testing.assert_close(probs_TE, expected_TE, rtol=1e-6,
                               atol=1e-6 * float(expected_TE.abs().max()))


def test_metrics_report_bias_gini_and_condensers():
    method = make_method("condenser", num_condensers=2, gamma=1e-3)
    model, _ = build(method)
    with_learned_bias(model)
    start_phase(model, method)
    one_training_forward(model, tiny_batch())
    state.bias_update_step(model)
    metrics = state.routing_metrics(model)
    for layer in (1, 2):
        prefix = f"routing/layer{layer}"
        assert metrics[f"{prefix}/condensers"] == [1, 3]
        assert 0 < metrics[f"{prefix}/condenser_gate"] < 1
        assert 0 <= metrics[f"{prefix}/usage_gini"] < 1
        assert metrics[f"{prefix}/bias_min"] <= metrics[f"{prefix}/bias_mean"] <= metrics[f"{prefix}/bias_max"]


def test_method_state_round_trip(tmp_path):
    method = make_method("condenser", condenser_mode="reference", gamma=5e-5,
                         num_condensers=[1, 2], condensers={1: [3], 2: [0, 5]},
                         decisions={"condensers": {1: [3], 2: [0, 5]}})
    save_method(tmp_path, method)
    assert load_method(tmp_path) == method
    with pytest.raises(ValueError, match="direction"):
        make_method("bias", direction="sideways")
    with pytest.raises(ValueError, match="one r per MoE layer"):
        method.config.condensers_for([1, 2, 3])
