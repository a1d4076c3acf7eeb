"""DenseMixer (Yao et al. 2025) as pure math: sparse forward value, dense router gradient.

The spec is METHODS.md §5. With p = the family's scores over all E experts (softmax), TopK_t the
selected set of token t and S_t = sum_{e in TopK_t} p_te:

    y_sparse = sum_{e in TopK} w_e E_e(h)          the ordinary top-k output (the forward value)
    y_dense  = sum_{e=1..E} p~_e Ê_e(h)                      every expert on every token
    y        = stopgrad(y_sparse) + (y_dense - stopgrad(y_dense))

    p~_e = c p_e                           without renormalisation
    p~_e = c p_e / S (e in TopK),  c p_e / stopgrad(S) (e not in TopK)     with it
    Ê_e(h) = E_e(h) in the forward; its gradient is kept only on tokens that selected e

(c = the family's routed scaling factor.) The value of y is y_sparse BITWISE (`y_dense -
stopgrad(y_dense)` is exactly 0); the router gets d y / d p_e = Ê_e(h) for every expert, and each
expert's parameters and input get exactly their SFT gradient (p~_e = w_e on selected tokens,
zero elsewhere). Shared experts are outside this construct: add them to y as usual.

Per family (the `densemixer` 1.0.1 package, MIT, is the test oracle; its three patches differ):
    OLMoE, Qwen3-MoE   the package's "partscale_fix_expert" rule: p / S on selected experts and
                       p / stopgrad(S) on the others when `norm_topk_prob`. This is the spec; we
                       use it for every family (`renormalise_dense = norm_topk_prob`).
    Qwen2-MoE          the package weights the dense term with the raw p_e even when the family
                       renormalises the sparse weights (then selected experts train with p_e
                       instead of p_e / S, unlike SFT). `renormalise_dense=False` reproduces it;
                       Qwen1.5-MoE-A2.7B has norm_topk_prob=false, where both rules coincide.
    all three          the package casts the router logits to the activation dtype before its
                       fp32 softmax (we keep fp32 logits, METHODS.md §0), ranks top-k on p
                       (the same order as on the logits) and sums the sparse output in expert-id
                       order (fp rounding only).

In the model (`megatron_ec/moe/methods/densemixer.py` has the wiring through Megatron-Core's
router and experts seams, TP and EP included): the ordinary router -> dispatcher -> experts ->
combine path yields y_sparse with SFT's gradients, so only the difference is added, the router
term of the unselected experts sum_{e not in TopK} p~_e stopgrad(E_e(h)) as a zero-valued
straight-through on the expert rows; E_e(h) then runs under `torch.no_grad()` (its gradient is
zero off the selection). Cost: E / k times the routed experts' forward FLOPs (15x Qwen1.5, 8x
OLMoE, 16x Qwen3-30B) and the [E, T, H] outputs kept for the router's backward; no extra expert
backward. `densemixer_combine` below is the whole construct on one process (the oracle tests).

Shape-suffix legend:
    _T   one entry per token;  _E  one per routed expert;  _H  hidden size
    _TE  token x expert (scores_TE, routing_map_TE);  _ETH  expert x token x hidden (outputs)
    _TH  token x hidden (layer outputs);  _T1  a per-token column
"""

from __future__ import annotations

import torch


def dense_gate_weights(
    scores_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    renormalise: bool,
    scaling_factor: float = 1.0,
) -> torch.Tensor:
    """p~ [T, E]: the dense term's weights (equal to the sparse gate weights on the selection).

    Args:
        scores_TE: the family's scores p over ALL experts (softmax of the fp32 logits),
            differentiable w.r.t. the router.
        routing_map_TE: bool [T, E], True on each token's top-k.
        renormalise: divide by S = sum of the selected p (the gradient flows through S only from
            the selected experts: unselected ones divide by stopgrad(S)).
        scaling_factor: the family's routed scaling factor c.
    """
    if scores_TE.shape != routing_map_TE.shape or scores_TE.dim() != 2:
        raise ValueError(
            f"scores {tuple(scores_TE.shape)} and routing_map {tuple(routing_map_TE.shape)} must "
            "both be [tokens, experts]."
        )
    weights_TE = scores_TE * scaling_factor
    if not renormalise:
        return weights_TE
    mass_T1 = torch.where(routing_map_TE, scores_TE, 0.0).sum(dim=-1, keepdim=True)
    return torch.where(routing_map_TE, weights_TE / mass_T1, weights_TE / mass_T1.detach())


def selected_tokens_only(outputs_ETH: torch.Tensor, routing_map_TE: torch.Tensor) -> torch.Tensor:
    """Ê: the outputs unchanged, with their gradient kept only where the token selected the expert.

    `torch.where` picks either the tensor or its detached copy, so the value is bitwise the input.
    """
    selected_ET1 = routing_map_TE.t().unsqueeze(-1)
    return torch.where(selected_ET1, outputs_ETH, outputs_ETH.detach())


def dense_output(outputs_ETH: torch.Tensor, weights_TE: torch.Tensor) -> torch.Tensor:
    """y_dense [T, H] = sum_e weights_te outputs_eth."""
    if outputs_ETH.shape[:2] != weights_TE.t().shape:
        raise ValueError(
            f"outputs {tuple(outputs_ETH.shape)} must be [experts, tokens, hidden] for weights "
            f"{tuple(weights_TE.shape)} [tokens, experts]."
        )
    return torch.einsum("te,eth->th", weights_TE.to(outputs_ETH.dtype), outputs_ETH)


def straight_through(sparse_TH: torch.Tensor, dense_TH: torch.Tensor) -> torch.Tensor:
    """The value of `sparse_TH` (bitwise), the gradient of `dense_TH`."""
    # Parenthesised: dense - stopgrad(dense) is exactly 0, and sparse + 0 is sparse.
    return sparse_TH.detach() + (dense_TH - dense_TH.detach())


def densemixer_combine(
    sparse_TH: torch.Tensor,
    outputs_ETH: torch.Tensor,
    scores_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    renormalise_dense: bool,
    scaling_factor: float = 1.0,
) -> torch.Tensor:
    """DenseMixer's layer output: the ordinary top-k output with the dense router gradient.

    Args:
        sparse_TH: the ordinary routed experts' combined output (y_sparse), shared experts excluded.
        outputs_ETH: E_e(h) of every expert on every token (see the module docstring for a
            memory-saving way to build it).
        scores_TE: p over all experts, differentiable w.r.t. the router.
        routing_map_TE: bool [T, E] of the top-k selection that produced `sparse_TH`.
        renormalise_dense: the ratio rule (the family's `norm_topk_prob`; False reproduces the
            `densemixer` package's Qwen2-MoE variant).
        scaling_factor: the family's routed scaling factor.

    Returns:
        y [T, H]: equal to `sparse_TH`; gradients as in the module docstring.
    """
    weights_TE = dense_gate_weights(scores_TE, routing_map_TE, renormalise_dense, scaling_factor)
    dense_TH = dense_output(selected_tokens_only(outputs_ETH, routing_map_TE), weights_TE)
    return straight_through(sparse_TH, dense_TH)
