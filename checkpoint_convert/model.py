"""The Megatron model the converter fills (import) or reads (export, verify).

Always built with the project's `ECRouter`, as the trainer builds it, so every MoE layer has its
`selection_bias` buffer and routes with the family's rule (or the checkpoint's method state).
"""

from __future__ import annotations

import torch

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family
from megatron_ec.moe.method_state import MethodState
from megatron_ec.parallel import ParallelConfig

PRECISIONS = {torch.bfloat16: "bf16"}
"""Megatron parameter dtype for an HF dtype: bf16 stays bf16, everything else is held in fp32
(fp16 -> fp32 is exact, and export casts back)."""


def precision_for(dtype: torch.dtype) -> str:
    return PRECISIONS.get(dtype, "fp32")


def build_model(family: Family, cfg: MoEModelConfig, method: MethodState,
                parallel: ParallelConfig, precision: str = "fp32") -> torch.nn.Module:
    """This rank's `GPTModel`, uninitialised (every tensor is then loaded), routers set up.

    Args:
        family: the family adapter (its attention hook edits the spec).
        cfg: the model.
        method: routing method; sets the router slots (k + r in reference mode).
        parallel: the TP/EP layout; `init_parallel` must have run with it.
        precision: "fp32" or "bf16" parameters.
    """
    from megatron_ec.models.builder import (
        RuntimeOptions,
        build_gpt_model,
        decoder_block_spec,
        transformer_config,
    )
    from megatron_ec.moe.router import ec_router_builder, num_router_slots

    runtime = RuntimeOptions(precision=precision, num_router_slots=num_router_slots(cfg, method))
    tcfg = transformer_config(cfg, parallel, runtime)
    # Every parameter is overwritten by the strict load, so random init is wasted time.
    tcfg.perform_initialization = False
    spec = decoder_block_spec(tcfg, ec_router_builder(cfg, method), family.attention_hook(cfg))
    return build_gpt_model(cfg, tcfg, spec)


def set_routing_state(model: torch.nn.Module, method: MethodState,
                      biases: dict[int, torch.Tensor] | None = None) -> None:
    """Install the method state (condensers) and, if given, the per-layer selection biases."""
    from megatron_ec.moe.state import apply_method_state, load_selection_biases

    if biases is not None:
        load_selection_biases(model, biases)
    apply_method_state(model, method)
