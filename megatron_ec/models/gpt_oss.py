"""GPT-OSS (`GptOssForCausalLM`, model_type "gpt_oss") <-> Megatron-Core.

Facts from transformers 5.23 `models/gpt_oss/modeling_gpt_oss.py` and `integrations/mxfp4.py`:
- router `mlp.router` (weight AND bias): top-k on the logits, weights = softmax over the k
  selected logits only (`softmax_topk`); returns (logits, scores [T, k], indices [T, k]);
- experts stored stacked and transposed, on disk as in memory: `gate_up_proj [E, H, 2I]` with gate
  and up INTERLEAVED on the last dim (gate = `[..., ::2]`, up = `[..., 1::2]`),
  `gate_up_proj_bias [E, 2I]`, `down_proj [E, I, H]`, `down_proj_bias [E, H]`; the down bias is
  weighted by the routing weight; hub checkpoints store the two weights MXFP4-quantised
  (`*_blocks`, `*_scales`, see `checkpoint_convert/mxfp4.py`);
- clamped SwiGLU: `gate.clamp(max=limit)`, `up.clamp(-limit, limit)`,
  `(up + 1) * gate * sigmoid(alpha * gate)` (`swiglu_limit`, `swiglu_alpha`);
- attention: biases on q/k/v/o (`attention_bias`), one learned sink logit per head (`sinks`),
  `layer_types` alternating "sliding_attention" (keys i - W < j <= i) and "full_attention";
- YaRN RoPE, rotate-half, with `truncate=False` on the hub; RMSNorm everywhere, no QK-norm.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_ec.models.config import ClampedSwiGLU, MoEModelConfig, RopeScaling
from megatron_ec.models.family import Family, Rule, register
from megatron_ec.models.hf_config import require
from megatron_ec.models.hf_gate import GateAdapter
from megatron_ec.models.transforms import ATTN, MEGATRON_EXPERT, H, M, qkv, same

# MoEModelConfig field <- HF config attribute (copied as is in both directions).
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "num_experts": "num_local_experts",
    "topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "init_std": "initializer_range",
    "aux_loss_coeff": "router_aux_loss_coef",
    "sliding_window": "sliding_window",
}
LAYER_TYPES = ("sliding_attention", "full_attention")
EXPERTS = H + "mlp.experts."


# Per-expert transforms of the stacked expert tensors (the converter slices / stacks dim 0).
# Megatron's gated fc1 is [gate; up] rows of [out, in]; HF's is [in, out] with gate/up interleaved.


def _fc1_from_hf(tensors: Sequence[torch.Tensor], cfg: MoEModelConfig) -> torch.Tensor:
    (gate_up,) = tensors  # weight [H, 2I] or bias [2I]
    rows = gate_up.t() if gate_up.dim() == 2 else gate_up
    return torch.cat([rows[0::2], rows[1::2]], dim=0)


def _fc1_to_hf(fc1: torch.Tensor, cfg: MoEModelConfig) -> list[torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    rows = torch.stack([gate, up], dim=1).flatten(0, 1)  # g0 u0 g1 u1 ...
    return [rows.t() if rows.dim() == 2 else rows]


def _transposed(tensors: Sequence[torch.Tensor], cfg: MoEModelConfig) -> torch.Tensor:
    (tensor,) = tensors
    return tensor.t()


def _transpose_back(tensor: torch.Tensor, cfg: MoEModelConfig) -> list[torch.Tensor]:
    return [tensor.t()]


def _stacked(megatron: str, hf: str, to_megatron=None, to_hf=None) -> Rule:
    """One expert's Megatron tensor <-> its row of an HF tensor holding all experts."""
    transforms = {} if to_megatron is None else {"to_megatron": to_megatron, "to_hf": to_hf}
    return Rule(MEGATRON_EXPERT + megatron, (EXPERTS + hf,), layers="moe", shardable=False,
                stacked_experts=True, **transforms)


def _rules() -> list[Rule]:
    return [
        same("embedding.word_embeddings.weight", "model.embed_tokens.weight", pads_vocab=True),
        same("decoder.final_layernorm.weight", "model.norm.weight"),
        same("output_layer.weight", "lm_head.weight", pads_vocab=True),
        same(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        *[qkv(M + f"self_attention.linear_qkv.{kind}", ATTN + f"q_proj.{kind}",
              ATTN + f"k_proj.{kind}", ATTN + f"v_proj.{kind}") for kind in ("weight", "bias")],
        same(M + "self_attention.linear_proj.weight", ATTN + "o_proj.weight"),
        same(M + "self_attention.linear_proj.bias", ATTN + "o_proj.bias"),
        # SinkDotProductAttention marks it TP-split by heads, like the q rows
        same(M + "self_attention.core_attention.softmax_offset", ATTN + "sinks"),
        same(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        same(M + "mlp.router.weight", H + "mlp.router.weight", layers="moe"),
        same(M + "mlp.router.bias", H + "mlp.router.bias", layers="moe"),
        _stacked("linear_fc1.weight", "gate_up_proj", _fc1_from_hf, _fc1_to_hf),
        _stacked("linear_fc1.bias", "gate_up_proj_bias", _fc1_from_hf, _fc1_to_hf),
        _stacked("linear_fc2.weight", "down_proj", _transposed, _transpose_back),
        _stacked("linear_fc2.bias", "down_proj_bias"),
    ]


def _rope_parameters(hf_config) -> dict:
    return dict(getattr(hf_config, "rope_parameters", None) or {})


def _rope_scaling(params: dict) -> RopeScaling | None:
    """HF YaRN parameters -> ours; MCore applies mscale / mscale_all_dim only when both are set,
    exactly as HF does (otherwise both use 0.1 ln(factor) + 1)."""
    if params.get("rope_type", "default") == "default":
        return None
    both = bool(params.get("mscale")) and bool(params.get("mscale_all_dim"))
    return RopeScaling(
        factor=float(params["factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params["mscale"]) if both else 1.0,
        mscale_all_dim=float(params["mscale_all_dim"]) if both else 0.0,
        truncate=bool(params.get("truncate", True)),
    )


def _checks(hf_config) -> list[tuple[bool, str]]:
    params = _rope_parameters(hf_config)
    theta = float(params.get("rope_theta", 150000.0))
    layer_types = list(hf_config.layer_types)
    return [
        # MCore's add_bias_linear biases every linear; GPT-OSS's router and experts always have one
        (bool(hf_config.attention_bias), "attention_bias=False is not supported (Megatron-Core "
         "biases q/k/v/o together with the router and experts)"),
        (not hf_config.tie_word_embeddings,
         "tie_word_embeddings=True is not supported; untie lm_head before converting"),
        (params.get("rope_type", "default") in ("default", "yarn"),
         f"rope_type={params.get('rope_type')!r} is not supported; use 'yarn' or 'default'"),
        (params.get("attention_factor") is None and params.get("partial_rotary_factor", 1.0) == 1.0,
         "rope attention_factor / partial_rotary_factor are not supported; remove them"),
        (theta == int(theta), f"rope_theta={theta} is not an integer; Megatron-Core's GPTModel "
                              "takes an integer rotary base"),
        (len(layer_types) == hf_config.num_hidden_layers and set(layer_types) <= set(LAYER_TYPES),
         f"layer_types must list {hf_config.num_hidden_layers} of {LAYER_TYPES}"),
        ("sliding_attention" not in layer_types or (hf_config.sliding_window or 0) >= 1,
         "sliding_attention layers need sliding_window >= 1"),
    ]


@register
class GptOss(Family):
    """gpt-oss-20b, gpt-oss-120b and their fine-tunes."""

    model_type = "gpt_oss"
    ignored_hf_keys = (r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)
    mxfp4_tensors = (EXPERTS + "gate_up_proj", EXPERTS + "down_proj")
    # GptOssTopKRouter: logits with its own bias, scores softmaxed in the hidden dtype
    hf_gate = GateAdapter("GptOssMLP", gate_attr="router")

    def to_model_config(self, hf_config) -> MoEModelConfig:
        require(self.model_type, _checks(hf_config))
        fields = {ours: getattr(hf_config, theirs) for ours, theirs in CONFIG_FIELDS.items()}
        params = _rope_parameters(hf_config)
        sliding = tuple(i for i, kind in enumerate(hf_config.layer_types)
                        if kind == "sliding_attention")
        return MoEModelConfig(
            **fields,
            rope_theta=float(params.get("rope_theta", 150000.0)),
            rope_scaling=_rope_scaling(params),
            normalization="RMSNorm",
            linear_bias=True,
            attention_sinks=True,
            sliding_layers=sliding if hf_config.sliding_window else (),
            clamped_swiglu=ClampedSwiGLU(limit=float(hf_config.swiglu_limit),
                                         alpha=float(hf_config.swiglu_alpha)),
            score_function="softmax_topk",
        )

    def to_hf_config(self, model_cfg: MoEModelConfig, original: dict) -> dict:
        hf = dict(original)
        hf.update({theirs: getattr(model_cfg, ours) for ours, theirs in CONFIG_FIELDS.items()})
        hf.update(swiglu_limit=model_cfg.clamped_swiglu.limit,
                  swiglu_alpha=model_cfg.clamped_swiglu.alpha)
        # export writes bf16/fp32 tensors, never MXFP4 (checkpoint_convert/mxfp4.py says why)
        hf.pop("quantization_config", None)
        return hf

    def rules(self, model_cfg: MoEModelConfig) -> list[Rule]:
        return _rules()

    def attention_hook(self, model_cfg: MoEModelConfig):
        def hook(block_spec):
            # imported here: family files stay importable without Megatron-Core
            from megatron_ec.models.attention import with_sharded_sinks
            from megatron_ec.models.experts import with_biased_local_experts

            return with_biased_local_experts(with_sharded_sinks(block_spec))

        return hook
