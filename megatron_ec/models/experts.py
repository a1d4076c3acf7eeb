"""Routed-expert pieces the local (SequentialMLP) backend needs for biased experts (GPT-OSS):
the family spec's SequentialMLP experts get `ExpertRowParallelLinear` (`megatron_ec.moe.
expert_linear`, which says why) as fc2.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron_ec.moe.expert_linear import ExpertRowParallelLinear


def _is_local_experts(experts) -> bool:
    from megatron.core.transformer.moe.experts import SequentialMLP

    return isinstance(experts, functools.partial) and experts.func is SequentialMLP


def with_biased_local_experts(block_spec):
    """MoE layers' SequentialMLP experts get `ExpertRowParallelLinear` as fc2 (other expert
    backends, e.g. Transformer Engine's grouped GEMM, are left as they are)."""
    from megatron_ec.moe.spec import is_moe_mlp

    layer_specs = []
    for layer_spec in block_spec.layer_specs:
        mlp = layer_spec.submodules.mlp
        if is_moe_mlp(mlp) and _is_local_experts(mlp.keywords["submodules"].experts):
            moe = mlp.keywords["submodules"]
            experts = moe.experts
            mlp_sub = dataclasses.replace(experts.keywords["submodules"],
                                          linear_fc2=ExpertRowParallelLinear)
            experts = functools.partial(experts.func, *experts.args,
                                        **{**experts.keywords, "submodules": mlp_sub})
            moe = dataclasses.replace(moe, experts=experts)
            mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": moe})
            layer_spec = dataclasses.replace(
                layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))
        layer_specs.append(layer_spec)
    return dataclasses.replace(block_spec, layer_specs=layer_specs)
