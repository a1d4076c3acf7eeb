"""Mixtral (HF `model_type` "mixtral") <-> Megatron-Core.

Facts from transformers 5.23 `modeling_mixtral.py` and `conversion_mapping.py`:
- routing: softmax over all experts, top-k, ALWAYS renormalised (no `norm_topk_prob` flag);
- hub checkpoints (and `save_pretrained`) name the MoE block `block_sparse_moe` with per-expert
  `w1` (gate), `w3` (up), `w2` (down); in memory, and on disk with
  `save_original_format=False`, it is `mlp.gate` and fused `mlp.experts.{gate_up,down}_proj`;
- every layer is MoE, no shared expert, no attention bias; `sliding_window` must be off (null);
- `router_jitter_noise` only perturbs training inputs in HF; it is carried through unchanged.
"""

from __future__ import annotations

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family, register
from megatron_ec.models.hf_config import common_checks, decoder_fields, decoder_hf_fields, require
from megatron_ec.models.hf_gate import GateAdapter
from megatron_ec.models.transforms import H, decoder_rules, fused_expert_layout

MOE = H + "block_sparse_moe."
EXPERT = MOE + "experts.{expert}."


@register
class Mixtral(Family):
    """Mixtral-8x7B, Mixtral-8x22B and relatives."""

    model_type = "mixtral"
    hf_gate = GateAdapter("MixtralSparseMoeBlock", fp32_weights=True)
    ignored_hf_keys = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    hf_aliases = {H + "mlp.gate.weight": MOE + "gate.weight"}
    fused_experts = fused_expert_layout(H + "mlp.experts.", EXPERT, gate="w1", up="w3",
                                        down="w2")

    def to_model_config(self, hf_config) -> MoEModelConfig:
        require(self.model_type, [
            *common_checks(hf_config),
            (hf_config.sliding_window is None,
             f"sliding_window={hf_config.sliding_window} is not supported; set it to null "
             "(Megatron attends over the full context)"),
        ])
        return MoEModelConfig(
            **decoder_fields(hf_config, hf_config.intermediate_size),
            score_function="softmax",
            norm_topk_prob=True,
        )

    def to_hf_config(self, model_cfg: MoEModelConfig, original: dict) -> dict:
        out = decoder_hf_fields(model_cfg, original)
        out.update(num_local_experts=model_cfg.num_experts,
                   intermediate_size=model_cfg.moe_ffn_hidden_size)
        return out

    def rules(self, model_cfg: MoEModelConfig):
        return decoder_rules(MOE + "gate.weight", EXPERT, gate="w1", up="w3", down="w2")
