"""Spec injection: put a method's router and experts into every MoE layer of a block spec.

Megatron-Core describes each MoE layer's MLP as `functools.partial(MoELayer, submodules=MoESubmodules(
experts=..., shared_experts=..., router=TopKRouter))`. We replace only the `router` field (and the
`experts` field when a method brings its own experts), so the shared experts and the token
dispatcher remain Megatron-Core's own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable


def is_moe_mlp(mlp) -> bool:
    """An MoE layer's MLP entry of a layer spec (`functools.partial(MoELayer, ...)`)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return (isinstance(mlp, functools.partial) and isinstance(mlp.func, type)
            and issubclass(mlp.func, MoELayer))


def inject_moe_submodules(block_spec, router: Callable | None = None,
                          experts: Callable | None = None,
                          wrap_experts: Callable | None = None,
                          layer_class: type | None = None):
    """Return a copy of `block_spec` whose MoE layers build the given router and experts.

    Args:
        block_spec: MCore `TransformerBlockSubmodules` (local or Transformer Engine backend).
        router: a callable with TopKRouter's constructor signature, e.g. a class or a
            `functools.partial` binding method-specific arguments; None keeps the spec's.
        experts: an `MoESubmodules.experts` builder; None keeps the spec's (MCore's experts).
        wrap_experts: a function of the experts builder (after `experts`) returning the one to
            build, e.g. MCore's experts class with a mixin (the specialisation losses).
        layer_class: a subclass of MCore's `MoELayer` to build instead of it (replicated
            condensers, `moe.replicated`); None keeps the spec's.

    Returns:
        A new `TransformerBlockSubmodules`; dense layers and everything else are unchanged.
    """
    changes = {k: v for k, v in (("router", router), ("experts", experts)) if v is not None}
    layer_specs = []
    num_moe = 0
    for layer_spec in block_spec.layer_specs:
        mlp = layer_spec.submodules.mlp
        if is_moe_mlp(mlp):
            num_moe += 1
            submodules = dataclasses.replace(mlp.keywords["submodules"], **changes)
            if wrap_experts is not None:
                submodules = dataclasses.replace(submodules,
                                                 experts=wrap_experts(submodules.experts))
            mlp = functools.partial(layer_class or mlp.func, *mlp.args,
                                    **{**mlp.keywords, "submodules": submodules})
            layer_spec = dataclasses.replace(
                layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp)
            )
        layer_specs.append(layer_spec)
    if num_moe == 0:
        raise ValueError("inject_moe_submodules: the block spec has no MoE layer "
                         "(is num_moe_experts set?)")
    return dataclasses.replace(block_spec, layer_specs=layer_specs)
