"""A torch norm that works under sequence parallelism (blocker 7 in docs/CPU_COMPAT.md).

Megatron-Core's only non-TE, non-apex norm (`WrappedTorchNorm`) refuses `sequence_parallel`, which
MoE with TP > 1 requires. This is not a patch: the model builder puts this class into the layer spec
in place of `WrappedTorchNorm`. Like TE's norms it tags its parameters `sequence_parallel`, so
`finalize_model_grads` sums their gradients over the tensor-parallel group (each TP rank saw a
different slice of the tokens, or of the heads for a QK-norm).
"""

from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """Builds `torch.nn.RMSNorm` or `torch.nn.LayerNorm` with MCore's norm-constructor signature."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused_kwargs) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(
                f"normalization={config.normalization!r} is not supported on the local backend; "
                "use 'RMSNorm' or 'LayerNorm'"
            )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
