"""The formulas of the paper's analyses: pure tensor math, no models, no files.

Shape legend: T tokens, K gate slots per token, E routed experts, H hidden size, F flattened
weight size, L layers. All reductions run in float64 on the device of the inputs.

- Activation (Fig. 3 / 9, App. P): a token activates expert e when e is among the ids its gate
  returned with a non-zero weight (a reference-mode condenser that is also in the top-k counts
  once; the zero-weight placeholder slots of reference mode count never). ``rate`` is
  P(e in S(x)) = count_e / tokens (section 3.1's p_i, sums to the slots used per token); ``share``
  is count_e / sum(count) (Fig. 9's activation probability, sums to 1). Lorenz curve: the experts
  sorted by ascending count, (i / E, cumulative share of the i least used); Gini = 1 - 2 x the
  area under it (``megatron_ec.moe.routing.gini``, the same coefficient the trainer logs).
- Router KL (section 6.1, Fig. 5): per token KL(P_base || P_ft) = sum_e P_base,e log(P_base,e /
  P_ft,e), P = softmax of the router logits over all E routed experts (the selection bias is not
  part of the distribution: it moves selection, never the gate weights).
- Weighted MoE output divergence (section 6.1, Fig. 4): y_t = sum_{e in S(t)} g_t,e E_e(h_t), the
  routed experts' gate-weighted output of each model under its own routing; per layer the mean
  L2 distance mean_t |y_ft,t - y_base,t| and the relative divergence sum_t |y_ft,t - y_base,t| /
  sum_t |y_base,t|.
- Pearson (App. M.1): C_ij = <w~_i, w~_j> / (|w~_i| |w~_j|), w~ = vec(W_down) minus its mean;
  Delta_ij = 100 (C_ij,ft - C_ij,base) / |C_ij,base| for i a condenser, j a regular expert;
  the layer mean over all (i, j) pairs, the model mean and (population) std over layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatron_ec.moe.routing import gini

__all__ = ["activation_summary", "correlation_gain", "gini", "lorenz_curve", "mean_and_std",
           "output_divergence_sums", "pearson_matrix", "router_kl", "selection_counts"]


def selection_counts(ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                     num_experts: int) -> torch.Tensor:
    """Tokens that activated each expert, int64 [E] (each expert at most once per token)."""
    hits_TE = torch.zeros(ids_TK.shape[0], num_experts, dtype=torch.int64, device=ids_TK.device)
    hits_TE.scatter_add_(1, ids_TK.long(), (weights_TK != 0).to(torch.int64))
    return (hits_TE > 0).sum(dim=0, dtype=torch.int64)


def lorenz_curve(values_E: torch.Tensor) -> tuple[list[float], list[float]]:
    """(x, y) of the Lorenz curve, E + 1 points from (0, 0) to (1, 1); ascending order."""
    values = torch.sort(values_E.detach().double().flatten()).values
    num_values, total = values.numel(), float(values.sum())
    xs = [i / num_values for i in range(num_values + 1)]
    if total == 0:
        return xs, xs  # no activations: report equality rather than divide by zero
    cumulative = torch.cumsum(values, 0) / total
    return xs, [0.0] + cumulative.tolist()


def activation_summary(counts_E: torch.Tensor, num_tokens: int) -> dict:
    """Counts, rates, shares (each also sorted, most used first), Gini and Lorenz of one layer."""
    counts = counts_E.detach().double()
    total = float(counts.sum())
    rate = counts / max(num_tokens, 1)
    share = counts / total if total else torch.zeros_like(counts)
    order = torch.sort(counts, descending=True, stable=True).indices
    lorenz_x, lorenz_y = lorenz_curve(counts)
    return {"tokens": int(num_tokens), "counts": [int(c) for c in counts_E.tolist()],
            "rate": rate.tolist(), "share": share.tolist(), "order": order.tolist(),
            "sorted_share": share[order].tolist(), "gini": gini(counts),
            "lorenz_x": lorenz_x, "lorenz_y": lorenz_y}


def router_kl(logits_base_TE: torch.Tensor, logits_ft_TE: torch.Tensor) -> torch.Tensor:
    """KL(softmax(base) || softmax(fine-tuned)) per token, float64 [T]."""
    log_p = torch.log_softmax(logits_base_TE.double(), dim=-1)
    log_q = torch.log_softmax(logits_ft_TE.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def output_divergence_sums(y_base_TH: torch.Tensor, y_ft_TH: torch.Tensor) -> tuple[float, float]:
    """(sum_t |y_ft - y_base|_2, sum_t |y_base|_2) over the tokens given, in float64."""
    base = y_base_TH.double()
    diff = torch.linalg.vector_norm(y_ft_TH.double() - base, dim=-1).sum()
    return float(diff), float(torch.linalg.vector_norm(base, dim=-1).sum())


def pearson_matrix(weights_EF: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every pair of rows (experts), float64 [E, E]."""
    centred = weights_EF.double() - weights_EF.double().mean(dim=1, keepdim=True)
    unit = centred / torch.linalg.vector_norm(centred, dim=1, keepdim=True)
    return unit @ unit.T


def correlation_gain(base_EE: torch.Tensor, tuned_EE: torch.Tensor, shared: Sequence[int],
                     regular: Sequence[int]) -> torch.Tensor:
    """Percent change Delta_ij (App. M.1) for i in ``shared`` (rows), j in ``regular`` (columns)."""
    rows = torch.as_tensor(list(shared), dtype=torch.long, device=base_EE.device)
    cols = torch.as_tensor(list(regular), dtype=torch.long, device=base_EE.device)
    base = base_EE.double()[rows][:, cols]
    return 100.0 * (tuned_EE.double()[rows][:, cols] - base) / base.abs()


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0) of a non-empty list."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
