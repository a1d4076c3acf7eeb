"""Routed-expert pieces the local (SequentialMLP) backend needs for biased experts (GPT-OSS).

MCore 0.19.2's expert `MLP.forward` adds the routing-weighted fc2 bias IN PLACE
(`output += output_bias * per_token_scale`, `transformer/mlp.py`). With expert-TP 1 the fc2
output is `_ReduceFromModelParallelRegion`'s pass-through of its input, a view that autograd
forbids modifying in place, so any biased expert fails in a training forward. And
`RowParallelLinear` marks its bias `sequence_parallel` whenever the model is, so
`finalize_model_grads` sums an expert's fc2-bias gradient over the TP group on top of the
expert-data-parallel reduction that already covers those ranks: the gradient comes out TP times
too large (found by the GPT-OSS parity test at TP2). `ExpertRowParallelLinear` fixes both.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.tensor_parallel.layers import RowParallelLinear


class ExpertRowParallelLinear(RowParallelLinear):
    """Expert fc2 `RowParallelLinear`: its bias is not a sequence-parallel parameter (experts see
    dispatched tokens, not a TP rank's sequence chunk), and its output may be modified in place
    when its bias is returned separately (`skip_bias_add`, as MCore builds expert fc2)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            self.bias.sequence_parallel = False

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return (output.clone() if bias is not None else output), bias


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
