"""Oracle tests for megatron_ec.moe.esft (METHODS.md §4).

The score oracle is a per-token, per-expert Python loop in float64 written from METHODS.md §0 and
§4: it computes the family's gate weights from the logits itself and skips padding tokens. The
implementation goes through `routing.route` (fp32) and the micro-batch accumulators, so the
comparison also covers the accumulation.
"""

import json
import math

import pytest
import torch

from megatron_ec.moe.esft import (
    DEFAULT_TOP_P,
    expert_row_freeze,
    experts_from_record,
    local_trainable_experts,
    score_sums,
    scores_from_sums,
    select_experts,
    select_experts_per_layer,
    selection_record,
)
from megatron_ec.moe.routing import RoutingConfig, route
from tests.tolerance import FP32_ORACLE, FP64_ORACLE, assert_close_scaled

NUM_TOKENS, NUM_EXPERTS, TOPK = 24, 8, 3


def oracle_scores(logits, token_mask, score_function, norm_topk_prob, scaling_factor):
    """(ES-Token, ES-Gate) lists of one layer: loops over real tokens and experts, float64."""
    counts = [0.0] * NUM_EXPERTS
    gates = [0.0] * NUM_EXPERTS
    num_real = 0
    for t in range(logits.shape[0]):
        if not token_mask[t]:
            continue
        num_real += 1
        s = [float(v) for v in logits[t].double()]
        if score_function == "softmax":
            total = sum(math.exp(v) for v in s)
            p = [math.exp(v) / total for v in s]
        else:
            p = [1.0 / (1.0 + math.exp(-v)) for v in s]
        chosen = sorted(range(NUM_EXPERTS), key=lambda e: -p[e])[:TOPK]
        mass = sum(p[e] for e in chosen) if norm_topk_prob else 1.0
        for e in chosen:
            counts[e] += 1.0 / TOPK
            gates[e] += p[e] / mass * scaling_factor
    return [c / num_real for c in counts], [g / num_real for g in gates]


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = 1.3 * torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=gen)
    token_mask = torch.rand(NUM_TOKENS, generator=gen) > 0.3
    # Padding rows get extreme logits on expert 0: counting them would change every score.
    logits[~token_mask, 0] += 20.0
    return logits, token_mask


@pytest.mark.parametrize(
    "score_function,norm_topk_prob,scaling_factor",
    [
        ("softmax", False, 1.0),
        ("softmax", True, 1.0),
        ("sigmoid", True, 2.5),
        ("sigmoid", False, 1.0),
    ],
)
def test_scores_match_loop_oracle_over_real_tokens(score_function, norm_topk_prob, scaling_factor):
    logits, token_mask = make_batch()
    cfg = RoutingConfig(NUM_EXPERTS, TOPK, score_function=score_function,
                        norm_topk_prob=norm_topk_prob, scaling_factor=scaling_factor)
    half = NUM_TOKENS // 2
    sums = sum(
        score_sums(*route(logits[part], cfg), token_mask[part])
        for part in (slice(0, half), slice(half, None))
    )
    token_E, gate_E = scores_from_sums(sums)
    want_token, want_gate = oracle_scores(logits, token_mask, score_function, norm_topk_prob,
                                          scaling_factor)
    f64 = torch.float64
    assert_close_scaled(token_E, torch.tensor(want_token, dtype=f64), FP64_ORACLE, "ES-Token")
    assert_close_scaled(gate_E, torch.tensor(want_gate, dtype=f64), FP32_ORACLE, "ES-Gate")
    assert float(token_E.sum()) == pytest.approx(1.0, abs=1e-15)


def test_scores_are_normalised_per_layer_not_across_layers():
    """Two layers with very different token counts: each row is normalised on its own."""
    cfg = RoutingConfig(NUM_EXPERTS, TOPK)
    rows = []
    for seed, num_tokens in ((0, 5), (1, 40)):
        logits = torch.randn(num_tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(seed))
        rows.append(score_sums(*route(logits, cfg)))
    token_LE, gate_LE = scores_from_sums(torch.stack(rows))
    alone = [scores_from_sums(row) for row in rows]
    for layer in range(2):
        assert torch.equal(token_LE[layer], alone[layer][0])
        assert torch.equal(gate_LE[layer], alone[layer][1])
    assert torch.allclose(token_LE.sum(dim=-1), torch.ones(2, dtype=torch.float64), atol=1e-15)


def test_rank_sums_add_up_to_the_global_score():
    """Per-rank accumulators summed (what one SUM all-reduce does) give the one-batch score."""
    logits, token_mask = make_batch(seed=3)
    cfg = RoutingConfig(NUM_EXPERTS, TOPK, norm_topk_prob=True)
    whole = score_sums(*route(logits, cfg), token_mask)
    ranks = [score_sums(*route(logits[r::4], cfg), token_mask[r::4]) for r in range(4)]
    reduced = torch.stack(ranks).sum(dim=0)
    assert torch.equal(reduced[: NUM_EXPERTS], whole[: NUM_EXPERTS])  # integer counts: exact
    assert torch.equal(reduced[-1:], whole[-1:])
    assert_close_scaled(scores_from_sums(reduced)[1], scores_from_sums(whole)[1], FP64_ORACLE,
                        "ES-Gate from rank sums")


def test_a_layer_without_real_tokens_is_an_error():
    cfg = RoutingConfig(NUM_EXPERTS, TOPK)
    logits = torch.randn(4, NUM_EXPERTS)
    sums = score_sums(*route(logits, cfg), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no real tokens"):
        scores_from_sums(sums)


# ---------------------------------------------------------------------------------------------
# Selection (hand-made cases: binary fractions, so every cumulative sum is exact).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores,top_p,expected",
    [
        ([0.5, 0.25, 0.125, 0.125], 0.75, [0, 1]),  # exact hit: stops at the expert reaching it
        ([0.5, 0.25, 0.125, 0.125], 0.7, [0, 1]),  # the crossing expert is included
        ([0.5, 0.25, 0.125, 0.125], 0.5, [0]),
        ([0.125, 0.25, 0.5, 0.125], 0.8, [2, 1, 0]),  # order is by score, not by id
        ([0.25, 0.25, 0.25, 0.25], 0.3, [0, 1]),  # ties: lower id first
        ([0.125, 0.375, 0.375, 0.125], 0.5, [1, 2]),
        ([0.125, 0.375, 0.375, 0.125], 0.85, [1, 2, 0]),  # tie at 0.125: 0 before 3
        ([0.5, 0.25, 0.25, 0.0], 1.0, [0, 1, 2]),  # top_p = 1: exact hit, the zero is left out
        ([0.25, 0.0625, 0.0625, 0.0], 1.0, [0, 1, 2, 3]),  # never reaches top_p: all experts
    ],
)
def test_selection_includes_the_crossing_expert(scores, top_p, expected):
    assert select_experts(torch.tensor(scores, dtype=torch.float64), top_p) == expected


def test_selection_is_per_layer_and_rejects_bad_top_p():
    scores_LE = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]], dtype=torch.float64)
    assert select_experts_per_layer(scores_LE, 0.6) == [[0, 1], [2]]
    for top_p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            select_experts(scores_LE[0], top_p)
    assert DEFAULT_TOP_P == {"token": 0.2, "gate": 0.1}


def test_selection_record_is_json_and_round_trips():
    record = selection_record({1: [5, 2], 3: [0]}, "token", 0.2)
    text = json.dumps(record)
    assert json.loads(text) == {
        "experts": {"1": [2, 5], "3": [0]}, "shared_experts": False,
        "non_expert_modules": False, "score_function": "token", "top_p": 0.2,
    }
    assert experts_from_record(json.loads(text), NUM_EXPERTS) == {1: [2, 5], 3: [0]}
    with pytest.raises(ValueError, match="distinct"):
        experts_from_record({"experts": {"0": [1, 1]}}, NUM_EXPERTS)
    with pytest.raises(ValueError, match="score_function"):
        selection_record({}, "mag", 0.2)


# ---------------------------------------------------------------------------------------------
# Placement under expert parallelism.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_placement_is_contiguous(ep_size):
    selected = [1, 2, 5, 7]
    num_local = NUM_EXPERTS // ep_size
    owned = []
    for rank in range(ep_size):
        local = local_trainable_experts(selected, NUM_EXPERTS, rank, ep_size)
        # Oracle: rank r holds the global ids r * n_local ... (r + 1) * n_local - 1, in order.
        block = list(range(rank * num_local, (rank + 1) * num_local))
        assert local == [block.index(g) for g in selected if g in block]
        owned += [rank * num_local + i for i in local]
    assert sorted(owned) == selected  # every selected expert trains on exactly one rank


def test_placement_hand_case_ep4():
    """E = 8, EP = 4 (2 local experts per rank); the g // EP rule of a public port would differ."""
    per_rank = [local_trainable_experts([1, 2, 7], 8, rank, 4) for rank in range(4)]
    assert per_rank == [[1], [0], [], [1]]
    with pytest.raises(ValueError, match="divide"):
        local_trainable_experts([0], 8, 0, 3)
    with pytest.raises(ValueError, match="outside"):
        local_trainable_experts([8], 8, 0, 2)


# ---------------------------------------------------------------------------------------------
# Freezing inside a fused expert tensor.
# ---------------------------------------------------------------------------------------------

NUM_LOCAL, FFN, HIDDEN = 4, 3, 5


def train_fused(param, freeze, steps, restore):
    """AdamW with weight decay on a fused weight, random grads masked by the freeze."""
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.1)
    snapshot = freeze.snapshot(param)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        param.grad = freeze.mask_grad(torch.randn(param.shape, generator=gen))
        optimizer.step()
        if restore:
            freeze.restore_(param, snapshot)


@pytest.mark.parametrize("dim", [0, 1])
def test_adamw_with_weight_decay_leaves_frozen_experts_bitwise(dim):
    shape = [NUM_LOCAL * FFN, HIDDEN] if dim == 0 else [HIDDEN, NUM_LOCAL * 2 * FFN]
    param = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    before = param.detach().clone()
    freeze = expert_row_freeze([1, 3], NUM_LOCAL, shape[dim], dim=dim)
    train_fused(param, freeze, steps=3, restore=True)
    for expert, blocks in enumerate(before.chunk(NUM_LOCAL, dim=dim)):
        after = param.detach().chunk(NUM_LOCAL, dim=dim)[expert]
        assert torch.equal(after, blocks) == (expert in (0, 2)), f"expert {expert}"


def test_grad_mask_alone_does_not_stop_weight_decay():
    """Why the helper restores rows: zero grads, yet AdamW's decoupled decay moves them."""
    param = torch.nn.Parameter(torch.randn(NUM_LOCAL * FFN, HIDDEN))
    before = param.detach().clone()
    freeze = expert_row_freeze([0], NUM_LOCAL, NUM_LOCAL * FFN)
    grad = freeze.mask_grad(torch.randn(param.shape))
    assert torch.equal(grad[FFN:], torch.zeros_like(grad[FFN:]))
    train_fused(param, freeze, steps=1, restore=False)
    assert not torch.equal(param.detach()[FFN:], before[FFN:])
