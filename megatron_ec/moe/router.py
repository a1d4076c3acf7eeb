"""The ExpertCondenser router: Megatron-Core's `TopKRouter` with our `routing()`.

It keeps everything of `TopKRouter` except the selection: fp32 gating (`moe_router_dtype="fp32"`),
input jitter, z-loss and the aux-loss machinery stay Megatron-Core's; `routing()` calls the pure
math in `megatron_ec.moe.routing`. It enters the model through the MoE spec's `router` field
(`megatron_ec.moe.spec.inject_router`), so experts and dispatchers remain Megatron-Core's.

Terms (Megatron-Core's, plus ours):
    logits          s = W_r h, fp32 [tokens, E], unbiased.
    selection_bias  b, fp32 [E] persistent buffer: added to the selection key only (paper Eq. 6);
                    never a Parameter, never cast by `model.to(dtype)` or `Float16Module`.
    usage           per-expert usage over the real tokens of the current optimizer step
                    (soft or hard, `MethodState.usage_signal`), accumulated over micro-batches
                    in training forwards only; reduced and consumed by `state.bias_update_step`.
    condensers      J, the r experts of this layer forced into every token's selection (set by
                    `state.apply_method_state`); r = 0 disables them in this layer.
    num_slots       experts dispatched per token (`moe_router_topk` of the dispatcher): k, or
                    k + max r in reference mode; layers with fewer condensers pad with
                    zero-weight placeholder experts so the dispatcher sees the same count.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.moe.fp32_buffers import KeepsFp32Buffers
from megatron_ec.moe.method_state import MethodState
from megatron_ec.moe.routing import (
    RoutingConfig,
    add_placeholders,
    expert_usage,
    num_slots,
    route,
    validate_condensers,
)


class ECRouter(KeepsFp32Buffers, TopKRouter):
    """Top-k router with the family's routing, bias routing, and condenser experts."""

    fp32_buffers = ("selection_bias", "usage_accum", "gate_accum")
    """Stay fp32 whatever the model is cast to; device moves still apply."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 routing_cfg: RoutingConfig, method: MethodState, slots: int) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        num_experts = config.num_moe_experts
        if slots != config.moe_router_topk:
            raise ValueError(f"router slots {slots} != moe_router_topk {config.moe_router_topk}")
        self.routing_cfg = routing_cfg
        self.method = method
        self.slots = slots
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("usage_accum", torch.zeros(num_experts, dtype=torch.float32),
                             persistent=False)
        # [sum of condenser gate weights, number of (token, condenser) pairs] of the step
        self.register_buffer("gate_accum", torch.zeros(2, dtype=torch.float32), persistent=False)
        self.register_buffer("condenser_ids", torch.empty(0, dtype=torch.long), persistent=False)

    @property
    def layer_index(self) -> int:
        """0-based decoder layer index (Megatron's layer_number is 1-based)."""
        return self.layer_number - 1

    def set_condensers(self, ids) -> None:
        """Fix this layer's condensers (an empty list disables them)."""
        ids = validate_condensers(ids, self.config.num_moe_experts, self.selection_bias.device)
        num_slots(self.routing_cfg, ids.numel())  # raises if r does not fit the mode
        self.condenser_ids = ids

    def _active_condensers(self) -> torch.Tensor | None:
        if self.method.name != "condenser" or not self.method.force_condensers:
            return None
        return self.condenser_ids if self.condenser_ids.numel() else None

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """(probs [tokens, E], routing_map [tokens, E]) with exactly `slots` experts per token."""
        seq_length, batch = logits.shape[:2]
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        padding_T = None if padding_mask is None else padding_mask.reshape(-1)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_T)
        bias_E = self.selection_bias if self.method.uses_bias else None
        condensers = self._active_condensers()
        probs_TE, routing_map_TE = _route_padded(logits_TE, self.routing_cfg, bias_E, condensers,
                                                 self.slots)
        if self.training and torch.is_grad_enabled():
            # Only the forward that builds the graph counts: eval and no-grad forwards never do,
            # and under activation recompute exactly one of the two passes has grad enabled.
            self._accumulate(logits_TE.detach(), probs_TE.detach(), padding_T, bias_E, condensers)
            if self.is_aux_loss_enabled():
                probs_TE = self._attach_aux_loss(logits_TE, probs_TE, padding_T, seq_length, batch)
        return probs_TE, routing_map_TE

    @torch.no_grad()
    def _accumulate(self, logits_TE, probs_TE, padding_T, bias_E, condensers) -> None:
        real_T = None if padding_T is None else ~padding_T
        self.usage_accum += expert_usage(
            logits_TE, self.routing_cfg, bias_E, token_mask_T=real_T,
            signal=self.method.usage_signal, condensers=condensers,
        )
        if condensers is not None:
            gates_TR = probs_TE[:, condensers]
            if real_T is not None:
                gates_TR = gates_TR[real_T]
            self.gate_accum += torch.stack([gates_TR.sum(), torch.tensor(float(gates_TR.numel()))])

    def _attach_aux_loss(self, logits_TE, probs_TE, padding_T, seq_length, batch):
        """The family's load-balancing loss through Megatron-Core's own machinery (SFT + aux)."""
        aux_map_TE, aux_scores_TE = compute_routing_scores_for_aux_loss(
            logits_TE, self.routing_cfg.topk, self.score_function, fused=False,
            padding_mask=padding_T,
        )
        with_padding = padding_T is not None
        probs_TE = self._apply_aux_loss(probs_TE, aux_scores_TE, aux_map_TE,
                                        with_padding_mask=with_padding)
        probs_TE = self._apply_seq_aux_loss(probs_TE, aux_scores_TE, aux_map_TE, seq_length, batch,
                                            with_padding_mask=with_padding)
        return probs_TE


def _route_padded(logits_TE, cfg: RoutingConfig, bias_E, condensers, slots: int):
    """`route()`, then zero-weight placeholders up to `slots` (layers with r below the max)."""
    probs_TE, routing_map_TE = route(logits_TE, cfg, bias_E, condensers)
    if int(routing_map_TE[0].sum()) < slots:
        routing_map_TE = add_placeholders(routing_map_TE, slots)
    return probs_TE, routing_map_TE


def routing_config(model_cfg: MoEModelConfig, method: MethodState) -> RoutingConfig:
    """The family's routing (score function, top-k, renormalisation, scaling) + condenser mode."""
    return RoutingConfig(
        num_experts=model_cfg.num_experts,
        topk=model_cfg.topk,
        score_function=model_cfg.score_function,
        norm_topk_prob=model_cfg.norm_topk_prob,
        scaling_factor=model_cfg.routed_scaling_factor,
        condenser_mode=method.condenser_mode,
        num_groups=model_cfg.num_groups,
        group_topk=model_cfg.group_topk,
    )


def num_router_slots(model_cfg: MoEModelConfig, method: MethodState) -> int:
    """Experts dispatched per token: k, or k + max r for condensers in reference mode."""
    cfg = routing_config(model_cfg, method)
    if method.name != "condenser":
        return cfg.topk
    per_layer = method.condensers_for(model_cfg.moe_layers)
    return max(num_slots(cfg, r) for r in per_layer.values())


def ec_router_builder(model_cfg: MoEModelConfig, method: MethodState):
    """The router builder for `decoder_block_spec(router_builder=...)`."""
    return functools.partial(
        ECRouter,
        routing_cfg=routing_config(model_cfg, method),
        method=method,
        slots=num_router_slots(model_cfg, method),
    )
