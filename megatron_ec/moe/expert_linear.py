"""The fc2 linear of biased routed experts on the local (SequentialMLP) backend (GPT-OSS).

MCore 0.19.2's expert `MLP.forward` adds the routing-weighted fc2 bias IN PLACE
(`output += output_bias * per_token_scale`, `transformer/mlp.py`). With expert-TP 1 the fc2
output is `_ReduceFromModelParallelRegion`'s pass-through of its input, a view that autograd
forbids modifying in place, so any biased expert fails in a training forward. And
`RowParallelLinear` marks its bias `sequence_parallel` whenever the model is, so
`finalize_model_grads` sums an expert's fc2-bias gradient over the TP group on top of the
expert-data-parallel reduction that already covers those ranks: the gradient comes out TP times
too large (found by the GPT-OSS parity test at TP2). `ExpertRowParallelLinear` fixes both; without
a bias it is `RowParallelLinear`. In the `moe` layer so that methods building their own
SequentialMLP (DenseMixer) can use it; `megatron_ec.models.experts` puts it into family specs.
"""

from __future__ import annotations

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
