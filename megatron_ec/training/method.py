"""The trainer's only door into the routing method (`megatron_ec.moe.router`, `megatron_ec.moe.state`).

The loop calls, in this order:
    build:    `router_builder()` and `router_slots()` when the model is built;
    start:    `begin_phase()` once the weights are loaded (picks condensers for a fresh phase 2,
              re-applies a saved method state otherwise);
    per step: `after_optimizer_step()` once per optimizer step on every rank, after
              `finalize_grads()` and after the optimizer update (the bias is a buffer, so the
              order with respect to the update does not change any number; doing it last means a
              step's weights and bias change together);
    logging:  `metrics()`.
"""

from __future__ import annotations

import logging

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.moe.method_state import MethodState

logger = logging.getLogger(__name__)


def _state_module():
    from megatron_ec.moe import state

    return state


def router_builder(model_cfg: MoEModelConfig, method: MethodState):
    """The router class for every MoE layer (the family's routing plus the method)."""
    from megatron_ec.moe.router import ec_router_builder

    return ec_router_builder(model_cfg, method)


def router_slots(model_cfg: MoEModelConfig, method: MethodState) -> int:
    """Slots per token the dispatcher must expect (k, or k + r in reference mode)."""
    from megatron_ec.moe.router import num_router_slots

    return num_router_slots(model_cfg, method)


def begin_phase(model, method: MethodState, source: MethodState, resumed: bool) -> MethodState:
    """The method state this run trains with, applied to `model` (weights already loaded).

    A fresh condenser phase fixes J per layer, first match wins: the layer's entry in
    `method.condensers` (checked: MoE layer, r ids, distinct, in range); else the starting
    checkpoint's condensers (J is fixed once chosen, METHODS.md s.3); else the r lowest-bias
    experts (`moe.state.start_condenser_phase`). A partial `method.condensers` is thus filled in.

    Args:
        model: the unwrapped GPTModel.
        method: the run's `method` section (or, when resuming, the state saved by this run).
        source: the method state stored with the starting checkpoint.
        resumed: True when `method` comes from this run's own checkpoint.
    """
    state = _state_module()
    if resumed or method.name != "condenser":
        state.apply_method_state(model, method)
        return method
    state.check_listed_condensers(model, method)
    carried = source.condensers if source.name == "condenser" else {}
    if set(carried) - set(method.condensers):
        logger.info("keeping the condensers of the starting checkpoint")
    chosen = MethodState.from_dict({**method.to_dict(),
                                    "condensers": {**carried, **method.condensers}})
    return state.start_condenser_phase(model, chosen)


def after_optimizer_step(model) -> None:
    """The once-per-step bias update (a no-op for methods without a bias); all ranks."""
    _state_module().bias_update_step(model)


def metrics(model) -> dict:
    """Per-layer routing statistics: bias mean/min/max, usage gini, condenser ids and gate."""
    return _state_module().routing_metrics(model)
