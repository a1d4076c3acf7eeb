"""The ExpertCondenser router: Megatron-Core's `TopKRouter` with our `routing()`.

It keeps everything of `TopKRouter` except the selection: fp32 gating (`moe_router_dtype="fp32"`),
input jitter, z-loss and the aux-loss machinery stay Megatron-Core's; `routing()` calls the pure
math in `megatron_ec.moe.routing`. It enters the model through the MoE spec's `router` field
(`megatron_ec.moe.spec.inject_moe_submodules`), so experts and dispatchers remain Megatron-Core's.
Which method runs is not its business: the method hands it a `RoutingConfig` (the family's rule
plus the condenser mode), a `RouterPolicy` and its slot count when the model is built, and its
condensers (`set_condensers`) once they are known.

Terms (Megatron-Core's, plus ours):
    logits          s = W_r h, fp32 [tokens, E], unbiased.
    selection_bias  b, fp32 [E] persistent buffer: added to the selection key only (paper Eq. 6);
                    never a Parameter, never cast by `model.to(dtype)` or `Float16Module`.
    usage           per-expert usage over the real tokens of the current optimizer step
                    (soft or hard, `RouterPolicy.usage_signal`), accumulated over micro-batches
                    in training forwards only; reduced over ranks by `state.bias_update_step`,
                    then consumed by `end_step`.
    condensers      J, the r experts of this layer forced into every token's selection;
                    r = 0 (an empty list) disables them in this layer.
    num_slots       experts dispatched per token (`moe_router_topk` of the dispatcher): k, or
                    k + max r in reference mode; layers with fewer condensers pad with
                    zero-weight placeholder experts so the dispatcher sees the same count.
                    Placeholders are spread over the EP ranks (`moe.placeholders`).
    replicated      condenser placement "replicated" (`moe.replicated`): the condenser columns
                    leave the dispatched map (k - r slots in paper mode, k in reference mode);
                    their gate weights, the same values as routed, go to the MoE layer, which
                    computes the condensers on this rank's tokens.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter

from megatron_ec.moe.fp32_buffers import KeepsFp32Buffers
from megatron_ec.moe.placeholders import add_placeholders, placeholder_load
from megatron_ec.moe.policy import RouterPolicy
from megatron_ec.moe.routing import (
    RoutingConfig,
    expert_usage,
    num_slots,
    route,
    update_bias,
    validate_condensers,
)


class ECRouter(KeepsFp32Buffers, TopKRouter):
    """Top-k router with the family's routing, bias routing, and condenser experts.

    State besides `TopKRouter`'s: `selection_bias` (persistent), the step's accumulators
    `usage_accum` and `gate_accum`, the statistics of the last finished step `last_usage` and
    `last_gate` (mean condenser gate weight, a 0-d tensor), `condenser_ids` (validated once,
    in `set_condensers`: the forward reads no values, see docs/DESIGN.md "GPU discipline"), and
    `spec_record` (the specialisation losses' inputs of the last training micro-batch, when
    `record_scores`).
    """

    fp32_buffers = ("selection_bias", "usage_accum", "gate_accum", "last_usage", "last_gate",
                    "placeholder_accum")
    """Stay fp32 whatever the model is cast to; device moves still apply."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 routing_cfg: RoutingConfig, policy: RouterPolicy, slots: int,
                 record_scores: bool = False, replicated: bool = False) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        num_experts = config.num_moe_experts
        if slots != config.moe_router_topk:
            raise ValueError(f"router slots {slots} != moe_router_topk {config.moe_router_topk}")
        self.routing_cfg = routing_cfg
        self.policy = policy
        self.slots = slots
        self.replicated = replicated
        """Condensers computed by the MoE layer on this rank (`moe.replicated`), not dispatched."""
        self.placeholder_groups = config.expert_model_parallel_size
        self.condenser_weights: torch.Tensor | None = None
        """Replicated placement: the gate weights [T, r] of the last forward, for the layer."""
        device, fp32 = self.weight.device, torch.float32  # where the router's weight lives
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=fp32, device=device))
        self.register_buffer("usage_accum", torch.zeros(num_experts, dtype=fp32, device=device),
                             persistent=False)
        # [sum of condenser gate weights, number of (token, condenser) pairs] of the step
        self.register_buffer("gate_accum", torch.zeros(2, dtype=fp32, device=device),
                             persistent=False)
        self.register_buffer("last_usage", torch.zeros(num_experts, dtype=fp32, device=device),
                             persistent=False)
        # mean condenser gate weight of the last step (nan: none), read by the metrics
        self.register_buffer("last_gate", torch.full((), float("nan"), dtype=fp32, device=device),
                             persistent=False)
        self.register_buffer("condenser_ids", torch.empty(0, dtype=torch.long, device=device),
                             persistent=False)
        # placeholder slots sent to each EP rank since the last `take_placeholder_load`
        self.register_buffer("placeholder_accum",
                             torch.zeros(self.placeholder_groups, dtype=fp32, device=device),
                             persistent=False)
        self.record_scores = record_scores
        """Keep `spec_record` in training forwards (the specialisation losses, `moe.spec_losses`)."""
        self.spec_record: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """(softmax(logits) [T, E] with its graph, real-token mask [T], routing map [T, E]) of the
        last training forward that built a graph; taken (and cleared) by `take_spec_record`."""

    @property
    def layer_index(self) -> int:
        """0-based decoder layer index (Megatron's layer_number is 1-based)."""
        return self.layer_number - 1

    def set_condensers(self, ids) -> None:
        """Fix this layer's forced condensers (an empty list disables them)."""
        # The one value check of J: on the host, here, never in the forward.
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu()
        ids = validate_condensers(ids, self.config.num_moe_experts)
        num_slots(self.routing_cfg, ids.numel())  # raises if r does not fit the mode
        self.condenser_ids = ids.to(self.selection_bias.device)

    def _active_condensers(self) -> torch.Tensor | None:
        return self.condenser_ids if self.condenser_ids.numel() else None

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """(probs [tokens, E], routing_map [tokens, E]) with exactly `slots` experts per token."""
        seq_length, batch = logits.shape[:2]
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        padding_T = None if padding_mask is None else padding_mask.reshape(-1)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_T)
        bias_E = self.selection_bias if self.policy.select_with_bias else None
        condensers = self._active_condensers()
        probs_TE, routing_map_TE = route(logits_TE, self.routing_cfg, bias_E, condensers,
                                         self.placeholder_groups)
        sent_TE, map_TE = self._dispatched(probs_TE, routing_map_TE, condensers)
        if self.training and torch.is_grad_enabled():
            # Dispatch load: padding tokens are dispatched too, so they count here.
            self.placeholder_accum += placeholder_load(map_TE, sent_TE, self.placeholder_groups)
            # Only the forward that builds the graph counts: eval and no-grad forwards never do,
            # and under activation recompute exactly one of the two passes has grad enabled.
            self._accumulate(logits_TE.detach(), probs_TE.detach(), padding_T, bias_E, condensers)
            if self.record_scores:
                real_T = (torch.ones(logits_TE.shape[0], dtype=torch.bool, device=logits_TE.device)
                          if padding_T is None else ~padding_T)
                self.spec_record = (torch.softmax(logits_TE.float(), dim=-1), real_T,
                                    routing_map_TE.detach())
            if self.is_aux_loss_enabled():
                sent_TE = self._attach_aux_loss(logits_TE, sent_TE, padding_T, seq_length, batch)
        return sent_TE, map_TE

    def _dispatched(self, probs_TE, routing_map_TE, condensers):
        """(probs, map) for the dispatcher: replicated condensers taken out, then zero-weight
        placeholders up to `slots`; keeps the replicated gate weights in `condenser_weights`."""
        r = 0 if condensers is None else condensers.numel()
        # From the config, not the map's values: route() gives num_slots(cfg, r) per token.
        count = num_slots(self.routing_cfg, r)
        occupied_TE = None
        self.condenser_weights = None
        if self.replicated and r:
            # The same values as the routed columns (a duplicate's two weights already summed).
            self.condenser_weights = probs_TE.index_select(1, condensers)
            occupied_TE = torch.zeros_like(routing_map_TE[:1]).index_fill(1, condensers, True)
            probs_TE = probs_TE.index_fill(1, condensers, 0.0)
            routing_map_TE = routing_map_TE.index_fill(1, condensers, False)
            count -= r
        if count < self.slots:
            routing_map_TE = add_placeholders(routing_map_TE, self.slots, self.placeholder_groups,
                                              occupied_TE, max_missing=self.slots - count)
        return probs_TE, routing_map_TE

    def take_condenser_weights(self) -> torch.Tensor | None:
        """The replicated condensers' gate weights [T, r] of the last forward, cleared."""
        weights, self.condenser_weights = self.condenser_weights, None
        return weights

    def take_placeholder_load(self) -> torch.Tensor:
        """Placeholder slots sent to each EP rank since the last call [G], then reset."""
        load = self.placeholder_accum.clone()
        self.placeholder_accum.zero_()
        return load

    @torch.no_grad()
    def _accumulate(self, logits_TE, probs_TE, padding_T, bias_E, condensers) -> None:
        real_T = None if padding_T is None else ~padding_T
        self.usage_accum += expert_usage(
            logits_TE, self.routing_cfg, bias_E, token_mask_T=real_T,
            signal=self.policy.usage_signal, condensers=condensers,
        )
        if condensers is not None:
            # Device-side: the padding mask selects by `where` (no data-dependent shape), the
            # count is a device tensor (no host read, no CPU literal).
            gates_TR = probs_TE.index_select(1, condensers)
            if real_T is None:
                count = gates_TR.new_full((), float(gates_TR.numel()))
            else:
                gates_TR = torch.where(real_T.unsqueeze(1), gates_TR, 0.0)
                count = real_T.sum(dtype=gates_TR.dtype) * gates_TR.shape[1]
            self.gate_accum += torch.stack([gates_TR.sum(), count])

    def take_spec_record(self):
        """`spec_record` of the micro-batch just forwarded, cleared (None when there is none)."""
        record, self.spec_record = self.spec_record, None
        return record

    def step_statistics(self) -> torch.Tensor:
        """This rank's accumulators of the step, [E + 2]: usage, condenser gate sum and count."""
        return torch.cat([self.usage_accum, self.gate_accum])

    @torch.no_grad()
    def end_step(self, stats: torch.Tensor) -> None:
        """Consume the step's statistics, summed over every rank that routes different tokens.

        Moves the bias when the policy says so (identical fp32 arithmetic on every rank), keeps
        `last_usage` and `last_gate` for the metrics, and resets the accumulators.
        """
        usage_E = stats[: self.usage_accum.numel()]
        gate_sum, gate_count = stats[-2], stats[-1]
        update = self.policy.bias_update
        if update is not None:  # a step without usage (no training forward) keeps the bias
            moved_E = update_bias(self.selection_bias, usage_E, update.gamma, update.direction)
            self.selection_bias.copy_(torch.where(usage_E.sum() > 0, moved_E, self.selection_bias))
        self.last_usage.copy_(usage_E)
        self.last_gate.copy_(torch.where(gate_count > 0, gate_sum / gate_count, float("nan")))
        self.usage_accum.zero_()
        self.gate_accum.zero_()

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
