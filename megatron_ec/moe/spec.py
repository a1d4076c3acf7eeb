"""Spec injection: put a router class into every MoE layer of a Megatron-Core block spec.

Megatron-Core describes each MoE layer's MLP as `functools.partial(MoELayer, submodules=MoESubmodules(
experts=..., shared_experts=..., router=TopKRouter))`. We replace only the `router` field, so the
experts, the shared experts and the token dispatcher remain Megatron-Core's own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable


def is_moe_mlp(mlp) -> bool:
    """An MoE layer's MLP entry of a layer spec (`functools.partial(MoELayer, ...)`)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return isinstance(mlp, functools.partial) and mlp.func is MoELayer


def inject_router(block_spec, router_builder: Callable):
    """Return a copy of `block_spec` whose MoE layers build their router with `router_builder`.

    Args:
        block_spec: MCore `TransformerBlockSubmodules` (local or Transformer Engine backend).
        router_builder: a callable with TopKRouter's constructor signature, e.g. a class or a
            `functools.partial` binding method-specific arguments.

    Returns:
        A new `TransformerBlockSubmodules`; dense layers and everything else are unchanged.
    """
    layer_specs = []
    num_moe = 0
    for layer_spec in block_spec.layer_specs:
        mlp = layer_spec.submodules.mlp
        if is_moe_mlp(mlp):
            num_moe += 1
            submodules = dataclasses.replace(mlp.keywords["submodules"], router=router_builder)
            mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})
            layer_spec = dataclasses.replace(
                layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp)
            )
        layer_specs.append(layer_spec)
    if num_moe == 0:
        raise ValueError("inject_router: the block spec has no MoE layer (is num_moe_experts set?)")
    return dataclasses.replace(block_spec, layer_specs=layer_specs)
