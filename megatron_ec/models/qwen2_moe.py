"""Qwen1.5-MoE / Qwen2-MoE (HF `model_type` "qwen2_moe") <-> Megatron-Core.

Facts from transformers 5.23 `modeling_qwen2_moe.py`:
- routing: softmax over all experts, top-k, renormalised only if `norm_topk_prob` (False on the
  hub), no bias, no scaling;
- a shared expert (`shared_expert_intermediate_size`) whose output is scaled by
  sigmoid(`shared_expert_gate`(x)) -> MCore `moe_shared_expert_gate`;
- q/k/v carry a bias (`qkv_bias`), o_proj none;
- layer L is MoE iff L is not in `mlp_only_layers` and (L + 1) % `decoder_sparse_step` == 0; the
  other layers have a dense MLP of `intermediate_size`.
"""

from __future__ import annotations

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family, register
from megatron_ec.models.hf_config import (
    decoder_fields,
    qwen_checks,
    qwen_dense_layers,
    qwen_moe_hf_fields,
    require,
)
from megatron_ec.models.hf_gate import GateAdapter
from megatron_ec.models.transforms import (
    ATTN,
    H,
    M,
    decoder_rules,
    dense_mlp_rules,
    fused_expert_layout,
    gate_up,
    qkv,
    same,
)

MLP = H + "mlp."

QWEN_FUSED_EXPERTS = fused_expert_layout(MLP + "experts.", MLP + "experts.{expert}.")


@register
class Qwen2Moe(Family):
    """Qwen1.5-MoE-A2.7B and relatives."""

    model_type = "qwen2_moe"
    hf_gate = GateAdapter("Qwen2MoeSparseMoeBlock")
    ignored_hf_keys = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    fused_experts = QWEN_FUSED_EXPERTS

    def to_model_config(self, hf_config) -> MoEModelConfig:
        dense = qwen_dense_layers(hf_config)
        require(self.model_type, [
            *qwen_checks(hf_config, dense),
            (hf_config.shared_expert_intermediate_size > 0,
             "shared_expert_intermediate_size must be > 0 (every Qwen2-MoE layer has one)"),
        ])
        return MoEModelConfig(
            **decoder_fields(hf_config, hf_config.moe_intermediate_size),
            ffn_hidden_size=hf_config.intermediate_size if dense else None,
            dense_layers=dense,
            shared_expert_size=hf_config.shared_expert_intermediate_size,
            shared_expert_gate=True,
            qkv_bias=hf_config.qkv_bias,
            score_function="softmax",
            norm_topk_prob=hf_config.norm_topk_prob,
        )

    def to_hf_config(self, model_cfg: MoEModelConfig, original: dict) -> dict:
        out = qwen_moe_hf_fields(model_cfg, original, "num_experts")
        out.update(shared_expert_intermediate_size=model_cfg.shared_expert_size,
                   qkv_bias=model_cfg.qkv_bias)
        return out

    def rules(self, model_cfg: MoEModelConfig):
        bias = [qkv(M + "self_attention.linear_qkv.bias",
                    ATTN + "q_proj.bias", ATTN + "k_proj.bias", ATTN + "v_proj.bias")]
        shared = MLP + "shared_expert."
        return [
            *decoder_rules(MLP + "gate.weight", MLP + "experts.{expert}."),
            *(bias if model_cfg.qkv_bias else []),
            *dense_mlp_rules(MLP),
            gate_up(M + "mlp.shared_experts.linear_fc1.weight", shared + "gate_proj.weight",
                    shared + "up_proj.weight", layers="moe"),
            same(M + "mlp.shared_experts.linear_fc2.weight", shared + "down_proj.weight",
                 layers="moe"),
            same(M + "mlp.shared_experts.gate_weight", MLP + "shared_expert_gate.weight",
                 layers="moe"),
        ]
