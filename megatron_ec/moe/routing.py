"""Pure routing math for ExpertCondenser (arXiv 2604.23036): selection, gate weights, bias.

Everything here is a function of tensors and a frozen config: no modules, no process groups, no
globals. The router module, the bias-update hook and the analysis tools call into this file.

Shape-suffix legend:
    _T   one entry per token            (T = tokens in the micro-batch, padding included)
    _E   one entry per routed expert     (E = cfg.num_experts)
    _TE  token x expert                  (logits_TE, probs_TE, routing_map_TE)
    _TK  token x slot                    (K = slots per token: k, k - r dynamic picks, or k + r)
    _TG  token x expert group            (G = cfg.num_groups)
    _R   one entry per condenser         (R = r = |J|)

Vocabulary (Megatron-Core's, plus the condenser terms):
    logits  s = W_r h, fp32 router output, unbiased.
    bias    b, fp32 per-expert selection bias; a buffer, never a trainable parameter.
    key     what top-k ranks: s + b (softmax families) or sigmoid(s) + b (sigmoid).
    slots   the expert ids a token is dispatched to; a slot id may repeat (reference mode).
    probs   dense [T, E] gate weights, zero off the selection; duplicate slots are summed.
    routing_map  dense [T, E] bool; exactly `num_slots(cfg, r)` True entries per token.
    condensers   J, r fixed routed experts forced into every token's selection.
    dynamic selection  the experts picked by top-k on the key (condenser forcing excluded).
    placeholder  a zero-weight expert that takes the slot of a duplicated condenser in
                 reference mode, so the dispatcher still sees k + r distinct experts per token.
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from megatron_ec.moe.placeholders import add_placeholders

Condensers = Optional[Union[torch.Tensor, Sequence[int]]]

# Guards 0/0 when every selected probability underflows; far below fp32 resolution of real sums.
_NORM_EPS = 1e-20

DEBUG_ENV = "MEGATRON_EC_DEBUG_ROUTING"
"""Set to 1 to read values in the forward on any device (condenser ids, slot counts)."""


def _reads_values(tensor: torch.Tensor) -> bool:
    """Value checks run where reading is free (host tensors) or under `MEGATRON_EC_DEBUG_ROUTING=1`.

    On an accelerator a value read (`.tolist()`, `bool()`, `.item()`) stalls the launch queue and
    rules out CUDA graphs, so device-resident inputs are trusted: the router validates its
    condensers once, when they are set (`ECRouter.set_condensers`).
    """
    return tensor.device.type == "cpu" or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class RoutingConfig:
    """Routing of one MoE layer: family score function, top-k, scaling and condenser semantics."""

    num_experts: int
    """E, the number of routed experts (shared experts are not routed and not counted)."""

    topk: int
    """k, experts per token chosen by the family router (`num_experts_per_tok`). In [1, E]."""

    score_function: str = "softmax"
    """"softmax" (Qwen, OLMoE, DeepSeek-V2, Mixtral), "sigmoid" (DeepSeek-V3) or
    "softmax_topk" (GPT-OSS: select on the logits, softmax over the selected logits only)."""

    norm_topk_prob: bool = False
    """Renormalise the gate weights over the selected slots (the HF family flag). A no-op for
    "softmax_topk", whose weights already sum to 1 over the slots."""

    scaling_factor: float = 1.0
    """Multiplies every gate weight after renormalisation (DeepSeek `routed_scaling_factor`)."""

    condenser_mode: str = "paper"
    """"paper" (Eq. 2-3, 6): k slots = J + top-(k - r) of the rest, weights from the UNBIASED
    logits. "reference" (the authors' public code): top-k over all experts plus J appended
    (k + r slots), weights from the BIASED logits s + b, also when r = 0 (as the code's bias-only
    phase 1 does)."""

    num_groups: Optional[int] = None
    """DeepSeek `n_group`: experts split into this many contiguous equal groups. None = off."""

    group_topk: Optional[int] = None
    """DeepSeek `topk_group`: groups kept per token, ranked by their best key (V2
    `group_limited_greedy`: group score = max key in the group). None = off."""

    def __post_init__(self):
        _check_counts(self)
        _check_names(self)
        _check_groups(self)

    @property
    def group_size(self) -> int:
        """Experts per group (E when group-limited selection is off)."""
        return self.num_experts // (self.num_groups or 1)


def _check_counts(cfg: RoutingConfig) -> None:
    if not isinstance(cfg.num_experts, int) or cfg.num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {cfg.num_experts!r}.")
    if not isinstance(cfg.topk, int) or not 1 <= cfg.topk <= cfg.num_experts:
        raise ValueError(
            f"topk must be an int in [1, num_experts={cfg.num_experts}], got {cfg.topk!r}; "
            "set it to the family's num_experts_per_tok."
        )
    if not cfg.scaling_factor > 0 or cfg.scaling_factor == float("inf"):
        raise ValueError(
            f"scaling_factor must be finite and > 0, got {cfg.scaling_factor!r}; use 1.0 for "
            "families without a routed_scaling_factor."
        )


def _check_names(cfg: RoutingConfig) -> None:
    if cfg.score_function not in _SCORE_FUNCTIONS:
        raise ValueError(
            f"score_function={cfg.score_function!r} is unknown; choose one of "
            f"{sorted(_SCORE_FUNCTIONS)}."
        )
    if cfg.condenser_mode not in _CONDENSER_MODES:
        raise ValueError(
            f"condenser_mode={cfg.condenser_mode!r} is unknown; choose one of "
            f"{sorted(_CONDENSER_MODES)}."
        )


def _check_groups(cfg: RoutingConfig) -> None:
    if (cfg.num_groups is None) != (cfg.group_topk is None):
        raise ValueError(
            "num_groups and group_topk go together: set both (group-limited selection) or neither."
        )
    if cfg.num_groups is None:
        return
    if cfg.num_groups < 1 or cfg.num_experts % cfg.num_groups:
        raise ValueError(
            f"num_groups={cfg.num_groups} must be >= 1 and divide num_experts={cfg.num_experts}."
        )
    if not 1 <= cfg.group_topk <= cfg.num_groups:
        raise ValueError(
            f"group_topk={cfg.group_topk} must be in [1, num_groups={cfg.num_groups}]."
        )
    if cfg.group_topk * cfg.group_size < cfg.topk:
        raise ValueError(
            f"group_topk={cfg.group_topk} groups of {cfg.group_size} experts hold fewer than "
            f"topk={cfg.topk} experts; raise group_topk."
        )


# ---------------------------------------------------------------------------------------------
# Score functions: selection key, gate weights over slots, soft usage. Looked up by name.
# ---------------------------------------------------------------------------------------------


def _logit_key(logits_TE: torch.Tensor, bias_E: torch.Tensor) -> torch.Tensor:
    # Ranking s + b equals ranking softmax(s + b): softmax is monotone within a token (Eq. 6).
    return logits_TE + bias_E


def _sigmoid_key(logits_TE: torch.Tensor, bias_E: torch.Tensor) -> torch.Tensor:
    # DeepSeek-V3 / Megatron-Core convention: the bias shifts the score, not the logit.
    return torch.sigmoid(logits_TE) + bias_E


def _renormalise(weights_TK: torch.Tensor, norm_topk_prob: bool) -> torch.Tensor:
    if not norm_topk_prob:
        return weights_TK
    return weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + _NORM_EPS)


def _softmax_gathered(z_TE: torch.Tensor, slots_TK: torch.Tensor, norm: bool) -> torch.Tensor:
    return _renormalise(torch.softmax(z_TE, dim=-1).gather(1, slots_TK), norm)


def _sigmoid_gathered(z_TE: torch.Tensor, slots_TK: torch.Tensor, norm: bool) -> torch.Tensor:
    return _renormalise(torch.sigmoid(z_TE).gather(1, slots_TK), norm)


def _softmax_over_slots(z_TE: torch.Tensor, slots_TK: torch.Tensor, norm: bool) -> torch.Tensor:
    # Already sums to 1 over the slots, so `norm` has nothing left to do.
    return torch.softmax(z_TE.gather(1, slots_TK), dim=-1)


def _softmax_usage(logits_TE: torch.Tensor, bias_E: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits_TE + bias_E, dim=-1)


def _sigmoid_usage(logits_TE: torch.Tensor, bias_E: torch.Tensor) -> torch.Tensor:
    # Extrapolation (the reference code has no sigmoid family): each token spreads a unit mass
    # in proportion to sigmoid(s + b), like the softmax signal; the bias enters at the logit as in
    # the reference code, and the mass stays non-negative (sigmoid(s) + b can go below 0).
    scores_TE = torch.sigmoid(logits_TE + bias_E)
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class _ScoreFunction:
    selection_key: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(logits_TE, bias_E) -> key_TE ranked by top-k."""
    gate_weights: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
    """(weight_logits_TE, slots_TK, norm_topk_prob) -> weights_TK, before scaling."""
    soft_usage: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(logits_TE, bias_E) -> per-token usage distribution_TE (rows sum to 1)."""


_SCORE_FUNCTIONS = {
    "softmax": _ScoreFunction(_logit_key, _softmax_gathered, _softmax_usage),
    "sigmoid": _ScoreFunction(_sigmoid_key, _sigmoid_gathered, _sigmoid_usage),
    "softmax_topk": _ScoreFunction(_logit_key, _softmax_over_slots, _softmax_usage),
}


@dataclass(frozen=True)
class _CondenserMode:
    dynamic_excludes_condensers: bool
    """paper: top-(k - r) over experts outside J; reference: top-k over all experts."""
    biased_gate_weights: bool
    """reference: gate weights from the score function applied to s + b."""


_CONDENSER_MODES = {
    "paper": _CondenserMode(dynamic_excludes_condensers=True, biased_gate_weights=False),
    "reference": _CondenserMode(dynamic_excludes_condensers=False, biased_gate_weights=True),
}


# ---------------------------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------------------------


def _check_num_condensers(cfg: RoutingConfig, num_condensers: int) -> None:
    if num_condensers < 0:
        raise ValueError(f"The number of condensers must be >= 0, got {num_condensers}.")
    # paper: J takes r of the k slots; reference: k dynamic + r forced distinct experts <= E.
    if _CONDENSER_MODES[cfg.condenser_mode].dynamic_excludes_condensers:
        max_condensers = cfg.topk
    else:
        max_condensers = cfg.num_experts - cfg.topk
    if num_condensers > max_condensers:
        raise ValueError(
            f"condenser_mode={cfg.condenser_mode!r} with k={cfg.topk}, E={cfg.num_experts} fits "
            f"at most r={max_condensers} condensers, got r={num_condensers}; lower r."
        )


def num_slots(cfg: RoutingConfig, num_condensers: int) -> int:
    """Experts dispatched per token; the dispatcher's `moe_router_topk` must equal it.

    Args:
        cfg: routing config of the layer.
        num_condensers: r, the number of condensers of the layer (0 = none).

    Returns:
        k in paper mode or without condensers, k + r in reference mode.

    Raises:
        ValueError: r does not fit the mode (r > k in paper mode, k + r > E in reference mode).
    """
    _check_num_condensers(cfg, num_condensers)
    if _CONDENSER_MODES[cfg.condenser_mode].dynamic_excludes_condensers:
        return cfg.topk
    return cfg.topk + num_condensers


def _as_logits(logits_TE: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    if logits_TE.dim() != 2 or logits_TE.shape[1] != cfg.num_experts:
        raise ValueError(
            f"logits must be [T, num_experts={cfg.num_experts}], got {tuple(logits_TE.shape)}; "
            "flatten batch and sequence dims first."
        )
    return logits_TE.float()


def _as_bias(bias_E: Optional[torch.Tensor], logits_TE: torch.Tensor) -> torch.Tensor:
    num_experts = logits_TE.shape[1]
    if bias_E is None:
        return logits_TE.new_zeros(num_experts)
    if bias_E.shape != (num_experts,) or bias_E.dtype != torch.float32:
        raise ValueError(
            f"bias must be a float32 tensor of shape [{num_experts}], got {bias_E.dtype} "
            f"{tuple(bias_E.shape)}; keep the bias buffer in fp32 (bf16 loses updates of 5e-5)."
        )
    return bias_E.detach()


def validate_condensers(condensers: Condensers, num_experts: int, device=None) -> torch.Tensor:
    """Returns the condensers as a 1-D LongTensor after checking they are distinct valid ids.

    Ids given as ints or a host tensor are checked; ids already on an accelerator (or `meta`) are
    only checked for shape unless `MEGATRON_EC_DEBUG_ROUTING=1`, since reading them
    would synchronise: validate them once, when they are set (`ECRouter.set_condensers`).

    Args:
        condensers: expert ids, LongTensor [r] or a sequence of ints; None or empty = none.
        num_experts: E.
        device: where to put the result (default: where `condensers` already are).

    Returns:
        condensers_R, dtype long.

    Raises:
        ValueError: not 1-D, an id outside [0, E), or a repeated id.
    """
    if condensers is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    host = not isinstance(condensers, torch.Tensor) or _reads_values(condensers)
    # Host ids are checked where they are, then moved; device ids are not read.
    condensers_R = torch.as_tensor(condensers, dtype=torch.long,
                                   device=None if host else device)
    if condensers_R.dim() != 1:
        raise ValueError(
            f"condensers must be 1-D expert ids, got shape {tuple(condensers_R.shape)}."
        )
    if host:
        ids = condensers_R.tolist()
        if any(not 0 <= e < num_experts for e in ids) or len(set(ids)) != len(ids):
            raise ValueError(
                f"condensers must be distinct expert ids in [0, {num_experts}), got {ids}; "
                "pick them with select_condensers(bias, r)."
            )
    return condensers_R if device is None else condensers_R.to(device)


# ---------------------------------------------------------------------------------------------
# Selection.
# ---------------------------------------------------------------------------------------------


def _group_limited_key(key_TE: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """Keeps the key in each token's `group_topk` best groups (score = max key), -inf elsewhere."""
    num_tokens = key_TE.shape[0]
    group_score_TG = key_TE.view(num_tokens, cfg.num_groups, cfg.group_size).amax(dim=-1)
    top_groups_TK = torch.topk(group_score_TG, cfg.group_topk, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter(1, top_groups_TK, True)
    keep_TE = keep_TG.repeat_interleave(cfg.group_size, dim=1)
    return key_TE.masked_fill(~keep_TE, float("-inf"))


def _dynamic_selection(
    key_TE: torch.Tensor, cfg: RoutingConfig, condensers_R: torch.Tensor
) -> torch.Tensor:
    """Top-k on the key: the part of the selection routing decides (condenser forcing excluded).

    With -inf masking (condensers in paper mode, lost groups) and the config checks, at least
    `count` finite keys remain, so masked experts are never picked.
    """
    count = cfg.topk
    if condensers_R.numel() and _CONDENSER_MODES[cfg.condenser_mode].dynamic_excludes_condensers:
        key_TE = key_TE.index_fill(1, condensers_R, float("-inf"))
        count = cfg.topk - condensers_R.numel()
    if cfg.num_groups is not None:
        key_TE = _group_limited_key(key_TE, cfg)
    return torch.topk(key_TE, count, dim=-1).indices


def _slots(key_TE: torch.Tensor, cfg: RoutingConfig, condensers_R: torch.Tensor) -> torch.Tensor:
    """Dynamic selection, then the condensers: paper J ∪ TopK_{∉J}, reference TopK ++ J."""
    dynamic_TK = _dynamic_selection(key_TE, cfg, condensers_R)
    forced_TR = condensers_R.expand(key_TE.shape[0], -1)
    return torch.cat([dynamic_TK, forced_TR], dim=1)


def route(
    logits_TE: torch.Tensor,
    cfg: RoutingConfig,
    bias_E: Optional[torch.Tensor] = None,
    condensers: Condensers = None,
    placeholder_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selects experts and computes gate weights, in Megatron-Core's (probs, routing_map) form.

    Selection ranks the key (s + b, or sigmoid(s) + b for sigmoid), optionally group-limited.
    Paper mode (Eq. 2-3, 6): slots = J ∪ TopK_{i∉J}(key, k - r), gate weights from the unbiased
    logits. Reference mode (public code): slots = TopK(key, k) ++ J, gate weights from the score
    function applied to s + b, also when r = 0 (sigmoid: sigmoid(s + b), an extrapolation; the code
    has no sigmoid family); a condenser also in the top-k gets both weights summed and its extra
    slot goes to a zero-weight placeholder (spread over `placeholder_groups` EP ranks by the rule
of `moe.placeholders`; with 1, the lowest-id expert not otherwise selected). Weights
    are renormalised over the slots iff `norm_topk_prob` (duplicates counted twice), then scaled.

    Args:
        logits_TE: router logits s [T, E]; cast to fp32.
        cfg: routing config of the layer.
        bias_E: fp32 selection bias [E]; None = zeros. Never differentiated.
        condensers: condenser ids [r] (LongTensor or ints); None or empty = none.
        placeholder_groups: the EP ranks the placeholders are spread over (the value changes
            which zero-weight expert takes a slot, never a weight or a gradient).

    Returns:
        probs_TE: fp32 [T, E] gate weights, zero off the selection, differentiable w.r.t. logits.
        routing_map_TE: bool [T, E], exactly `num_slots(cfg, r)` True per token.

    Raises:
        ValueError: bad shapes or dtypes, invalid condenser ids, or r not fitting the mode.
    """
    logits_TE = _as_logits(logits_TE, cfg)
    bias_E = _as_bias(bias_E, logits_TE)
    condensers_R = validate_condensers(condensers, cfg.num_experts, logits_TE.device)
    count = num_slots(cfg, condensers_R.numel())
    score = _SCORE_FUNCTIONS[cfg.score_function]
    mode = _CONDENSER_MODES[cfg.condenser_mode]

    with torch.no_grad():
        slots_TK = _slots(score.selection_key(logits_TE, bias_E), cfg, condensers_R)
    weight_logits_TE = logits_TE + bias_E if mode.biased_gate_weights else logits_TE
    weights_TK = score.gate_weights(weight_logits_TE, slots_TK, cfg.norm_topk_prob)
    weights_TK = weights_TK * cfg.scaling_factor

    # scatter_add sums a duplicated condenser's two weights; placeholders are never written, so
    # their probs stay exactly 0 and send no gradient.
    probs_TE = torch.zeros_like(logits_TE).scatter_add(1, slots_TK, weights_TK)
    routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, slots_TK, True)
    if not mode.dynamic_excludes_condensers:
        routing_map_TE = add_placeholders(routing_map_TE, count, placeholder_groups,
                                          max_missing=condensers_R.numel())
    if _reads_values(routing_map_TE):  # the dispatcher's invariant; a host read on a device
        assert bool((routing_map_TE.sum(dim=-1) == count).all()), "routing_map row sum != num_slots"
    return probs_TE, routing_map_TE


# ---------------------------------------------------------------------------------------------
# Usage signal, bias update, condenser choice, concentration.
# ---------------------------------------------------------------------------------------------


def _soft_usage_TE(logits_TE, cfg, bias_E, routing_map_TE, condensers_R) -> torch.Tensor:
    return _SCORE_FUNCTIONS[cfg.score_function].soft_usage(logits_TE, bias_E)


def _hard_usage_TE(logits_TE, cfg, bias_E, routing_map_TE, condensers_R) -> torch.Tensor:
    """1 where the token's DYNAMIC selection holds the expert; forced slots, placeholders 0."""
    if routing_map_TE is None:
        key_TE = _SCORE_FUNCTIONS[cfg.score_function].selection_key(logits_TE, bias_E)
        dynamic_TK = _dynamic_selection(key_TE, cfg, condensers_R)
        return torch.zeros_like(logits_TE).scatter(1, dynamic_TK, 1.0)
    mode = _CONDENSER_MODES[cfg.condenser_mode]
    if condensers_R.numel() and not mode.dynamic_excludes_condensers:
        raise ValueError(
            "In reference mode a routing_map cannot tell placeholders or a condenser's forced "
            "slot from its dynamic pick; pass routing_map_TE=None to recompute the selection."
        )
    if routing_map_TE.shape != logits_TE.shape:
        raise ValueError(
            f"routing_map must be [T, E]={tuple(logits_TE.shape)}, "
            f"got {tuple(routing_map_TE.shape)}."
        )
    return routing_map_TE.float().index_fill(1, condensers_R, 0.0)


_USAGE_SIGNALS = {"soft": _soft_usage_TE, "hard": _hard_usage_TE}


def expert_usage(
    logits_TE: torch.Tensor,
    cfg: RoutingConfig,
    bias_E: Optional[torch.Tensor] = None,
    routing_map_TE: Optional[torch.Tensor] = None,
    token_mask_T: Optional[torch.Tensor] = None,
    signal: str = "soft",
    condensers: Condensers = None,
) -> torch.Tensor:
    """Per-expert usage u over real tokens, the signal of the bias update (no grad, fp32).

    "soft" (reference default): u_e = Σ_t softmax(s_t + b)_e for the softmax families; for
    sigmoid (an extrapolation) u_e = Σ_t sigmoid(s_t + b)_e / Σ_e' sigmoid(s_t + b)_e'.
    "hard": number of tokens whose dynamic selection contains e; condenser forced slots and
    placeholders never count (in paper mode condensers are outside the dynamic selection; in
    reference mode a condenser counts when top-k picked it on its own).

    Args:
        logits_TE: router logits [T, E].
        cfg: routing config of the layer.
        bias_E: fp32 selection bias [E]; None = zeros.
        routing_map_TE: hard signal only: the map `route` returned, to skip recomputing the
            selection. Not accepted in reference mode with condensers (ambiguous).
        token_mask_T: bool [T], True = real token; padding never counts. None = all real.
        signal: "soft" or "hard".
        condensers: condenser ids [r] as given to `route`; used by the hard signal.

    Returns:
        usage_E, fp32.

    Raises:
        ValueError: unknown signal, bad shapes, or a routing_map that cannot be used.
    """
    if signal not in _USAGE_SIGNALS:
        raise ValueError(f"signal={signal!r} is unknown; choose one of {sorted(_USAGE_SIGNALS)}.")
    with torch.no_grad():
        logits_TE = _as_logits(logits_TE.detach(), cfg)
        bias_E = _as_bias(bias_E, logits_TE)
        condensers_R = validate_condensers(condensers, cfg.num_experts, logits_TE.device)
        _check_num_condensers(cfg, condensers_R.numel())
        usage_TE = _USAGE_SIGNALS[signal](logits_TE, cfg, bias_E, routing_map_TE, condensers_R)
        if token_mask_T is None:
            return usage_TE.sum(dim=0)
        if token_mask_T.shape != (logits_TE.shape[0],) or token_mask_T.dtype != torch.bool:
            raise ValueError(
                f"token_mask must be bool [T={logits_TE.shape[0]}] with True = real token."
            )
        # where, not multiply: padding rows may hold inf/nan logits.
        return torch.where(token_mask_T.unsqueeze(1), usage_TE, 0.0).sum(dim=0)


_BIAS_DIRECTIONS = {"sparsify": 1.0, "balance": -1.0}


def update_bias(
    bias_E: torch.Tensor, usage_E: torch.Tensor, rate: float, direction: str
) -> torch.Tensor:
    """One sign-step bias update; returns a new fp32 tensor.

    sparsify (ExpertCondenser): b += rate * sign(u - mean(u)), popular experts up, rare down.
    balance (DeepSeek-V3 / Megatron-Core): b += rate * sign(mean(u) - u). Experts exactly at the
    mean do not move. The arithmetic stays in fp32 so that 5e-5 steps survive at |b| ~ 0.1.

    Args:
        bias_E: current fp32 bias [E]; not modified.
        usage_E: usage [E] from `expert_usage` (all-reduced by the caller).
        rate: gamma >= 0.
        direction: "sparsify" or "balance".

    Returns:
        The updated bias, fp32 [E].

    Raises:
        ValueError: non-fp32 bias, shape mismatch, negative rate or unknown direction.
    """
    if bias_E.dtype != torch.float32:
        raise ValueError(
            f"bias must be float32, got {bias_E.dtype}; bf16 loses 5e-5 steps once |b| > 0.016."
        )
    if usage_E.shape != bias_E.shape:
        raise ValueError(f"usage shape {tuple(usage_E.shape)} != bias shape {tuple(bias_E.shape)}.")
    if not rate >= 0:
        raise ValueError(f"rate must be >= 0, got {rate}; choose the sign with `direction`.")
    if direction not in _BIAS_DIRECTIONS:
        raise ValueError(
            f"direction={direction!r} is unknown; choose one of {sorted(_BIAS_DIRECTIONS)}."
        )
    with torch.no_grad():
        usage_E = usage_E.detach().float()
        step_E = torch.sign(usage_E - usage_E.mean()) * (_BIAS_DIRECTIONS[direction] * rate)
        return bias_E.detach() + step_E


def select_condensers(bias_E: torch.Tensor, r: int) -> torch.Tensor:
    """The r experts with the lowest bias, ties broken towards the lower expert id.

    Biases are multiples of gamma, so ties are common; a stable ascending sort makes the choice
    deterministic. An all-zero bias is not rejected: that policy belongs to the caller.

    Args:
        bias_E: selection bias [E].
        r: number of condensers, in [0, E].

    Returns:
        LongTensor [r] of expert ids, in ascending id order (empty for r = 0).

    Raises:
        ValueError: r outside [0, E] or bias not 1-D.
    """
    if bias_E.dim() != 1:
        raise ValueError(f"bias must be 1-D [E], got shape {tuple(bias_E.shape)}.")
    if not 0 <= r <= bias_E.numel():
        raise ValueError(f"r={r} condensers must be in [0, num_experts={bias_E.numel()}].")
    order_E = torch.sort(bias_E.detach(), stable=True).indices
    return torch.sort(order_E[:r]).values


def gini(values_E: torch.Tensor) -> float:
    """Gini coefficient of a non-negative usage vector: 0 = uniform, (E - 1) / E = one expert.

    Args:
        values_E: non-negative values [E] (counts or soft usage).

    Returns:
        The coefficient as a Python float; 0.0 for an empty or all-zero vector.

    Raises:
        ValueError: a negative value.
    """
    values = values_E.detach().double().flatten()
    if bool((values < 0).any()):
        raise ValueError("gini needs non-negative values (usage counts or probability mass).")
    num_values, total = values.numel(), values.sum()
    if num_values == 0 or total == 0:
        return 0.0
    ranks = torch.arange(1, num_values + 1, dtype=torch.float64, device=values.device)
    weighted = (ranks * torch.sort(values).values).sum()
    return float(2 * weighted / (num_values * total) - (num_values + 1) / num_values)
