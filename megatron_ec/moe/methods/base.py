"""The method contract (read `README.md` in this folder first): config, decisions, the method.

A method is three classes: a frozen `MethodConfig` subclass (what the user configured, the
`method:` section), a `Decisions` subclass (what a run decided, e.g. the chosen condensers) and a
`Method` subclass that owns both and answers every question the trainer, the converter and the
HF restore ask. The base `Method` is the family's own routing with nothing trained differently:
a subclass overrides only what it changes.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch

from megatron_ec.moe import state as router_ops
from megatron_ec.moe.policy import RouterPolicy
from megatron_ec.moe.routing import RoutingConfig


def layer_ids(mapping: dict) -> dict[int, list[int]]:
    """{layer: expert ids} with int keys and values (JSON gives string keys)."""
    return {int(layer): [int(e) for e in ids] for layer, ids in mapping.items()}


def _json_keys(value: Any) -> Any:
    """`value` with every dict key a string and tuples as lists (what JSON writes)."""
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_json_keys(v) for v in value]
    return value


def _check_keys(cls: type, data: dict, what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; known: {sorted(known)}")


@dataclass(frozen=True)
class MethodConfig:
    """The `method:` section: one frozen subclass per method, chosen by `name`.

    Subclasses redeclare `name` with their method's name as the default, add their keys with
    attribute docstrings, and validate in `__post_init__` (calling `super().__post_init__()`).
    """

    name: str = "sft"
    """The fine-tuning method: sft, bias, condenser, densemixer or esft (METHODS.md s.1-5); the
    keys below say which methods use them."""
    spec_losses: dict[str, float] = field(default_factory=dict)
    """Expert-specialisation losses added to the task loss, any method (METHODS.md s.6):
    {variance: w_v, orthogonality: w_o}, e.g. {variance: 1.0e-3, orthogonality: 1.0e-4} (the
    paper's weights); {} = off. Each term is a mean over the real tokens of a micro-batch and over
    the MoE layers, added per micro-batch (see `megatron_ec/moe/spec_losses.py`); orthogonality
    needs the alltoall dispatcher under EP or expert TP, both need train.recompute=none. Logged as
    spec/variance, spec/orthogonality."""

    def __post_init__(self) -> None:
        from megatron_ec.moe.methods.registry import method_class
        from megatron_ec.moe.spec_losses import check_weights

        check_weights(self.spec_losses)
        object.__setattr__(self, "spec_losses",
                           {k: float(v) for k, v in self.spec_losses.items()})

        owner = method_class(self.name)  # a ValueError naming the registered methods
        if owner.Config is not type(self):
            raise ValueError(f"method.name={self.name!r} is configured by "
                             f"{owner.Config.__name__}, not {type(self).__name__}")

    def check_for_training(self) -> None:
        """Raise ValueError (one line, a fix-it) for a setting valid at evaluation only."""

    @classmethod
    def config_variant(cls, name: str) -> type["MethodConfig"]:
        """The config class of method `name` (how `config_tree` builds the `method` section)."""
        from megatron_ec.moe.methods.registry import method_class

        return method_class(name).Config

    @classmethod
    def config_variants(cls) -> dict[str, type["MethodConfig"]]:
        """{method name: config class} of every registered method, built-ins first."""
        from megatron_ec.moe.methods.registry import method_class, method_names

        return {name: method_class(name).Config for name in method_names()}

    def to_dict(self) -> dict:
        """JSON-able keys of this config, without `name`."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.pop("name")
        return _json_keys(data)

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        """Inverse of `to_dict` (plus `name`); unknown keys are a ValueError."""
        _check_keys(cls, data, f"method {data.get('name')!r} config")
        return cls(**data)


@dataclass
class Decisions:
    """What a run decided: saved with every checkpoint, fixed once made (none for this base)."""

    def to_dict(self) -> dict:
        return _json_keys(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Decisions":
        _check_keys(cls, data, f"{cls.__name__}")
        return cls(**data)


@dataclass(frozen=True)
class MoEFacts:
    """What a method may know about the model (`MoEModelConfig.moe_facts()` builds it)."""

    routing: RoutingConfig
    """The family's routing rule (score function, k, renormalisation, scaling, groups), with
    the default condenser mode."""
    moe_layers: tuple[int, ...]
    """0-based decoder-layer indices of the MoE layers."""
    aux_loss_coeff: float = 0.0
    """The family's load-balancing loss coefficient."""


@dataclass
class PhaseStart:
    """What `Method.begin_phase` gets once the weights are loaded."""

    model: torch.nn.Module
    """This rank's unwrapped GPTModel."""
    source: "Method"
    """The method saved with the starting checkpoint (its decisions may carry over)."""
    resumed: bool
    """True when this run resumes its own checkpoint: its decisions are already made."""
    micro_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None
    """One pass over this rank's training micro-batches (the trainer's batch dicts), from a
    sampler of its own, for a scoring pass before training (ESFT); None outside the trainer."""
    out_dir: "str | None" = None
    """The run's `output.dir` (where a method writes what it decided, e.g. ESFT's selection
    file, on rank 0); None outside the trainer."""


class Method:
    """A fine-tuning method bound to one run's config and decisions.

    The base class is the family's own routing, everything trainable, no extra loss; the bias is
    measured (usage metrics) but never moves.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    Decisions: ClassVar[type[Decisions]] = Decisions

    def __init__(self, config: MethodConfig, decisions: Decisions | None = None) -> None:
        if type(config) is not self.Config:
            raise TypeError(f"{type(self).__name__} takes {self.Config.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.decisions = decisions if decisions is not None else self.Decisions()
        self._spec_meter = None  # per-step spec-loss metrics (built on the first micro-batch)

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and other.config == self.config
                and other.decisions == self.decisions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, {self.decisions!r})"

    # Build: what the method puts into the model, through Megatron-Core's spec seams.
    def routing(self, facts: MoEFacts) -> RoutingConfig:
        """The routing rule every router of the model applies."""
        return facts.routing

    def router_policy(self) -> RouterPolicy:
        """Bias in the selection key, usage signal, bias update (none: the family's routing)."""
        return RouterPolicy()

    def dispatcher_slots(self, facts: MoEFacts) -> int:
        """Experts per token the dispatcher expects (`moe_router_topk`)."""
        return self.routing(facts).topk

    def aux_loss_coeff(self, facts: MoEFacts) -> float:
        """Megatron-Core's load-balancing loss coefficient; 0 = off."""
        return 0.0

    def router_builder(self, facts: MoEFacts) -> Callable:
        """The `MoESubmodules.router` builder of every MoE layer."""
        from megatron_ec.moe.router import ECRouter

        return functools.partial(ECRouter, routing_cfg=self.routing(facts),
                                 policy=self.router_policy(), slots=self.dispatcher_slots(facts),
                                 record_scores=bool(self.config.spec_losses))

    def experts_builder(self, facts: MoEFacts) -> Callable | None:
        """The `MoESubmodules.experts` builder; None keeps Megatron-Core's experts."""
        return None

    def moe_layer_class(self, facts: MoEFacts) -> type | None:
        """A subclass of Megatron-Core's `MoELayer` for every MoE layer (the spec's MLP seam);
        None keeps `MoELayer`. Condensers with `condenser_placement=replicated` use one."""
        return None

    def experts_wrapper(self, facts: MoEFacts) -> Callable | None:
        """A function of the experts builder (the spec's or `experts_builder`'s) returning the
        one to build; None = as is. The orthogonality loss keeps the unweighted outputs."""
        if "orthogonality" not in self.config.spec_losses:
            return None
        if self.experts_builder(facts) is not None:
            raise ValueError(f"method.spec_losses.orthogonality: method {self.name} brings its "
                             "own experts; the orthogonality loss is not supported with it")
        from megatron_ec.moe.spec_losses import with_unweighted_outputs

        return with_unweighted_outputs

    # Phase: decisions, router state, what trains.
    def begin_phase(self, start: PhaseStart) -> None:
        """Make (or, when resuming, keep) this run's decisions, then `apply` them."""
        self.apply(start.model)

    def apply(self, model: torch.nn.Module) -> None:
        """Install config and decisions into this rank's routers (after every weight load)."""
        for router in router_ops.ec_routers(model):
            router.set_condensers(self.forced_condensers(router.layer_index))

    def forced_condensers(self, layer: int) -> list[int]:
        """Experts forced into every token's selection in `layer` (none)."""
        return []

    def set_trainable(self, model: torch.nn.Module) -> None:
        """Freeze what does not train (`requires_grad_(False)`), before the DDP wrap."""

    # Per step, on every rank.
    def micro_batch_loss(self, model: torch.nn.Module) -> torch.Tensor | None:
        """An extra loss of the micro-batch just forwarded (a mean over its tokens), or None.

        The trainer adds it, divided by the micro-batches per step, to the micro-batch's task
        loss before the backward (Megatron DDP then averages over data-parallel ranks). The base
        class returns the weighted specialisation losses (`config.spec_losses`), if any; a
        subclass adding its own loss adds `super().micro_batch_loss(model)`.
        """
        weights = self.config.spec_losses
        if not weights:
            return None
        from megatron_ec.moe.spec_losses import SpecLossMeter, micro_batch_terms

        terms = micro_batch_terms(model, tuple(weights))
        if self._spec_meter is None:
            self._spec_meter = SpecLossMeter(tuple(weights))
        self._spec_meter.add(terms)
        return sum(weights[name] * value for name, value in terms.items())

    def after_backward(self, model: torch.nn.Module) -> None:
        """After the step's gradients are finalised, before the optimizer (gradient masks)."""

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        """Once per optimizer step: reduce the routers' statistics (and move the bias), and the
        step's specialisation-loss values."""
        router_ops.bias_update_step(model)
        if self._spec_meter is not None:
            self._spec_meter.end_step()

    def metrics(self, model: torch.nn.Module) -> dict[str, object]:
        """Per-step metrics (after `after_optimizer_step`; the EP counters are a collective:
        call on every rank)."""
        from megatron_ec.moe.ep_counters import ep_metrics

        spec = self._spec_meter.last if self._spec_meter is not None else {}
        return {**router_ops.routing_metrics(model), **ep_metrics(model), **spec}

    # Export and HF restore.
    def changes_routing(self) -> bool:
        """Whether an exported HF model must route differently from its family's own rule."""
        return self.router_policy().select_with_bias
