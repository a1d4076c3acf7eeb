"""Attention pieces Megatron-Core's local (non-TE) backend lacks, plugged in through the block spec.

- `FullWidthRMSNorm`: OLMoE's QK-norm, an RMSNorm over the whole q (or k) projection rather than
  over each head. Under tensor parallelism each rank holds a contiguous slice of the heads, so the
  sum of squares is all-reduced over the TP group.
- `LocalMLASelfAttention` and `MLACoreAttention`: Multi-latent attention (DeepSeek-V2/V3) on the
  local backend. MCore 0.19.2's local MLA spec does not build, and trains wrongly under TP:
  its Q/KV-norm resolver (`transformer/mla_qk_norm_config.py`, `_resolve_mla_qk_layernorm`)
  asks for a fused norm+linear `linear_q_proj` when there is no q-LoRA (TE only); MLA passes
  `k_channels`/`v_channels` to a core attention that the local `DotProductAttention` does not
  accept; and with a column-parallel kv down-projection the shared rope key's gradient is not
  summed over TP (details in `LocalMLASelfAttention`).
- `SinkDotProductAttention`: the local `DotProductAttention` whose learnable softmax offset
  (GPT-OSS attention sinks, one logit per head) is marked as split over TP by heads.
- Spec editors (`use_local_mla`, `with_latent_norm_eps`, `with_full_width_qk_norm`,
  `with_sharded_sinks`) that put them into a decoder block spec.

Shapes: `sq` query length, `b` batch, `n` heads on this rank, `d` head width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.distributed as dist

from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group, forward and backward: every rank's output depends on every rank's input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over all heads of a projection (OLMoE `q_norm`/`k_norm`), correct under TP.

    Megatron-Core's `SelfAttention` calls its q/k norm on `[sq, b, n, d]` tensors with
    `hidden_size=d`, i.e. it expects a per-head norm. This module normalises over the last two
    dims together: the mean square is taken over the full `num_heads * d` width, summing the
    squares over the tensor-parallel group (each rank holds a contiguous slice of the heads).

    The weight is the full `[num_heads * d]` vector on every rank (a replicated parameter, so
    `layout.py` and distributed checkpoints treat it like any norm weight); a rank scales by its
    heads' slice, so its gradient is non-zero on that slice only. Megatron-Core's
    `finalize_model_grads` sums q/k-layernorm gradients over TP (it matches `q_layernorm` /
    `k_layernorm` by name, and `sequence_parallel` parameters), which completes the gradient on
    every rank. (A TP-sharded weight would be corrupted by that very sum.)
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, num_heads: int,
                 tp_group: dist.ProcessGroup | None = None, **unused_kwargs) -> None:
        """Args:
            config: the Megatron `TransformerConfig`.
            hidden_size: the per-head width `d` (what MCore passes to a q/k norm).
            eps: added to the mean square.
            num_heads: heads of the whole projection (query heads, or key/value heads for k).
            tp_group: tensor-parallel group; None = Megatron's global one.
        """
        super().__init__()
        tp_size = config.tensor_model_parallel_size
        if num_heads % tp_size:
            raise ValueError(
                f"full-width QK-norm over {num_heads} heads cannot be split over "
                f"tensor_model_parallel_size={tp_size}; choose a TP size that divides {num_heads}"
            )
        if tp_group is None and tp_size > 1:
            from megatron.core import parallel_state

            tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_group = tp_group
        self.eps = eps
        self.full_width = num_heads * hidden_size
        local_width = self.full_width // tp_size
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.local_slice = slice(tp_rank * local_width, (tp_rank + 1) * local_width)
        self.weight = torch.nn.Parameter(torch.ones(self.full_width, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x_SBND: torch.Tensor) -> torch.Tensor:
        """Normalise `[sq, b, n, d]` over `n * d` (all heads of all TP ranks)."""
        x_fp32 = x_SBND.float()
        sum_sq = x_fp32.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, self.tp_group)
        normed = x_fp32 * torch.rsqrt(sum_sq / self.full_width + self.eps)
        weight_ND = self.weight[self.local_slice].view(x_SBND.shape[-2:])
        return weight_ND * normed.to(x_SBND.dtype)


class MLACoreAttention(DotProductAttention):
    """Local `DotProductAttention` for MLA, whose key and value head widths differ.

    MLA builds its core attention with `k_channels` (nope + rope width) and `v_channels`; the local
    class computes with any widths except its output reshape, which uses `kv_channels`, so only
    the per-rank output width is overridden. MLA passes its own `softmax_scale` (with YaRN mscale).
    """

    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


class SinkDotProductAttention(DotProductAttention):
    """Local `DotProductAttention` with attention sinks marked as a TP-sharded parameter.

    With `softmax_type="learnable"` MCore 0.19.2 holds `softmax_offset [heads / TP]` (this rank's
    heads) and shards it by heads in `sharded_state_dict`, but leaves the parameter unmarked, so
    `megatron_ec.models.layout` would treat it as replicated. Marking it (partition dim 0) makes
    the layout gather/scatter and the converter's TP slicing cut it like the q heads.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.softmax_offset, torch.nn.Parameter):
            self.softmax_offset.tensor_model_parallel = True
            self.softmax_offset.partition_dim = 0
            self.softmax_offset.partition_stride = 1


class LocalMLASelfAttention(MLASelfAttention):
    """`MLASelfAttention` for the local backend: explicit norms, and a correct rope-key gradient.

    1. MCore's resolver would fuse the Q norm into `linear_q_proj` when there is no q-LoRA (a
       TE-only module). The spec from `use_local_mla` is already explicit: plain column-parallel
       projections, a `q_layernorm` only with q-LoRA, a `kv_layernorm` always.
    2. With a column-parallel `linear_kv_down_proj` (the local backend's only choice) and TP > 1,
       MCore 0.19.2 gathers the kv down-projection over TP and keeps the shared rope key
       `k_pos_emb` at full sequence length (`get_query_key_value_tensors`, first branch after
       `_qkv_down_projection`). Each rank then back-propagates only its own heads' share of the
       rope-key gradient, and the split backward of that gather never sums the shares: the
       logits are right but the gradients of `linear_kv_down_proj` (rope rows) and everything
       below it are wrong. `_qkv_down_projection` below returns the kv projection already
       gathered and sequence-scattered, which sends MCore down its other branch (the one TE's
       duplicated linear takes), whose `gather_from_sequence_parallel_region` reduce-scatters
       the rope-key gradient over TP.
    """

    def _qkv_down_projection(self, hidden_states):
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        width = self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim
        if kv_combined.size(-1) != width:
            if not self.config.sequence_parallel:
                raise ValueError("MLA with tensor parallelism needs sequence_parallel on the "
                                 "local backend (ParallelConfig turns it on for TP > 1)")
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=self.tp_group)
            kv_combined = scatter_to_sequence_parallel_region(kv_combined, group=self.tp_group)
        return q_compressed, kv_combined

    def _resolve_qk_norm_config(self, submodules) -> dict:
        has_q_lora = self.config.q_lora_rank is not None
        return dict(
            linear_q_proj=IdentityOp if has_q_lora else submodules.linear_q_proj,
            linear_q_up_proj=submodules.linear_q_up_proj if has_q_lora else IdentityOp,
            linear_kv_up_proj=submodules.linear_kv_up_proj,
            q_layernorm=submodules.q_layernorm if has_q_lora else IdentityOp,
            kv_layernorm=submodules.kv_layernorm,
        )


def map_attention(block_spec, edit: Callable):
    """A copy of `block_spec` whose layers' `self_attention` ModuleSpecs are `edit(spec)`."""
    layer_specs = []
    for layer_spec in block_spec.layer_specs:
        attention = edit(layer_spec.submodules.self_attention)
        submodules = dataclasses.replace(layer_spec.submodules, self_attention=attention)
        layer_specs.append(dataclasses.replace(layer_spec, submodules=submodules))
    return dataclasses.replace(block_spec, layer_specs=layer_specs)


def _replace_submodules(attention_spec, **changes):
    return dataclasses.replace(
        attention_spec, submodules=dataclasses.replace(attention_spec.submodules, **changes)
    )


def use_local_mla(block_spec):
    """Make MCore's local-backend MLA spec buildable (see `LocalMLASelfAttention`)."""

    def edit(spec):
        if spec.module is not MLASelfAttention:
            raise ValueError(f"use_local_mla: expected MLASelfAttention, found {spec.module}")
        spec = dataclasses.replace(spec, module=LocalMLASelfAttention)
        return _replace_submodules(spec, core_attention=MLACoreAttention)

    return map_attention(block_spec, edit)


def _fixed_eps(norm_builder, eps: float):
    """A norm builder that ignores the `eps` MCore passes and uses `eps`."""

    def build(*args, **kwargs):
        return norm_builder(*args, **{**kwargs, "eps": eps})

    return build


def with_latent_norm_eps(block_spec, eps: float):
    """MLA's `q_layernorm`/`kv_layernorm` with their own epsilon (not `layernorm_epsilon`)."""

    def edit(spec):
        sub = spec.submodules
        if sub.kv_layernorm in (None, IdentityOp):
            # Transformer Engine specs fuse the latent norms into the up-projections
            raise ValueError("the MLA latent norms are fused into their projections in this "
                             f"spec, so their eps cannot differ from layernorm_epsilon ({eps})")
        changes = {name: _fixed_eps(getattr(sub, name), eps)
                   for name in ("q_layernorm", "kv_layernorm")
                   if getattr(sub, name) not in (None, IdentityOp)}
        return _replace_submodules(spec, **changes)

    return map_attention(block_spec, edit)


def with_full_width_qk_norm(block_spec, num_heads: int, num_kv_heads: int):
    """Replace per-head q/k layernorms by `FullWidthRMSNorm` over all query / key heads."""

    def edit(spec):
        return _replace_submodules(
            spec,
            q_layernorm=functools.partial(FullWidthRMSNorm, num_heads=num_heads),
            k_layernorm=functools.partial(FullWidthRMSNorm, num_heads=num_kv_heads),
        )

    return map_attention(block_spec, edit)


def with_sharded_sinks(block_spec):
    """Local core attention -> `SinkDotProductAttention` (Transformer Engine specs unchanged:
    TE's attention owns its softmax offset, not exercised on this CPU-only project)."""

    def edit(spec):
        if spec.submodules.core_attention is not DotProductAttention:
            return spec
        return _replace_submodules(spec, core_attention=SinkDotProductAttention)

    return map_attention(block_spec, edit)


ATTENTION_BACKENDS = ("unfused", "sdpa")
"""`train.attention_backend` values of the local (non-TE) backend."""


class _SDPAForward:
    """The core-attention forward through `torch.nn.functional.scaled_dot_product_attention`.

    Same inputs and output as MCore's local `DotProductAttention.forward` (query `[sq, b, n, d]`,
    key/value `[sk, b, g, d]` with g query groups, output `[sq, b, n * dv]`), and the same
    result in fp32 up to rounding: the mask is MCore's (bool, True = masked out, `[b, 1, sq, sk]`,
    causal and packed-sample blocks included), turned into SDPA's (True = attend); None with a
    causal mask type is SDPA's `is_causal`. MCore fills masked scores with -10000 where SDPA uses
    -inf: equal after the softmax in fp32 whenever a row keeps one key (the batch contract gives
    every query itself), different only for a fully masked row. No parameters, so checkpoints
    are those of the unfused path. On CPU this picks the fused flash kernel; on a GPU without
    Transformer Engine the flash/memory-efficient kernels.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("train.attention_backend=sdpa: packed_seq_params and attention "
                             "bias are Transformer Engine features; use the unfused backend")
        from megatron.core.transformer.enums import AttnMaskType

        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # MCore's GQA expansion, as the unfused path does it
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal and query.size(0) > 1
        allowed = None if attention_mask is None else ~attention_mask
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale * (self.scale_mask_softmax.scale or 1.0))
        # [b, n, sq, dv] -> [sq, b, n * dv]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], -1)


class SDPAttention(_SDPAForward, DotProductAttention):
    """MCore's local `DotProductAttention` computed by SDPA (`train.attention_backend=sdpa`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_sdpa_supported(self)


class MLASDPAttention(_SDPAForward, MLACoreAttention):
    """`MLACoreAttention` (key and value widths differ) computed by SDPA."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_sdpa_supported(self)


def _check_sdpa_supported(module) -> None:
    if module.softmax_offset is not None:
        raise ValueError("train.attention_backend=sdpa does not support attention sinks "
                         "(GPT-OSS); use train.attention_backend=unfused")
    if module.scale_mask_softmax.window_size is not None:
        raise ValueError("train.attention_backend=sdpa does not support sliding-window layers "
                         "(GPT-OSS); use train.attention_backend=unfused")


_SDPA_CLASSES = {DotProductAttention: SDPAttention, MLACoreAttention: MLASDPAttention}


def use_sdpa(block_spec):
    """Local core attention -> its SDPA twin (a spec with TE's attention is returned unchanged:
    Transformer Engine brings its own fused attention). Sinks and sliding windows are refused
    when the layer is built."""

    def edit(spec):
        core = spec.submodules.core_attention
        if core is SinkDotProductAttention:
            raise ValueError("train.attention_backend=sdpa does not support attention sinks "
                             "(GPT-OSS); use train.attention_backend=unfused")
        if core not in _SDPA_CLASSES:
            return spec
        return _replace_submodules(spec, core_attention=_SDPA_CLASSES[core])

    return map_attention(block_spec, edit)
