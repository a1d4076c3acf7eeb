"""Model assembly: the one place where a family, a method and a layout become a `GPTModel`.

The trainer, the converter and the tests all build their models here, so every model carries the
method's router (and experts, where a method brings its own) and the dispatcher slot count the
method asks for.
"""

from __future__ import annotations

import dataclasses

from megatron_ec.models.builder import (
    RuntimeOptions,
    build_gpt_model,
    decoder_block_spec,
    transformer_config,
)
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family
from megatron_ec.moe.ep_counters import install_ep_counters
from megatron_ec.moe.methods import Method
from megatron_ec.parallel import ParallelConfig


def assemble_model(model_cfg: MoEModelConfig, method: Method, parallel: ParallelConfig,
                   runtime: RuntimeOptions = RuntimeOptions(), family: Family | None = None,
                   initialize: bool = True):
    """This rank's `GPTModel` for `method`, and its `TransformerConfig`.

    Args:
        model_cfg: the model.
        method: the fine-tuning method; sets the router and experts builders (MCore's
            `MoESubmodules` seams), the dispatcher slots and the aux-loss coefficient.
        parallel: the TP/EP layout; `init_parallel` must have run with it.
        runtime: precision, recompute, sequence length (method-owned fields are overwritten).
        family: the HF family adapter, whose attention hook edits the spec; None = no quirks.
        initialize: False skips random init (every tensor is loaded right after).

    Returns:
        (model, tcfg). Routers start without condensers: call `method.apply(model)` (or
        `begin_phase`) after loading weights.
    """
    facts = model_cfg.moe_facts()
    runtime = dataclasses.replace(runtime, moe_aux_loss_coeff=method.aux_loss_coeff(facts),
                                  num_router_slots=method.dispatcher_slots(facts))
    tcfg = transformer_config(model_cfg, parallel, runtime)
    tcfg.perform_initialization = initialize
    hook = family.attention_hook(model_cfg) if family is not None else None
    spec = decoder_block_spec(tcfg, method.router_builder(facts), hook,
                              experts_builder=method.experts_builder(facts),
                              experts_wrapper=method.experts_wrapper(facts),
                              moe_layer=method.moe_layer_class(facts),
                              attention_backend=runtime.attention_backend)
    model = build_gpt_model(model_cfg, tcfg, spec)
    install_ep_counters(model)
    return model, tcfg
