"""OLMoE (`OlmoeForCausalLM`, model_type "olmoe") <-> Megatron-Core.

Facts from transformers 5.23 `models/olmoe/modeling_olmoe.py`:
- softmax router over all experts, top-k, renormalised only if `norm_topk_prob` (default False;
  OLMoE-1B-7B-0924 ships False); no shared expert, no dense layer, no router bias;
- QK-norm is an RMSNorm over the WHOLE projection (`q_norm` over num_heads * head_dim,
  `k_norm` over num_kv_heads * head_dim), applied before the heads are split and before RoPE;
- rotate-half RoPE (`rope_type` "default"), every norm uses `rms_norm_eps`.
HF tensor names are the hub (on-disk) names: per-expert `gate_proj`/`up_proj`/`down_proj`.
"""

from __future__ import annotations

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family, Rule, register
from megatron_ec.models.hf_gate import GateAdapter
from megatron_ec.models.transforms import H, decoder_rules, fused_expert_layout, qk_norm_rules

# MoEModelConfig field <- HF config attribute (copied as is in both directions).
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "num_experts": "num_experts",
    "topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "norm_topk_prob": "norm_topk_prob",
    "aux_loss_coeff": "router_aux_loss_coef",
    "init_std": "initializer_range",
}

MLP = H + "mlp."
HF_EXPERT = MLP + "experts.{expert}."

# transformers v5's in-memory layout, written by save_pretrained(save_original_format=False)
FUSED_EXPERTS = fused_expert_layout(MLP + "experts.", HF_EXPERT)


def _unsupported(hf_config) -> list[str]:
    """HF settings this adapter cannot reproduce in Megatron-Core."""
    rope = hf_config.rope_parameters or {}
    head_dim = getattr(hf_config, "head_dim", None)
    checks = {
        "clip_qkv is set (q/k/v clamping has no Megatron-Core equivalent)":
            hf_config.clip_qkv is not None,
        # attention_bias also puts a bias on o_proj; MCore's add_bias_linear would bias every linear
        "attention_bias=True": bool(hf_config.attention_bias),
        f"hidden_act={hf_config.hidden_act!r} (only 'silu')": hf_config.hidden_act != "silu",
        "tie_word_embeddings=True (untie lm_head before converting)":
            bool(hf_config.tie_word_embeddings),
        f"rope_type={rope.get('rope_type')!r} (only 'default')":
            rope.get("rope_type", "default") != "default",
        # MCore's GPTModel takes an integer rotary base
        "rope_theta is not an integer": _rope_theta(hf_config) != int(_rope_theta(hf_config)),
        # q_norm is built over hidden_size: only equal to the q width when head_dim is implied
        "head_dim != hidden_size / num_attention_heads":
            head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads),
    }
    return [message for message, bad in checks.items() if bad]


def _rope_theta(hf_config) -> float:
    # transformers 5 keeps rope_theta inside rope_parameters (hub files may still say rope_theta)
    return float((hf_config.rope_parameters or {}).get("rope_theta", 10000.0))


def _full_width_qk_norm(model_cfg: MoEModelConfig):
    """OLMoE normalises q and k over all heads at once (not per head as MCore's qk_layernorm)."""

    def hook(block_spec):
        # imported here: family files stay importable without Megatron-Core (the converter CLI
        # reads configs and weights before it imports MCore)
        from megatron_ec.models.attention import with_full_width_qk_norm

        return with_full_width_qk_norm(block_spec, model_cfg.num_attention_heads,
                                       model_cfg.kv_heads)

    return hook


def _rules() -> list[Rule]:
    # full-width QK norms: the Megatron weight is the whole [heads * head_dim] vector
    return [*decoder_rules(MLP + "gate.weight", HF_EXPERT), *qk_norm_rules()]


@register
class OlmoeFamily(Family):
    """OLMoE-1B-7B and its fine-tunes."""

    model_type = "olmoe"
    hf_gate = GateAdapter("OlmoeSparseMoeBlock")
    ignored_hf_keys = (r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)
    fused_experts = FUSED_EXPERTS

    def to_model_config(self, hf_config) -> MoEModelConfig:
        problems = _unsupported(hf_config)
        if problems:
            raise ValueError("olmoe: unsupported HF config: " + "; ".join(problems))
        fields = {ours: getattr(hf_config, theirs) for ours, theirs in CONFIG_FIELDS.items()}
        return MoEModelConfig(
            **fields, rope_theta=_rope_theta(hf_config), normalization="RMSNorm",
            qk_norm="full", score_function="softmax",
        )

    def to_hf_config(self, model_cfg: MoEModelConfig, original: dict) -> dict:
        hf = dict(original)
        hf.update({theirs: getattr(model_cfg, ours) for ours, theirs in CONFIG_FIELDS.items()})
        return hf

    def rules(self, model_cfg: MoEModelConfig) -> list[Rule]:
        return _rules()

    def attention_hook(self, model_cfg: MoEModelConfig):
        return _full_width_qk_norm(model_cfg)
