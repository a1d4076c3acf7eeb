"""Oracle tests for megatron_ec.moe.routing.

The oracles below are written from the paper's equations (Eq. 2-3, 6) and METHODS.md §0-3 as
per-token Python loops over sorted lists and explicit sums, in float64. They never call route()
or its pieces, so a shared mistake cannot hide.
"""

import math

import pytest
import torch

from megatron_ec.moe.routing import (
    RoutingConfig,
    expert_usage,
    gini,
    num_slots,
    route,
    select_condensers,
    update_bias,
)

NUM_TOKENS, NUM_EXPERTS, TOPK = 8, 10, 4
CONDENSERS = [1, 6]
SCORE_FUNCTIONS = ["softmax", "sigmoid", "softmax_topk"]
# name -> (condenser_mode, condensers); "none_*" route without condensers.
CONDENSER_CASES = {
    "none_paper": ("paper", None),
    "none_reference": ("reference", None),
    "paper": ("paper", CONDENSERS),
    "reference": ("reference", CONDENSERS),
}


# ---------------------------------------------------------------------------------------------
# Naive oracle.
# ---------------------------------------------------------------------------------------------


def oracle_key(s, b, cfg):
    """Selection key of one expert (Eq. 6; sigmoid families add b to the score)."""
    if cfg.score_function == "sigmoid":
        return 1.0 / (1.0 + math.exp(-s)) + b
    return s + b


def oracle_dynamic_selection(key, cfg, condensers):
    """Top-k picks of one token: paper mode ranks experts outside J only, for k - r picks."""
    excluded = set(condensers) if cfg.condenser_mode == "paper" else set()
    pool = [e for e in range(cfg.num_experts) if e not in excluded]
    if cfg.num_groups is not None:
        size = cfg.num_experts // cfg.num_groups
        group_scores = []
        for g in range(cfg.num_groups):
            group_scores.append(max((key[e] for e in pool if e // size == g), default=-math.inf))
        kept = sorted(range(cfg.num_groups), key=lambda g: -group_scores[g])[: cfg.group_topk]
        pool = [e for e in pool if e // size in kept]
    return sorted(pool, key=lambda e: -key[e])[: cfg.topk - len(excluded)]


def oracle_gate_weights(z, slots, cfg):
    """Gate weight of every slot from per-expert score logits z (0-d float64 tensors)."""
    if cfg.score_function == "softmax":
        denominator = sum(torch.exp(z_e) for z_e in z)
        weights = [torch.exp(z[e]) / denominator for e in slots]
    elif cfg.score_function == "sigmoid":
        weights = [1.0 / (1.0 + torch.exp(-z[e])) for e in slots]
    else:
        denominator = sum(torch.exp(z[e]) for e in slots)
        weights = [torch.exp(z[e]) / denominator for e in slots]
    if cfg.norm_topk_prob:
        total = sum(weights)
        weights = [w / total for w in weights]
    return [w * cfg.scaling_factor for w in weights]


def oracle_route(logits, cfg, bias=None, condensers=None):
    """Returns (probs float64 [T, E] differentiable w.r.t. logits, routing_map, num duplicates)."""
    num_tokens, num_experts = logits.shape
    bias_list = [0.0] * num_experts if bias is None else bias.tolist()
    forced = list(condensers or [])
    biased_weights = cfg.condenser_mode == "reference"
    logits64 = logits.double()
    prob_rows, map_rows, num_duplicates = [], [], 0
    for t in range(num_tokens):
        s = logits64[t].tolist()
        key = [oracle_key(s[e], bias_list[e], cfg) for e in range(num_experts)]
        slots = oracle_dynamic_selection(key, cfg, forced) + forced
        z = [logits64[t, e] + (bias_list[e] if biased_weights else 0.0) for e in range(num_experts)]
        weights = oracle_gate_weights(z, slots, cfg)
        row = [torch.zeros((), dtype=torch.float64) for _ in range(num_experts)]
        for w, slot in zip(weights, slots):
            row[slot] = row[slot] + w  # a duplicated condenser adds both of its weights
        prob_rows.append(torch.stack(row))
        chosen = set(slots)
        num_duplicates += len(slots) - len(chosen)
        while len(chosen) < len(slots):
            chosen.add(min(set(range(num_experts)) - chosen))
        map_rows.append([e in chosen for e in range(num_experts)])
    return torch.stack(prob_rows), torch.tensor(map_rows), num_duplicates


# ---------------------------------------------------------------------------------------------
# Shared inputs.
# ---------------------------------------------------------------------------------------------


def make_logits(seed=0, num_tokens=NUM_TOKENS, num_experts=NUM_EXPERTS):
    """Tie-free fp32 logits; expert 1 (a condenser) is boosted on even tokens so that reference
    mode also picks it dynamically there (a duplicate slot)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(num_tokens, num_experts, generator=gen)
    logits[::2, 1] += 4.0
    return logits.requires_grad_()


def make_bias(seed=1, num_experts=NUM_EXPERTS):
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(num_experts, generator=gen)


def make_config(score_function="softmax", case="none_paper", **kwargs):
    mode, condensers = CONDENSER_CASES[case]
    cfg = RoutingConfig(
        NUM_EXPERTS, TOPK, score_function=score_function, condenser_mode=mode, **kwargs
    )
    return cfg, condensers


def grad_of_weighted_sum(probs, logits, seed=2):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(probs.shape, generator=gen).to(probs.dtype)  # same draw for fp32 and fp64
    (grad,) = torch.autograd.grad((probs * weights).sum(), logits)
    return grad


MATRIX = pytest.mark.parametrize(
    "score_function,case,norm_topk_prob,scaling_factor,with_bias",
    [
        (score_function, case, norm, scale, with_bias)
        for score_function in SCORE_FUNCTIONS
        for case in CONDENSER_CASES
        for norm in (False, True)
        for scale in (1.0, 2.5)
        for with_bias in (False, True)
    ],
)


# ---------------------------------------------------------------------------------------------
# route(): values, gradients, map.
# ---------------------------------------------------------------------------------------------


@MATRIX
def test_route_probs_match_oracle(score_function, case, norm_topk_prob, scaling_factor, with_bias):
    cfg, condensers = make_config(
        score_function, case, norm_topk_prob=norm_topk_prob, scaling_factor=scaling_factor
    )
    logits, bias = make_logits(), make_bias() if with_bias else None
    probs, _ = route(logits, cfg, bias, condensers)
    expected, _, num_duplicates = oracle_route(logits, cfg, bias, condensers)
    if case == "reference":
        assert num_duplicates > 0  # the duplicate-condenser path is exercised
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), expected.detach(), atol=1e-6, rtol=1e-6)


@MATRIX
def test_route_router_grads_match_oracle(
    score_function, case, norm_topk_prob, scaling_factor, with_bias
):
    cfg, condensers = make_config(
        score_function, case, norm_topk_prob=norm_topk_prob, scaling_factor=scaling_factor
    )
    logits, bias = make_logits(), make_bias() if with_bias else None
    logits64 = logits.detach().double().requires_grad_()
    grad = grad_of_weighted_sum(route(logits, cfg, bias, condensers)[0], logits)
    expected = grad_of_weighted_sum(oracle_route(logits64, cfg, bias, condensers)[0], logits64)
    torch.testing.assert_close(grad.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", list(CONDENSER_CASES))
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_routing_map_matches_oracle(score_function, case, with_bias):
    cfg, condensers = make_config(score_function, case)
    logits, bias = make_logits(), make_bias() if with_bias else None
    _, routing_map = route(logits, cfg, bias, condensers)
    assert torch.equal(routing_map, oracle_route(logits, cfg, bias, condensers)[1])


@pytest.mark.parametrize("case", list(CONDENSER_CASES))
def test_routing_map_row_sums_equal_num_slots(case):
    cfg, condensers = make_config("softmax", case)
    _, routing_map = route(make_logits(), cfg, make_bias(), condensers)
    expected = num_slots(cfg, len(condensers or []))
    assert routing_map.dtype == torch.bool
    assert routing_map.sum(dim=1).tolist() == [expected] * NUM_TOKENS


@pytest.mark.parametrize("mode,expected", [("paper", TOPK), ("reference", TOPK + 2)])
def test_num_slots(mode, expected):
    cfg = RoutingConfig(NUM_EXPERTS, TOPK, condenser_mode=mode)
    assert num_slots(cfg, 2) == expected
    assert num_slots(cfg, 0) == TOPK


@pytest.mark.parametrize("case", ["paper", "reference"])
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_condenser_columns_selected_on_every_token(score_function, case):
    cfg, condensers = make_config(score_function, case)
    _, routing_map = route(make_logits(), cfg, make_bias(), condensers)
    assert bool(routing_map[:, condensers].all())


@pytest.mark.parametrize("case", ["paper", "reference"])
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_condenser_probs_send_router_gradient_on_every_token(score_function, case, norm_topk_prob):
    cfg, condensers = make_config(score_function, case, norm_topk_prob=norm_topk_prob)
    logits = make_logits()
    probs, _ = route(logits, cfg, make_bias(), condensers)
    for condenser in condensers:
        (grad,) = torch.autograd.grad(probs[:, condenser].sum(), logits, retain_graph=True)
        assert bool((grad.abs().sum(dim=1) > 0).all())


def duplicate_case():
    """Token 0 ranks condenser 0 first, so reference mode gives it two slots."""
    cfg = RoutingConfig(6, 2, condenser_mode="reference")
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.0, 0.5, -1.0]], requires_grad=True)
    return cfg, logits, [0, 3]


def test_reference_duplicate_condenser_weights_are_summed():
    cfg, logits, condensers = duplicate_case()
    probs, routing_map = route(logits, cfg, None, condensers)
    p = torch.softmax(logits.detach()[0].double(), dim=0)
    # slots: dynamic {0, 2} ++ J [0, 3]; placeholder = 1, the lowest id not otherwise selected.
    assert routing_map[0].tolist() == [True, True, True, True, False, False]
    torch.testing.assert_close(probs[0, 0].double(), 2 * p[0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(probs[0, 2].double(), p[2], atol=1e-7, rtol=1e-6)


def test_reference_placeholder_has_zero_weight_and_no_gradient():
    cfg, logits, condensers = duplicate_case()
    probs, routing_map = route(logits, cfg, None, condensers)
    assert bool(routing_map[0, 1]) and probs[0, 1].item() == 0.0
    (grad,) = torch.autograd.grad(probs[0, 1], logits)
    assert bool((grad == 0).all())


def test_softmax_topk_weights_in_both_condenser_modes():
    """GPT-OSS routing with a bias, by hand: paper mode softmaxes the UNBIASED logits of its k
    slots (J first picked); reference mode softmaxes the BIASED logits of its k + r slots, a
    condenser picked twice counted twice in the denominator and its two weights summed."""
    s = torch.tensor([[3.0, 1.0, 2.5, 0.0, -1.0, 0.5]], requires_grad=True)
    b = torch.tensor([0.0, 0.0, 0.0, 3.5, 0.0, 0.0])
    z = (s + b).detach()[0].double()
    paper = RoutingConfig(6, 2, score_function="softmax_topk", condenser_mode="paper")
    probs, _ = route(s, paper, b, [4])  # J = {4}; dynamic top-1 of key s + b: expert 3
    ref = torch.softmax(s.detach()[0, [3, 4]].double(), dim=0)
    torch.testing.assert_close(probs[0, [3, 4]].double(), ref, atol=1e-7, rtol=1e-6)
    reference = RoutingConfig(6, 2, score_function="softmax_topk", condenser_mode="reference")
    probs, routing_map = route(s, reference, b, [0, 4])  # top-2 of key: {0, 3} ++ J [0, 4]
    denominator = 2 * z[0].exp() + z[3].exp() + z[4].exp()
    torch.testing.assert_close(probs[0, 0].double(), 2 * z[0].exp() / denominator)
    torch.testing.assert_close(probs[0, 3].double(), z[3].exp() / denominator)
    assert routing_map[0].sum().item() == 4 and probs[0].sum().item() == pytest.approx(1.0)


def test_route_casts_low_precision_logits_to_fp32():
    cfg, condensers = make_config("softmax", "paper")
    probs, _ = route(make_logits().detach().bfloat16(), cfg, make_bias(), condensers)
    assert probs.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Group-limited selection (DeepSeek-V2 group_limited_greedy).
# ---------------------------------------------------------------------------------------------


def grouped_config(score_function, case):
    mode, condensers = CONDENSER_CASES[case]
    cfg = RoutingConfig(
        12, 4, score_function=score_function, condenser_mode=mode, num_groups=4, group_topk=2
    )
    return cfg, condensers


@pytest.mark.parametrize("case", list(CONDENSER_CASES))
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_group_limited_selection_matches_naive_loop(score_function, case):
    cfg, condensers = grouped_config(score_function, case)
    logits, bias = make_logits(seed=3, num_experts=12), make_bias(seed=4, num_experts=12)
    probs, routing_map = route(logits, cfg, bias, condensers)
    expected_probs, expected_map, _ = oracle_route(logits, cfg, bias, condensers)
    assert torch.equal(routing_map, expected_map)
    torch.testing.assert_close(probs.double(), expected_probs.detach(), atol=1e-6, rtol=1e-6)


def test_group_limit_changes_the_selection():
    """Guards the group test above: on these logits the group limit does change some picks."""
    grouped, _ = grouped_config("softmax", "none_paper")
    plain = RoutingConfig(12, 4)
    logits = make_logits(seed=3, num_experts=12)
    assert not torch.equal(route(logits, grouped)[1], route(logits, plain)[1])


# ---------------------------------------------------------------------------------------------
# expert_usage().
# ---------------------------------------------------------------------------------------------


def padded_logits(seed=5):
    """Logits whose last two tokens are padding holding NaN (they must never count)."""
    logits = make_logits(seed).detach().clone()
    logits[-2:] = float("nan")
    logits.requires_grad_()
    token_mask = torch.ones(NUM_TOKENS, dtype=torch.bool)
    token_mask[-2:] = False
    return logits, token_mask


@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_soft_usage_matches_loop_and_skips_padding(score_function):
    cfg, _ = make_config(score_function)
    logits, token_mask = padded_logits()
    bias = make_bias()
    usage = expert_usage(logits, cfg, bias, token_mask_T=token_mask, signal="soft")
    expected = [0.0] * NUM_EXPERTS
    for t in range(NUM_TOKENS):
        if not token_mask[t]:
            continue
        z = [logits[t, e].item() + bias[e].item() for e in range(NUM_EXPERTS)]
        if score_function == "sigmoid":
            scores = [1.0 / (1.0 + math.exp(-v)) for v in z]
        else:
            scores = [math.exp(v) for v in z]
        for e in range(NUM_EXPERTS):
            expected[e] += scores[e] / sum(scores)
    assert usage.dtype == torch.float32 and usage.grad_fn is None
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(usage.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", list(CONDENSER_CASES))
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_hard_usage_matches_loop_and_skips_padding(score_function, case):
    cfg, condensers = make_config(score_function, case)
    logits, token_mask = padded_logits()
    bias = make_bias()
    usage = expert_usage(
        logits, cfg, bias, token_mask_T=token_mask, signal="hard", condensers=condensers
    )
    expected = [0.0] * NUM_EXPERTS
    for t in range(NUM_TOKENS):
        if token_mask[t]:
            key = [oracle_key(logits[t, e].item(), bias[e].item(), cfg) for e in range(NUM_EXPERTS)]
            for e in oracle_dynamic_selection(key, cfg, condensers or []):
                expected[e] += 1.0
    assert usage.tolist() == expected


@pytest.mark.parametrize("case", ["none_paper", "none_reference", "paper"])
def test_hard_usage_from_routing_map_equals_recomputed(case):
    cfg, condensers = make_config("softmax", case)
    logits, token_mask = padded_logits()
    _, routing_map = route(logits.detach().nan_to_num(), cfg, make_bias(), condensers)
    from_map = expert_usage(logits, cfg, make_bias(), routing_map, token_mask, "hard", condensers)
    recomputed = expert_usage(logits, cfg, make_bias(), None, token_mask, "hard", condensers)
    assert torch.equal(from_map, recomputed)


@pytest.mark.parametrize("case", ["paper", "reference"])
def test_hard_usage_excludes_forced_slots_and_placeholders(case):
    cfg, condensers = make_config("softmax", case)
    logits = make_logits().detach()
    usage = expert_usage(logits, cfg, signal="hard", condensers=condensers)
    _, routing_map = route(logits, cfg, None, condensers)
    dynamic_picks = TOPK - len(condensers) if case == "paper" else TOPK
    assert usage.sum().item() == NUM_TOKENS * dynamic_picks
    assert bool((usage[condensers] < routing_map[:, condensers].sum(dim=0)).all())


def test_hard_usage_rejects_ambiguous_reference_routing_map():
    cfg, condensers = make_config("softmax", "reference")
    logits = make_logits().detach()
    _, routing_map = route(logits, cfg, None, condensers)
    with pytest.raises(ValueError, match="routing_map"):
        expert_usage(logits, cfg, routing_map_TE=routing_map, signal="hard", condensers=condensers)


# ---------------------------------------------------------------------------------------------
# update_bias().
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction,sign", [("sparsify", 1.0), ("balance", -1.0)])
def test_update_bias_matches_loop(direction, sign):
    bias = make_bias()
    usage = torch.tensor([5.0, 0.0, 3.0, 9.0, 4.0, 4.0, 1.0, 7.0, 2.0, 5.0])  # mean 4.0
    rate = 1e-3
    updated = update_bias(bias, usage, rate, direction)
    mean = sum(usage.tolist()) / len(usage)
    expected = []
    for b, u in zip(bias.tolist(), usage.tolist()):
        step = rate if u > mean else -rate if u < mean else 0.0
        expected.append(b + sign * step)
    assert updated.dtype == torch.float32
    # 1-2 fp32 ulps of slack; a wrong or missing step would be off by 1e-3.
    expected = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(updated, expected, atol=0, rtol=2.5e-7)


@pytest.mark.parametrize("direction", ["sparsify", "balance"])
def test_update_bias_leaves_experts_at_the_mean_unchanged(direction):
    bias = make_bias()
    usage = torch.tensor([4.0] * 5 + [2.0, 6.0] + [4.0] * 3)
    updated = update_bias(bias, usage, 1e-3, direction)
    at_mean = usage == 4.0
    assert torch.equal(updated[at_mean], bias[at_mean])
    assert not torch.equal(updated[~at_mean], bias[~at_mean])


def test_update_bias_returns_a_new_tensor():
    bias = make_bias()
    before = bias.clone()
    updated = update_bias(bias, torch.arange(NUM_EXPERTS, dtype=torch.float32), 1e-3, "sparsify")
    assert updated.data_ptr() != bias.data_ptr() and torch.equal(bias, before)


def test_update_bias_keeps_small_steps_at_large_bias_in_fp32():
    bias = torch.tensor([0.1, 0.1, -0.1], dtype=torch.float32)
    updated = update_bias(bias, torch.tensor([3.0, 0.0, 0.0]), 5e-5, "sparsify")
    steps = (updated - bias).double()
    expected = torch.tensor([5e-5, -5e-5, -5e-5], dtype=torch.float64)
    torch.testing.assert_close(steps, expected, atol=1e-8, rtol=0)  # fp32 ulp at 0.1 is 7.5e-9


def test_same_step_in_bf16_would_be_lost():
    """Proves the fp32 test above can fail: bf16 rounds 0.1 + 5e-5 back to 0.1."""
    bias_bf16 = torch.tensor([0.1], dtype=torch.bfloat16)
    assert torch.equal(bias_bf16 + torch.tensor([5e-5], dtype=torch.bfloat16), bias_bf16)


@pytest.mark.parametrize(
    "bias,usage,rate,direction",
    [
        (torch.zeros(4, dtype=torch.bfloat16), torch.ones(4), 1e-3, "sparsify"),
        (torch.zeros(4), torch.ones(3), 1e-3, "sparsify"),
        (torch.zeros(4), torch.ones(4), -1e-3, "sparsify"),
        (torch.zeros(4), torch.ones(4), 1e-3, "sideways"),
    ],
)
def test_update_bias_rejects_bad_inputs(bias, usage, rate, direction):
    with pytest.raises(ValueError):
        update_bias(bias, usage, rate, direction)


# ---------------------------------------------------------------------------------------------
# select_condensers() and gini().
# ---------------------------------------------------------------------------------------------


def test_select_condensers_breaks_ties_towards_lower_id():
    bias = torch.tensor([0.1, -0.2, -0.2, 0.0, -0.2, -0.3])
    assert select_condensers(bias, 2).tolist() == [1, 5]
    assert select_condensers(bias, 3).tolist() == [1, 2, 5]


def test_select_condensers_matches_loop_on_gamma_multiples():
    gamma = 1e-4
    gen = torch.Generator().manual_seed(6)
    bias = gamma * torch.randint(-3, 4, (32,), generator=gen).float()
    for r in range(5):
        expected = sorted(sorted(range(32), key=lambda e: (bias[e].item(), e))[:r])
        assert select_condensers(bias, r).tolist() == expected


def test_select_condensers_r_zero_is_empty():
    chosen = select_condensers(torch.zeros(8), 0)
    assert chosen.dtype == torch.long and chosen.numel() == 0


def test_select_condensers_rejects_r_above_num_experts():
    with pytest.raises(ValueError, match="num_experts"):
        select_condensers(torch.zeros(8), 9)


def test_gini_matches_pairwise_definition():
    gen = torch.Generator().manual_seed(7)
    values = torch.rand(16, generator=gen) * 10
    pairs = sum(abs(a - b) for a in values.tolist() for b in values.tolist())
    expected = pairs / (2 * len(values) * sum(values.tolist()))
    assert gini(values) == pytest.approx(expected, rel=1e-9)


def test_gini_extremes():
    assert gini(torch.ones(8)) == pytest.approx(0.0, abs=1e-12)
    assert gini(torch.tensor([0.0] * 7 + [5.0])) == pytest.approx(7 / 8)
    assert gini(torch.zeros(8)) == 0.0


# ---------------------------------------------------------------------------------------------
# Config and input validation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topk": 0},
        {"topk": 9},
        {"num_experts": 0},
        {"score_function": "relu"},
        {"condenser_mode": "both"},
        {"scaling_factor": 0.0},
        {"scaling_factor": float("nan")},
        {"num_groups": 3, "group_topk": 1},
        {"num_groups": 4},
        {"group_topk": 2},
        {"num_groups": 4, "group_topk": 0},
        {"num_groups": 4, "group_topk": 5},
        {"num_groups": 4, "group_topk": 1},  # 1 group of 2 experts < topk 3
    ],
)
def test_bad_config_raises(kwargs):
    base = {"num_experts": 8, "topk": 3}
    with pytest.raises(ValueError):
        RoutingConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "mode,condensers",
    [
        ("paper", [0, 1, 2, 3, 4]),  # r > k
        ("reference", [0, 1, 2, 3, 4, 5, 6]),  # k + r > E
        ("paper", [2, 2]),  # repeated id
        ("paper", [10]),  # out of range
    ],
)
def test_route_rejects_bad_condensers(mode, condensers):
    cfg = RoutingConfig(NUM_EXPERTS, TOPK, condenser_mode=mode)
    with pytest.raises(ValueError):
        route(make_logits(), cfg, None, condensers)


@pytest.mark.parametrize(
    "logits,bias",
    [
        (torch.zeros(4, NUM_EXPERTS - 1), None),
        (torch.zeros(4, NUM_EXPERTS), torch.zeros(NUM_EXPERTS, dtype=torch.bfloat16)),
        (torch.zeros(4, NUM_EXPERTS), torch.zeros(NUM_EXPERTS + 1)),
    ],
)
def test_route_rejects_bad_shapes_and_dtypes(logits, bias):
    with pytest.raises(ValueError):
        route(logits, RoutingConfig(NUM_EXPERTS, TOPK), bias)
