"""Expert-specialisation losses of arXiv 2505.22323 (Guo et al., NeurIPS 2025) as pure functions.

The spec is METHODS.md §6: L = L_task + w_v L_v + w_o L_o (defaults below), both terms optional.
The reference text beside METHODS.md holds only the paper's abstract, so equation numbers are not
quoted here; the definitions follow METHODS.md §6 and the public code as summarised in
REFERENCE_IMPLEMENTATIONS.md §4, with the choices marked "ours".

Variance loss (routing side), over the N real tokens of a layer:
    L_v = -(1/N) sum_t Var_e(p_te),   Var_e(p_t) = (1/E) sum_e (p_te - mean_e p_te)^2
p = softmax of the router logits over all E experts, before top-k. Ours: the population variance
(1/E); the public code uses `torch.var` (1/(E - 1)), which only rescales the loss by E/(E - 1):
`unbiased=True` reproduces it. Padding tokens never count (the public code counts them).

Orthogonality loss (expert side): for real token t with selected expert outputs x_t1..x_tK
(unweighted: x~_tj = E_j(h_t) for the selected j, the gate weight is not applied),
    L_o = (1/(N K)) sum_t sum_j || P_{span{x_tl : l != j}} x_tj ||^2
the squared norm of the orthogonal projection of each selected output onto the span of the
token's OTHER selected outputs, averaged over tokens and selected experts (the public code's
normalisation, 1/(kN)). The public code Gram-Schmidts the other outputs; we take the projection
from one Householder QR per token, X_t = [x_t1 .. x_tK] = Q R, through the identity
    || P_{-j} x_j ||^2 = ||x_j||^2 - 1 / (G^-1)_jj,   G = X^T X,   (G^-1)_jj = ||row j of R^-1||^2
(1/(G^-1)_jj is the squared residual of x_j on the others), which stays accurate for
near-collinear outputs where classical Gram-Schmidt loses orthogonality. K = 1 gives 0. The K
outputs of a token must be linearly independent (distinct experts: almost surely, when H >= K).
Third-party summaries of the paper write L_o with pairwise projections onto each other output
(<x_j, x_l> / <x_l, x_l>) x_l; that equals the span projection only when the others are mutually
orthogonal. Not built here (see docs/BASELINES.md).

Per-token grouping: `outputs_TKH[t, k]` must be the output of expert `topk_ids_TK[t, k]` for token
t. The public code concatenates outputs grouped by expert and views them as [-1, k, H], which
mixes tokens; L_o is invariant to the order of a token's K slots but not to that mixing. Where
the K outputs of a token meet under expert parallelism (for the later wiring): on the token's
own rank, after the combine's all-to-all (or the allgather dispatcher's reduce-scatter) has
brought the expert outputs back as the permuted [T * K, H] buffer, and before `unpermute` sums
them into the token's row; un-sorting that buffer with the dispatcher's permutation gives
[T, K, H] aligned with the routing. Megatron-Core applies the gate probs inside the experts by
default, so the wiring must keep the unweighted outputs (apply the probs at the unpermute
instead); dividing the weighted outputs by a probability near 0 is not an option.

Shape-suffix legend:
    _T  one entry per token (padding included);  _E  one per routed expert;  _H  hidden size
    _TE token x expert (scores_TE);  _TK token x selected slot (topk_ids_TK);  _TKH outputs
"""

from __future__ import annotations

from typing import Optional

import torch

DEFAULT_WEIGHTS = {"variance": 1e-3, "orthogonality": 1e-4}
"""w_v and w_o (METHODS.md §6; the public code's DeepSeek-V2-Lite targets). The public code's
one-off auto-scaling of the weights at the first forward is not reproduced."""


def _real_rows(tensor: torch.Tensor, token_mask_T: Optional[torch.Tensor]) -> torch.Tensor:
    if token_mask_T is None:
        return tensor
    if token_mask_T.shape != tensor.shape[:1] or token_mask_T.dtype != torch.bool:
        raise ValueError(
            f"token_mask must be bool [tokens={tensor.shape[0]}], got "
            f"{token_mask_T.dtype} {tuple(token_mask_T.shape)}."
        )
    return tensor[token_mask_T]


def _mean_over_tokens(values_T: torch.Tensor) -> torch.Tensor:
    if values_T.shape[0] == 0:
        return values_T.sum() * 0.0  # no real token: zero loss that still has a graph
    return values_T.mean()


def variance_loss(
    scores_TE: torch.Tensor,
    token_mask_T: Optional[torch.Tensor] = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """L_v = -mean over real tokens of the variance of p over the experts.

    Args:
        scores_TE: routing probabilities p [T, E] over all experts (softmax, before top-k).
        token_mask_T: bool [T], True for real tokens; None = all real.
        unbiased: divide by E - 1 (the public code's `torch.var`) instead of E.

    Returns:
        A 0-d tensor (0 when no token is real).
    """
    if scores_TE.dim() != 2 or (unbiased and scores_TE.shape[1] < 2):
        raise ValueError(f"scores must be [tokens, experts >= 2], got {tuple(scores_TE.shape)}.")
    real_TE = _real_rows(scores_TE, token_mask_T)
    return -_mean_over_tokens(torch.var(real_TE, dim=-1, correction=1 if unbiased else 0))


def _check_grouping(outputs_TKH: torch.Tensor, topk_ids_TK: torch.Tensor) -> None:
    if outputs_TKH.dim() != 3 or topk_ids_TK.shape != outputs_TKH.shape[:2]:
        raise ValueError(
            f"outputs {tuple(outputs_TKH.shape)} must be [tokens, K, hidden] with the routing ids "
            f"{tuple(topk_ids_TK.shape)} [tokens, K] of the same tokens."
        )
    num_slots, hidden = outputs_TKH.shape[1:]
    if num_slots > hidden:
        raise ValueError(f"K={num_slots} outputs of size {hidden} cannot be independent.")
    sorted_TK = topk_ids_TK.sort(dim=-1).values
    if bool((sorted_TK[:, 1:] == sorted_TK[:, :-1]).any()):
        raise ValueError(
            "a token lists an expert twice: merge duplicated slots (reference condenser mode) "
            "before the orthogonality loss; a duplicate lies in the span of itself."
        )


def projection_sq_norms(outputs_TKH: torch.Tensor) -> torch.Tensor:
    """||P_others x_tj||^2 [T, K]: each slot projected on the span of the token's other slots."""
    num_slots = outputs_TKH.shape[1]
    if num_slots == 1:
        return (outputs_TKH * 0.0).sum(dim=-1)  # no other output: 0, with a (zero) gradient
    # mode="reduced", not "r": the R-only mode has no backward.
    r_TKK = torch.linalg.qr(outputs_TKH.transpose(1, 2), mode="reduced").R
    eye_KK = torch.eye(num_slots, dtype=r_TKK.dtype, device=r_TKK.device)
    r_inv_TKK = torch.linalg.solve_triangular(r_TKK, eye_KK.expand_as(r_TKK), upper=True)
    norms_sq_TK = r_TKK.square().sum(dim=1)  # column norms of R = ||x_tj||^2
    residual_sq_TK = 1.0 / r_inv_TKK.square().sum(dim=2)  # 1 / (G^-1)_jj
    return norms_sq_TK - residual_sq_TK


def orthogonality_loss(
    outputs_TKH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    token_mask_T: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """L_o = mean over real tokens and selected slots of the projection onto the other outputs.

    Args:
        outputs_TKH: unweighted outputs E_j(h_t) of each token's K selected experts, grouped per
            token (module docstring: where they meet under EP).
        topk_ids_TK: the expert id of every slot; checked to be duplicate-free per token.
        token_mask_T: bool [T], True for real tokens; None = all real.

    Returns:
        A 0-d tensor (0 when no token is real, or K = 1).
    """
    _check_grouping(outputs_TKH, topk_ids_TK)
    real_TKH = _real_rows(outputs_TKH, token_mask_T)
    return _mean_over_tokens(projection_sq_norms(real_TKH).mean(dim=-1))
