"""Zero-weight placeholder slots, spread over the expert-parallel ranks by a deterministic rule.

The dispatcher needs the same number of slots for every token (`moe_router_topk`). When a token
selects fewer distinct experts than that (reference mode: a condenser that top-k also picked;
layers with fewer condensers than the model's maximum; replicated condensers taken out of the
dispatch), the missing slots go to placeholder experts: experts the token did not select, with
gate weight exactly 0, so they change neither the output nor any gradient. Only their dispatch
load is real, which is why it is spread.

The rule (pure, device-side, no value read): the placeholder slots of one rank's tokens are
numbered in token order, n = 0, 1, 2, ...; slot n goes to EP rank (group) n mod G, to the
lowest-id expert of that rank the token does not occupy, else to the next rank (cyclically) that
has one. With E / G >= the slots per token, a rank always has a free expert, so each of the G
ranks receives floor(P / G) or ceil(P / G) of this rank's P placeholder slots. With G = 1 this
is the lowest-id unselected expert, the original rule.

Shape suffixes as in `routing.py`: _T token, _E expert, _TE token x expert.
"""

from __future__ import annotations

import torch


def add_placeholders(routing_map_TE: torch.Tensor, count: int, groups: int = 1,
                     occupied_TE: torch.Tensor | None = None, max_missing: int | None = None
                     ) -> torch.Tensor:
    """Marks placeholder experts until every row of the map has `count` True entries.

    Args:
        routing_map_TE: bool [T, E], at most `count` True per row.
        count: slots per token the result must have.
        groups: G, the expert-parallel ranks (experts are placed contiguously, E / G each).
        occupied_TE: bool [T, E] experts that must not take a placeholder besides the map's own
            (replicated condensers); None = the map only.
        max_missing: a static bound on the missing slots of a row (one pass per slot); None =
            `count`.

    Returns:
        The map with placeholders marked, bool [T, E].
    """
    num_tokens, num_experts = routing_map_TE.shape
    if num_experts % groups:
        raise ValueError(f"num_experts={num_experts} is not a multiple of the {groups} EP ranks")
    missing_T = count - routing_map_TE.sum(dim=-1)
    # Exclusive prefix: the number of this rank's placeholder slots before token t.
    first_T = missing_T.cumsum(dim=0) - missing_T
    taken_TE = routing_map_TE if occupied_TE is None else routing_map_TE | occupied_TE
    expert_E = torch.arange(num_experts, device=routing_map_TE.device)
    group_E = expert_E // (num_experts // groups)
    result_TE = routing_map_TE
    for slot in range(count if max_missing is None else max_missing):
        target_T = (first_T + slot) % groups
        # Cyclic distance from the target rank first, then the expert id: a total order.
        order_TE = ((group_E - target_T.unsqueeze(1)) % groups) * num_experts + expert_E
        order_TE = order_TE.masked_fill(taken_TE, 2 * groups * num_experts)
        pick_TE = torch.zeros_like(routing_map_TE).scatter(
            1, order_TE.argmin(dim=-1, keepdim=True), True)
        pick_TE = pick_TE & (missing_T > slot).unsqueeze(1)
        result_TE, taken_TE = result_TE | pick_TE, taken_TE | pick_TE
    return result_TE


def placeholder_load(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, groups: int,
                     token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatched slots with gate weight exactly 0 per EP rank, float32 [G] (no grad).

    These are the placeholders (a real pick whose fp32 weight underflowed to 0 would count too).
    `token_mask_T` (True = real token) leaves padding out; None counts every token.
    """
    with torch.no_grad():
        zero_TE = routing_map_TE & (probs_TE == 0)
        if token_mask_T is not None:
            zero_TE = zero_TE & token_mask_T.unsqueeze(1)
        per_expert_E = zero_TE.sum(dim=0, dtype=torch.float32)
        return per_expert_E.view(groups, -1).sum(dim=1)
