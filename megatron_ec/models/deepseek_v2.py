"""DeepSeek-V2 / V2-Lite (`DeepseekV2ForCausalLM`, model_type "deepseek_v2") <-> Megatron-Core.

Facts from transformers 5.23 `models/deepseek_v2/modeling_deepseek_v2.py`:
- multi-latent attention: `q_proj` (V2-Lite, `q_lora_rank` None) or `q_a_proj` -> `q_a_layernorm`
  -> `q_b_proj`; `kv_a_proj_with_mqa` = [kv latent; shared rope key], `kv_a_layernorm` on the
  latent, `kv_b_proj` -> per head [k_nope; v]; both latent norms use eps 1e-6 whatever
  `rms_norm_eps` says;
- RoPE on the rope slice only, on interleaved pairs (complex multiply); Megatron's MLA
  de-interleaves q and k alike (`mla_rotary_interleaved`), which leaves q.k unchanged, so the
  weights are copied as they are;
- YaRN (`rope_type` "yarn"): cos/sin times mscale(factor, mscale) / mscale(factor,
  mscale_all_dim), softmax scale times mscale(factor, mscale_all_dim)^2 (both as MCore's MLA);
- layers below `first_k_dense_replace` have a dense MLP (`intermediate_size`); MoE layers add
  ungated shared experts of width `n_shared_experts * moe_intermediate_size`;
- router: fp32 softmax over all experts, top-k `greedy` or `group_limited_greedy` (group score =
  the group's max score), weights x `routed_scaling_factor`, never renormalised (the code does
  not read `norm_topk_prob`).
HF tensor names are the hub (on-disk) names: per-expert `gate_proj`/`up_proj`/`down_proj`.
"""

from __future__ import annotations

from megatron_ec.models.config import MLAConfig, MoEModelConfig, RopeScaling
from megatron_ec.models.family import Family, Rule, register
from megatron_ec.models.hf_gate import GateAdapter
from megatron_ec.models.transforms import H, M, fused_expert_layout, gate_up, same

# MoEModelConfig field <- HF config attribute (copied as is in both directions).
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_experts": "n_routed_experts",
    "topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "routed_scaling_factor": "routed_scaling_factor",
    "init_std": "initializer_range",
}

MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

# DeepseekV2RMSNorm's default eps, which q_a_layernorm and kv_a_layernorm are built with.
LATENT_NORM_EPS = 1e-6

ATTN, HF_ATTN, MLP = M + "self_attention.", H + "self_attn.", H + "mlp."
EXPERT, HF_EXPERT = M + "mlp.experts.local_experts.{expert}.", MLP + "experts.{expert}."

# transformers v5's in-memory layout, written by save_pretrained(save_original_format=False)
FUSED_EXPERTS = fused_expert_layout(MLP + "experts.", HF_EXPERT)


def _rope(hf_config) -> dict:
    return dict(hf_config.rope_parameters or {})


def _unsupported(hf_config) -> list[str]:
    """HF settings this adapter cannot reproduce in Megatron-Core."""
    rope = _rope(hf_config)
    yarn = rope.get("rope_type") == "yarn"
    checks = {
        "num_experts_per_tok is not set": hf_config.num_experts_per_tok is None,
        "attention_bias=True (MCore's MLA projections have no bias)":
            bool(hf_config.attention_bias),
        "mlp_bias=True": bool(hf_config.mlp_bias),
        f"hidden_act={hf_config.hidden_act!r} (only 'silu')": hf_config.hidden_act != "silu",
        "tie_word_embeddings=True (untie lm_head before converting)":
            bool(hf_config.tie_word_embeddings),
        "num_key_value_heads != num_attention_heads":
            hf_config.num_key_value_heads != hf_config.num_attention_heads,
        "n_shared_experts must be >= 1": not hf_config.n_shared_experts,
        f"topk_method={hf_config.topk_method!r} (greedy | group_limited_greedy)":
            hf_config.topk_method not in ("greedy", "group_limited_greedy"),
        # the original remote code's moe_layer_freq is ignored by transformers' native class
        "moe_layer_freq != 1": getattr(hf_config, "moe_layer_freq", 1) != 1,
        f"rope_type={rope.get('rope_type')!r} (default | yarn)":
            rope.get("rope_type", "default") not in ("default", "yarn"),
        "yarn attention_factor is set": yarn and rope.get("attention_factor") is not None,
        "yarn truncate=False": yarn and rope.get("truncate", True) is False,
        # HF then scales cos/sin by mscale(factor) only; MCore would divide by mscale_all_dim's
        "yarn mscale_all_dim without mscale": yarn and bool(rope.get("mscale_all_dim"))
            and not rope.get("mscale"),
    }
    return [message for message, bad in checks.items() if bad]


def _rope_scaling(hf_config) -> RopeScaling | None:
    """HF YaRN parameters in the form MCore's YarnRotaryEmbedding computes the same numbers with."""
    rope = _rope(hf_config)
    if rope.get("rope_type") != "yarn":
        return None
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or hf_config.max_position_embeddings / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        # HF: cos/sin x mscale(factor, 1) and no softmax rescale = MCore with (1.0, 0.0)
        mscale, mscale_all_dim = 1.0, 0.0
    return RopeScaling(
        factor=float(factor), original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(mscale), mscale_all_dim=float(mscale_all_dim),
    )


def _routing_groups(hf_config) -> dict:
    """group_limited_greedy keeps the `topk_group` groups with the highest max score."""
    if hf_config.topk_method != "group_limited_greedy":
        return {"num_groups": None, "group_topk": None}
    return {"num_groups": hf_config.n_group, "group_topk": hf_config.topk_group}


def _dense_fields(hf_config) -> dict:
    first_k = min(hf_config.first_k_dense_replace or 0, hf_config.num_hidden_layers)
    return {"dense_layers": tuple(range(first_k)),
            "ffn_hidden_size": hf_config.intermediate_size if first_k else None}


def _latent_norm_eps(model_cfg: MoEModelConfig):
    """q/kv latent norms keep eps 1e-6 (HF builds them without `rms_norm_eps`)."""
    if model_cfg.norm_eps == LATENT_NORM_EPS:
        return None  # MCore's layernorm_epsilon is already right for them

    def hook(block_spec):
        # imported here: family files stay importable without Megatron-Core
        from megatron_ec.models.attention import with_latent_norm_eps

        return with_latent_norm_eps(block_spec, LATENT_NORM_EPS)

    return hook


def _query_rules(cfg: MoEModelConfig) -> list[Rule]:
    if cfg.mla.q_lora_rank is None:
        return [same(ATTN + "linear_q_proj.weight", HF_ATTN + "q_proj.weight")]
    return [
        same(ATTN + "linear_q_down_proj.weight", HF_ATTN + "q_a_proj.weight"),
        same(ATTN + "q_layernorm.weight", HF_ATTN + "q_a_layernorm.weight"),
        same(ATTN + "linear_q_up_proj.weight", HF_ATTN + "q_b_proj.weight"),
    ]


def _attention_rules(cfg: MoEModelConfig) -> list[Rule]:
    # kv_a_proj_with_mqa is [kv_lora_rank latent; qk_rope_head_dim rope key] in both models, and
    # kv_b_proj is per head [k_nope; v] in both: plain copies (which also commute with TP cuts).
    return [
        same(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        *_query_rules(cfg),
        same(ATTN + "linear_kv_down_proj.weight", HF_ATTN + "kv_a_proj_with_mqa.weight"),
        same(ATTN + "kv_layernorm.weight", HF_ATTN + "kv_a_layernorm.weight"),
        same(ATTN + "linear_kv_up_proj.weight", HF_ATTN + "kv_b_proj.weight"),
        same(ATTN + "linear_proj.weight", HF_ATTN + "o_proj.weight"),
        same(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    ]


def _gated_mlp_rules(megatron: str, hf: str, layers: str) -> list[Rule]:
    return [
        gate_up(megatron + "linear_fc1.weight", hf + "gate_proj.weight", hf + "up_proj.weight",
                layers=layers),
        same(megatron + "linear_fc2.weight", hf + "down_proj.weight", layers=layers),
    ]


def _rules(cfg: MoEModelConfig) -> list[Rule]:
    return [
        same("embedding.word_embeddings.weight", "model.embed_tokens.weight", pads_vocab=True),
        same("decoder.final_layernorm.weight", "model.norm.weight"),
        same("output_layer.weight", "lm_head.weight", pads_vocab=True),
        *_attention_rules(cfg),
        *_gated_mlp_rules(M + "mlp.", MLP, "dense"),
        same(M + "mlp.router.weight", MLP + "gate.weight", layers="moe"),
        *_gated_mlp_rules(EXPERT, HF_EXPERT, "moe"),
        # n_shared_experts ungated experts are one MLP of the summed width on both sides
        *_gated_mlp_rules(M + "mlp.shared_experts.", MLP + "shared_experts.", "moe"),
    ]


@register
class DeepseekV2Family(Family):
    """DeepSeek-V2, V2-Lite, DeepSeek-Coder-V2(-Lite)."""

    model_type = "deepseek_v2"
    hf_gate = GateAdapter("DeepseekV2Moe", fp32_weights=True)
    ignored_hf_keys = (r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)
    fused_experts = FUSED_EXPERTS

    def to_model_config(self, hf_config) -> MoEModelConfig:
        problems = _unsupported(hf_config)
        if problems:
            raise ValueError("deepseek_v2: unsupported HF config: " + "; ".join(problems))
        fields = {ours: getattr(hf_config, theirs) for ours, theirs in CONFIG_FIELDS.items()}
        return MoEModelConfig(
            **fields, **_dense_fields(hf_config), **_routing_groups(hf_config),
            mla=MLAConfig(**{name: getattr(hf_config, name) for name in MLA_FIELDS}),
            shared_expert_size=hf_config.moe_intermediate_size * hf_config.n_shared_experts,
            rope_theta=float(_rope(hf_config).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(hf_config),
            normalization="RMSNorm", score_function="softmax",
            # the modeling code never renormalises, whatever the config's norm_topk_prob says
            norm_topk_prob=False,
            aux_loss_coeff=float(getattr(hf_config, "aux_loss_alpha", 0.0) or 0.0),
        )

    def to_hf_config(self, model_cfg: MoEModelConfig, original: dict) -> dict:
        hf = dict(original)
        hf.update({theirs: getattr(model_cfg, ours) for ours, theirs in CONFIG_FIELDS.items()})
        return hf

    def rules(self, model_cfg: MoEModelConfig) -> list[Rule]:
        return _rules(model_cfg)

    def attention_hook(self, model_cfg: MoEModelConfig):
        return _latent_norm_eps(model_cfg)
