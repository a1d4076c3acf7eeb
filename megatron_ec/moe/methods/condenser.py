"""ExpertCondenser (METHODS.md s.3): bias routing plus r fixed, always-active condenser experts.

Condensers J are the r lowest-bias experts of each MoE layer (ties to the lower id), chosen
when the condenser phase starts from the bias learned in the bias phase (unless the user lists
them), then fixed: recorded in the run's decisions, saved with every checkpoint, reused on
resume, at export and in the HF restore.
"""

from __future__ import annotations

import logging
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_ec.moe import state as router_ops
from megatron_ec.moe.methods.base import Decisions, MoEFacts, PhaseStart, layer_ids
from megatron_ec.moe.methods.bias import BiasConfig, BiasRouting
from megatron_ec.moe.methods.registry import register
from megatron_ec.moe.routing import num_slots, select_condensers

logger = logging.getLogger(__name__)


PLACEMENTS = ("routed", "replicated")


@dataclass(frozen=True)
class CondenserConfig(BiasConfig):
    """`method:` of the condenser phase (the ExpertCondenser recipe's phase 2)."""

    name: str = "condenser"
    num_condensers: int | list[int] = 2
    """r per MoE layer: one int for all, or a list with one entry per MoE layer (0 disables)."""
    condensers: dict[int, list[int]] = field(default_factory=dict)
    """Condensers fixed by the user: {layer index (0-based, all decoder layers): expert ids}.
    Layers not listed get the r lowest-bias experts when the phase starts."""
    force_condensers: bool = True
    """False drops the forcing at evaluation (paper Sec. 6.3 persistent-path ablation). An
    evaluation switch only: a training config with false is refused (it would train bias-only)."""
    condenser_placement: str = "routed"
    """"routed" (the condensers stay routed experts on their EP ranks, dispatched like any pick)
    or "replicated" (every rank computes them on its own tokens with the same gate weights; only
    the other slots travel the all-to-all; weights stored in the routed layout; see
    docs/EP_PLACEMENT.md). The math is the same; replicated needs experts without biases and
    no orthogonality loss."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "condensers", layer_ids(self.condensers))
        if self.condenser_placement not in PLACEMENTS:
            raise ValueError(f"method.condenser_placement={self.condenser_placement!r}: use one "
                             f"of {', '.join(PLACEMENTS)}")
        if self.replicated and "orthogonality" in self.spec_losses:
            raise ValueError("method.spec_losses.orthogonality needs every expert's output from "
                             "the dispatcher; use method.condenser_placement=routed with it")

    @property
    def replicated(self) -> bool:
        return self.condenser_placement == "replicated"

    def check_for_training(self) -> None:
        if not self.force_condensers:
            raise ValueError("method.force_condensers=false is an evaluation switch (the paper's "
                             "persistent-path ablation, Sec. 6.3); training always forces the "
                             "condensers: remove it from the training config")

    def condensers_for(self, moe_layers: list[int] | tuple[int, ...]) -> dict[int, int]:
        """r per MoE layer index, validated against the model's MoE layers."""
        if isinstance(self.num_condensers, int):
            return {layer: self.num_condensers for layer in moe_layers}
        if len(self.num_condensers) != len(moe_layers):
            raise ValueError(
                f"method.num_condensers has {len(self.num_condensers)} entries but the model has "
                f"{len(moe_layers)} MoE layers; give one r per MoE layer or a single int"
            )
        return dict(zip(moe_layers, self.num_condensers))


@dataclass
class CondenserDecisions(Decisions):
    """What a condenser run decided."""

    condensers: dict[int, list[int]] = field(default_factory=dict)
    """J per MoE layer ({layer index: expert ids}); empty until the phase starts, fixed after."""

    def __post_init__(self) -> None:
        self.condensers = layer_ids(self.condensers)


def _choose(router, r: int) -> list[int]:
    """The r lowest-bias experts of one router (a pure function of the rank-identical bias)."""
    bias = router.selection_bias
    if r > 0 and not bool(bias.ne(0).any()):
        raise ValueError(
            f"layer {router.layer_index}: the selection bias is all zeros, so there is nothing "
            "to choose condensers from; start the condenser phase from a bias-phase checkpoint "
            "(method.name=bias) or list them in method.condensers"
        )
    return select_condensers(bias, r).tolist()


@register
class ExpertCondenser(BiasRouting):
    """Bias routing with r condensers per layer forced into every token's selection."""

    name = "condenser"
    Config = CondenserConfig
    Decisions = CondenserDecisions

    def dispatcher_slots(self, facts: MoEFacts) -> int:
        """k + max r (reference mode) or k (paper), routed; replicated: the slots left once the
        condensers leave the dispatch, k - min r (paper) or k (reference). Layers below the
        maximum pad with zero-weight placeholders; r = k everywhere (paper) leaves nothing to
        dispatch, but Megatron-Core's dispatcher needs a slot: one placeholder per token."""
        per_layer = self.config.condensers_for(facts.moe_layers)
        routing = self.routing(facts)
        left = 1 if self.config.replicated else 0
        return max(1, max(num_slots(routing, r) - left * r for r in per_layer.values()))

    def router_builder(self, facts: MoEFacts) -> Callable:
        return functools.partial(super().router_builder(facts),
                                 replicated=self.config.replicated)

    def moe_layer_class(self, facts: MoEFacts) -> type | None:
        if not self.config.replicated:
            return None
        from megatron_ec.moe.replicated import ReplicatedCondenserMoELayer

        return ReplicatedCondenserMoELayer

    def begin_phase(self, start: PhaseStart) -> None:
        """Keep the decided condensers when resuming; otherwise fix J per layer, first match
        wins: the layer's entry in `method.condensers` (checked: MoE layer, r distinct ids in
        range); else the starting checkpoint's condensers (J is fixed once chosen, METHODS.md
        s.3); else the r lowest-bias experts. A partial `method.condensers` is thus filled in."""
        if not start.resumed:
            carried = start.source.decisions if isinstance(start.source, ExpertCondenser) else None
            self.choose_condensers(start.model, carried.condensers if carried else {})
        self.apply(start.model)

    def choose_condensers(self, model: torch.nn.Module,
                          carried: dict[int, list[int]] | None = None) -> None:
        """Fill `decisions.condensers`: listed, else `carried`, else the r lowest-bias experts."""
        self.check_listed_condensers(model)
        carried = carried or {}
        if set(carried) - set(self.config.condensers):
            logger.info("keeping the condensers of the starting checkpoint")
        routers = router_ops.ec_routers(model)
        per_layer = self.config.condensers_for([r.layer_index for r in routers])
        for router in routers:
            layer = router.layer_index
            chosen = self.config.condensers.get(layer, carried.get(layer))
            self.decisions.condensers[layer] = (
                list(chosen) if chosen is not None else _choose(router, per_layer[layer]))

    def check_listed_condensers(self, model: torch.nn.Module) -> None:
        """ValueError (one line, naming `method.condensers`) unless every listed layer is a MoE
        layer of the model with exactly its r distinct expert ids in [0, E)."""
        routers = router_ops.ec_routers(model)
        per_layer = self.config.condensers_for([r.layer_index for r in routers])
        router_ops.check_expert_lists("method.condensers", self.config.condensers, model,
                                      sizes=per_layer)

    def apply(self, model: torch.nn.Module) -> None:
        routers = router_ops.ec_routers(model)
        per_layer = self.config.condensers_for([r.layer_index for r in routers])
        for router in routers:
            ids = self.decisions.condensers.get(router.layer_index, [])
            if len(ids) != per_layer[router.layer_index]:
                raise ValueError(f"layer {router.layer_index}: method is 'condenser' with r="
                                 f"{per_layer[router.layer_index]} but {len(ids)} condensers "
                                 "are recorded; begin the condenser phase first")
        super().apply(model)
        if self.config.replicated:
            from megatron_ec.moe.replicated import refresh_replicas

            refresh_replicas(model)

    def after_backward(self, model: torch.nn.Module) -> None:
        """Replicated: the replicas' gradients into their owners' `main_grad`."""
        super().after_backward(model)
        if self.config.replicated:
            from megatron_ec.moe.replicated import reduce_replica_grads

            reduce_replica_grads(model)

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        """Bias update; replicated: the replicas refreshed from the updated owners."""
        super().after_optimizer_step(model)
        if self.config.replicated:
            from megatron_ec.moe.replicated import refresh_replicas

            refresh_replicas(model)

    def forced_condensers(self, layer: int) -> list[int]:
        if not self.config.force_condensers:
            return []
        return list(self.decisions.condensers.get(layer, []))
