"""From `MoEModelConfig` to Megatron-Core: `TransformerConfig`, decoder block spec and `GPTModel`.

This is the one place where our model description meets Megatron-Core's config. The backend is
chosen once: Transformer Engine layers when TE and CUDA are present, Megatron-Core's local layers
(SequentialMLP experts, torch norms) otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_ec.compat import SequenceParallelTorchNorm
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.moe.spec import inject_moe_submodules
from megatron_ec.parallel import ParallelConfig

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def use_transformer_engine() -> bool:
    """TE layers need both the package and a GPU."""
    return HAVE_TE and torch.cuda.is_available()


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model is run (recipe section `train`), as opposed to what it is."""

    precision: str = "fp32"
    """"fp32", "bf16", or "fp8" (Hopper: e4m3 with the blockwise recipe; TE and GPU only)."""
    recompute: str = "none"
    """Activation recompute: "none", "selective" (MoE layers) or "full"."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing loss coefficient; 0 = off."""
    num_router_slots: int | None = None
    """Routed slots per token given to the dispatcher; None = the family's top-k."""
    seq_length: int = 4096
    attention_backend: str = "unfused"
    """Core attention of the local backend: "unfused" (MCore's DotProductAttention) or "sdpa"
    (`torch.nn.functional.scaled_dot_product_attention`); TE layers use their own."""

    def __post_init__(self) -> None:
        from megatron_ec.models.attention import ATTENTION_BACKENDS

        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}: use "
                             + " or ".join(ATTENTION_BACKENDS))
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise ValueError(f"precision={self.precision!r}: use fp32, bf16 or fp8")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute={self.recompute!r}: use none, selective or full")
        if self.precision == "fp8" and not use_transformer_engine():
            raise ValueError("precision=fp8 needs Transformer Engine and a GPU; use bf16 or fp32")


def _recompute_fields(recompute: str) -> dict:
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["moe"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    return {}


def _mla_fields(model: MoEModelConfig) -> dict:
    mla, scaling = model.mla, model.rope_scaling
    fields = {
        "multi_latent_attention": True,
        "q_lora_rank": mla.q_lora_rank,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_head_dim": mla.qk_nope_head_dim,
        "qk_pos_emb_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "rotary_base": model.rope_theta,
        "rope_type": "yarn" if scaling else "rope",
        # MLA always normalises its latents (kv, and q with q-LoRA); MCore calls them q/kv_layernorm
        "qk_layernorm": True,
    }
    if scaling:
        fields.update(
            rotary_scaling_factor=scaling.factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
            beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow,
            mscale=scaling.mscale, mscale_all_dim=scaling.mscale_all_dim,
        )
    return fields


def clamped_swiglu_gate(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPT-OSS's gate activation `x * sigmoid(alpha * x)` (MCore's unfused `glu()` clamps first
    and multiplies by `up + glu_linear_offset`)."""
    return x * torch.sigmoid(x * alpha)


def _gpt_oss_fields(model: MoEModelConfig) -> dict:
    """Attention sinks, sliding-window layers and the clamped SwiGLU (GPT-OSS); {} when the model
    has none of them, so the other families' TransformerConfig is unchanged."""
    fields = {}
    if model.attention_sinks:
        fields["softmax_type"] = "learnable"
    if model.sliding_layers:
        # HF lets query i see keys j with i - W < j <= i; MCore's window (left, right) counts
        # the keys besides i itself
        fields.update(window_size=(model.sliding_window - 1, 0),
                      window_attn_skip_freq=[int(i in model.sliding_layers)
                                             for i in range(model.num_layers)])
    if model.clamped_swiglu is not None:
        swiglu = model.clamped_swiglu
        fields.update(activation_func=functools.partial(clamped_swiglu_gate, alpha=swiglu.alpha),
                      glu_linear_offset=1.0, activation_func_clamp_value=swiglu.limit)
    return fields


def _set_yarn_attributes(tcfg, scaling) -> None:
    """Non-MLA YaRN: MCore's GPTModel reads these as plain attributes of the config object
    (`models/gpt/gpt_model.py`, position_embedding_type="yarn"), not as dataclass fields."""
    tcfg.yarn_rotary_scaling_factor = scaling.factor
    tcfg.yarn_original_max_position_embeddings = scaling.original_max_position_embeddings
    tcfg.yarn_beta_fast = scaling.beta_fast
    tcfg.yarn_beta_slow = scaling.beta_slow
    tcfg.yarn_mscale = scaling.mscale
    tcfg.yarn_mscale_all_dim = scaling.mscale_all_dim
    tcfg.yarn_correction_range_round_to_int = scaling.truncate


def _position_embedding_type(model: MoEModelConfig) -> str:
    if model.mla is not None:
        return "none"  # MLA applies its own rotary embedding
    return "yarn" if model.rope_scaling is not None else "rope"


def transformer_config(model: MoEModelConfig, parallel: ParallelConfig,
                       runtime: RuntimeOptions = RuntimeOptions()):
    """Map our configs onto Megatron-Core's `TransformerConfig` (or `MLATransformerConfig`)."""
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    bf16 = runtime.precision in ("bf16", "fp8")
    fields = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size or model.moe_ffn_hidden_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_eps,
        add_bias_linear=model.linear_bias,
        add_qkv_bias=model.qkv_bias or model.linear_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=model.qk_norm != "none",
        init_method_std=model.init_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        num_moe_experts=model.num_experts,
        moe_router_topk=runtime.num_router_slots or model.topk,
        # Only Megatron-Core's own top-k routing reads this flag, and ECRouter replaces it; MCore
        # refuses topk=1 without it (replicated condensers can leave one dispatched slot).
        moe_router_pre_softmax=(runtime.num_router_slots or model.topk) == 1,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=model.shared_expert_size or None,
        moe_shared_expert_gate=model.shared_expert_gate,
        moe_layer_freq=[0 if i in model.dense_layers else 1 for i in range(model.num_layers)],
        moe_router_load_balancing_type="aux_loss" if runtime.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=runtime.moe_aux_loss_coeff,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=parallel.token_dispatcher,
        moe_grouped_gemm=use_transformer_engine(),
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        **_recompute_fields(runtime.recompute),
    )
    fields.update(_gpt_oss_fields(model))
    if runtime.precision == "fp8":
        fields.update(fp8="e4m3", fp8_recipe="blockwise")
    if model.mla is not None:
        fields.update(_mla_fields(model))
        return MLATransformerConfig(**fields)
    tcfg = TransformerConfig(**fields)
    if model.rope_scaling is not None:
        _set_yarn_attributes(tcfg, model.rope_scaling)
    return tcfg


def _swap_norms(submodules, norm_cls) -> None:
    """Replace torch/apex norm builders of one layer (and its attention) by `norm_cls`."""
    from megatron.core.transformer.identity_op import IdentityOp

    def swap(obj, field_name):
        current = getattr(obj, field_name, None)
        if current is not None and current is not IdentityOp and isinstance(current, type):
            setattr(obj, field_name, norm_cls)

    for name in ("input_layernorm", "pre_mlp_layernorm"):
        swap(submodules, name)
    attention = submodules.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):
        swap(attention, name)


def local_block_spec(tcfg):
    """Megatron-Core's local decoder block spec with sequence-parallel-capable torch norms."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    # pp_rank=0: we never split the model into pipeline stages
    spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False,
                                      normalization=tcfg.normalization, pp_rank=0)
    layer_specs = []
    for layer_spec in spec.layer_specs:
        submodules = dataclasses.replace(
            layer_spec.submodules,
            self_attention=dataclasses.replace(
                layer_spec.submodules.self_attention,
                submodules=dataclasses.replace(layer_spec.submodules.self_attention.submodules),
            ),
        )
        _swap_norms(submodules, SequenceParallelTorchNorm)
        layer_specs.append(dataclasses.replace(layer_spec, submodules=submodules))
    spec = dataclasses.replace(spec, layer_specs=layer_specs, layer_norm=SequenceParallelTorchNorm)
    if tcfg.multi_latent_attention:
        from megatron_ec.models.attention import use_local_mla

        # MCore's local MLA spec does not build as is (see megatron_ec/models/attention.py)
        spec = use_local_mla(spec)
    return spec


def decoder_block_spec(tcfg, router_builder: Callable | None = None,
                       attention_hook: Callable | None = None,
                       experts_builder: Callable | None = None,
                       experts_wrapper: Callable | None = None,
                       moe_layer: type | None = None,
                       attention_backend: str = "unfused"):
    """The decoder block spec for this machine's backend, with a method's router injected.

    Args:
        tcfg: the `TransformerConfig` from `transformer_config()`.
        router_builder: router class (or partial) for every MoE layer; None = MCore's TopKRouter.
        attention_hook: a family quirk that edits the block spec's attention (e.g. OLMoE's
            full-width QK-norm); called with and returning the block spec.
        experts_builder: a method's `MoESubmodules.experts` builder; None = MCore's experts.
        experts_wrapper: a method's function of the experts builder (`Method.experts_wrapper`).
        moe_layer: a method's `MoELayer` subclass (`Method.moe_layer_class`); None = MCore's.
        attention_backend: "sdpa" swaps the local core attention for its SDPA twin (after the
            family's hook; `megatron_ec.models.attention.use_sdpa`); no effect on TE specs.
    """
    if use_transformer_engine():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=True, pp_rank=0)
    else:
        spec = local_block_spec(tcfg)
    if attention_hook is not None:
        spec = attention_hook(spec)
    if attention_backend == "sdpa":
        from megatron_ec.models.attention import use_sdpa

        spec = use_sdpa(spec)
    if any(x is not None for x in (router_builder, experts_builder, experts_wrapper, moe_layer)):
        spec = inject_moe_submodules(spec, router=router_builder, experts=experts_builder,
                                     wrap_experts=experts_wrapper, layer_class=moe_layer)
    return spec


def build_gpt_model(model: MoEModelConfig, tcfg, block_spec):
    """Instantiate Megatron-Core's `GPTModel` on this rank (whole model: no pipeline split)."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=tcfg,
        transformer_layer_spec=block_spec,
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type=_position_embedding_type(model),
        rotary_base=int(model.rope_theta),
    )
