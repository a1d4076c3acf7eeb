"""The analyses' formulas (`megatron_ec.analysis.stats`) against naive Python loops written from
the paper's definitions (App. M.1, App. P, section 6.1)."""

from __future__ import annotations

import math
import statistics

import torch

from megatron_ec.analysis import stats
from tests.tolerance import FP64_ORACLE, assert_close_scaled


def _values(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_gini(values: list[float]) -> float:
    """Mean absolute difference over all ordered pairs, over twice the mean."""
    n, total = len(values), sum(values)
    pairs = sum(abs(a - b) for a in values for b in values)
    return pairs / (2 * n * total)


def test_gini_and_lorenz_match_the_definitions():
    for counts in ([5, 0, 0, 1, 9, 3, 3, 0], [4, 4, 4, 4], [0, 0, 7], [1, 2, 3, 4, 100]):
        xs, ys = stats.lorenz_curve(torch.tensor(counts))
        ordered, total, running = sorted(counts), sum(counts), 0.0
        expected = [0.0]
        for value in ordered:
            running += value
            expected.append(running / total)
        assert xs == [i / len(counts) for i in range(len(counts) + 1)]
        assert max(abs(a - b) for a, b in zip(ys, expected)) < 1e-12
        area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(counts)))
        gini = stats.gini(torch.tensor(counts, dtype=torch.float64))
        assert math.isclose(gini, naive_gini(counts), rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(gini, 1 - 2 * area, rel_tol=1e-12, abs_tol=1e-12)


def test_selection_counts_count_each_expert_once_per_token():
    ids = torch.tensor([[0, 3, 3], [1, 2, 4], [4, 0, 1], [2, 2, 0]])
    weights = torch.tensor([[0.5, 0.2, 0.2], [0.3, 0.0, 0.7], [0.1, 0.6, 0.3], [0.4, 0.4, 0.0]])
    expected = [0] * 5
    for row_ids, row_weights in zip(ids.tolist(), weights.tolist()):
        for expert in {e for e, w in zip(row_ids, row_weights) if w != 0}:
            expected[expert] += 1
    assert stats.selection_counts(ids, weights, 5).tolist() == expected == [2, 2, 1, 1, 2]


def test_activation_summary_rates_shares_and_order():
    counts = torch.tensor([6, 0, 2, 9, 2])
    summary = stats.activation_summary(counts, num_tokens=10)
    assert summary["rate"] == [c / 10 for c in counts.tolist()]
    assert summary["share"] == [c / 19 for c in counts.tolist()]
    assert summary["order"] == [3, 0, 2, 4, 1]  # most used first, ties by id
    assert summary["sorted_share"] == [9 / 19, 6 / 19, 2 / 19, 2 / 19, 0.0]


def test_router_kl_matches_a_loop():
    base, tuned = _values(0, 7, 5), _values(1, 7, 5)
    expected = []
    for row_p, row_q in zip(base.tolist(), tuned.tolist()):
        zp, zq = sum(math.exp(v) for v in row_p), sum(math.exp(v) for v in row_q)
        p, q = [math.exp(v) / zp for v in row_p], [math.exp(v) / zq for v in row_q]
        expected.append(sum(pe * math.log(pe / qe) for pe, qe in zip(p, q)))
    assert_close_scaled(stats.router_kl(base, tuned), torch.tensor(expected, dtype=torch.float64),
                        FP64_ORACLE, "router KL")
    assert stats.router_kl(base, base).abs().max() < 1e-12


def test_output_divergence_sums_match_a_loop():
    base, tuned = _values(2, 6, 4), _values(3, 6, 4)
    diff = sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(rb, rt)))
               for rb, rt in zip(base.tolist(), tuned.tolist()))
    norm = sum(math.sqrt(sum(a * a for a in row)) for row in base.tolist())
    got = stats.output_divergence_sums(base, tuned)
    assert math.isclose(got[0], diff, rel_tol=1e-12) and math.isclose(got[1], norm, rel_tol=1e-12)


def naive_pearson(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))


def test_pearson_and_correlation_gain_match_app_m():
    base, tuned = _values(4, 6, 12), _values(5, 6, 12)
    rows = base.tolist()
    expected = [[naive_pearson(a, b) for b in rows] for a in rows]
    assert_close_scaled(stats.pearson_matrix(base), torch.tensor(expected, dtype=torch.float64),
                        FP64_ORACLE, "C_ij")
    shared, regular = [1, 4], [0, 2, 3, 5]
    gain = stats.correlation_gain(stats.pearson_matrix(base), stats.pearson_matrix(tuned),
                                  shared, regular)
    tuned_rows = tuned.tolist()
    for i_row, i in enumerate(shared):
        for j_col, j in enumerate(regular):
            c_base = naive_pearson(rows[i], rows[j])
            c_tuned = naive_pearson(tuned_rows[i], tuned_rows[j])
            delta = 100 * (c_tuned - c_base) / abs(c_base)
            assert math.isclose(float(gain[i_row, j_col]), delta, rel_tol=1e-9, abs_tol=1e-9)
    values = [3.0, -1.5, 0.25, 8.0]
    mean, std = stats.mean_and_std(values)
    assert math.isclose(mean, statistics.fmean(values))
    assert math.isclose(std, statistics.pstdev(values))
