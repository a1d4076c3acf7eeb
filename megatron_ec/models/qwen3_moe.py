"""Qwen3-MoE (HF `model_type` "qwen3_moe") <-> Megatron-Core.

Facts from transformers 5.23 `modeling_qwen3_moe.py`:
- routing: softmax over all experts, top-k, renormalised if `norm_topk_prob` (True on the hub);
- per-head RMSNorm on queries and keys (`q_norm`/`k_norm` of size head_dim, before RoPE) ->
  MCore `qk_layernorm`; `head_dim` may differ from hidden_size / num_attention_heads;
- no shared expert; `attention_bias` puts a bias on q/k/v AND o_proj (Megatron-Core can bias
  only q/k/v on its own, so it is rejected);
- dense layers from `mlp_only_layers` / `decoder_sparse_step` as in Qwen2-MoE.
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
from megatron_ec.models.qwen2_moe import MLP, QWEN_FUSED_EXPERTS
from megatron_ec.models.transforms import decoder_rules, dense_mlp_rules, qk_norm_rules


@register
class Qwen3Moe(Family):
    """Qwen3-30B-A3B, Qwen3-235B-A22B and relatives."""

    model_type = "qwen3_moe"
    hf_gate = GateAdapter("Qwen3MoeSparseMoeBlock")
    fused_experts = QWEN_FUSED_EXPERTS

    def to_model_config(self, hf_config) -> MoEModelConfig:
        dense = qwen_dense_layers(hf_config)
        require(self.model_type, [
            *qwen_checks(hf_config, dense),
            (not hf_config.attention_bias,
             "attention_bias=True (bias on q/k/v/o) is not supported"),
        ])
        return MoEModelConfig(
            **decoder_fields(hf_config, hf_config.moe_intermediate_size),
            ffn_hidden_size=hf_config.intermediate_size if dense else None,
            dense_layers=dense,
            qk_norm="per_head",
            score_function="softmax",
            norm_topk_prob=hf_config.norm_topk_prob,
        )

    def to_hf_config(self, model_cfg: MoEModelConfig, original: dict) -> dict:
        return qwen_moe_hf_fields(model_cfg, original, "num_local_experts")

    def rules(self, model_cfg: MoEModelConfig):
        return [*decoder_rules(MLP + "gate.weight", MLP + "experts.{expert}."),
                *qk_norm_rules(), *dense_mlp_rules(MLP)]
