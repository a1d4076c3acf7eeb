"""HF config reading shared by the Llama-style MoE families (Qwen2-MoE, Qwen3-MoE, Mixtral).

Configs are read as transformers config objects (`AutoConfig`), never as raw JSON: v5 renames
fields (`rope_theta` -> `rope_parameters`) and aliases others (`num_experts` <->
`num_local_experts`), and the config classes resolve both spellings.
"""

from __future__ import annotations

from typing import Iterable


def require(model_type: str, checks: Iterable[tuple[bool, str]]) -> None:
    """Raise ValueError for the first failed (ok, "what; how to fix") check."""
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{model_type}: {message}")


def rope_theta(hf_config) -> float:
    """The rotary base; only plain RoPE is supported (MCore's GPTModel takes an integer base)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    require(hf_config.model_type, [
        (rope_type == "default", f"rope scaling {rope_type!r} is not supported; only plain RoPE "
                                 "(rope_type 'default') converts exactly"),
        (theta == int(theta), f"rope_theta={theta} is not an integer; Megatron-Core's GPTModel "
                              "takes an integer rotary base"),
    ])
    return theta


def common_checks(hf_config) -> list[tuple[bool, str]]:
    """Settings every supported Llama-style family must have."""
    return [
        (hf_config.hidden_act == "silu",
         f"hidden_act={hf_config.hidden_act!r} is not supported; only SwiGLU ('silu') experts"),
        (not hf_config.tie_word_embeddings,
         "tie_word_embeddings=True is not supported; untie lm_head before converting"),
    ]


def decoder_fields(hf_config, moe_ffn_hidden_size: int) -> dict:
    """The `MoEModelConfig` fields every Llama-style MoE family reads the same way."""
    heads = hf_config.num_attention_heads
    return dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        num_experts=hf_config.num_experts,
        topk=hf_config.num_experts_per_tok,
        moe_ffn_hidden_size=moe_ffn_hidden_size,
        normalization="RMSNorm",
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=rope_theta(hf_config),
        max_position_embeddings=hf_config.max_position_embeddings,
        init_std=hf_config.initializer_range,
        aux_loss_coeff=hf_config.router_aux_loss_coef,
    )


def decoder_hf_fields(cfg, original: dict) -> dict:
    """Inverse of `decoder_fields`, written over a copy of the original HF config dict."""
    out = dict(original)
    out.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads,
        num_experts_per_tok=cfg.topk,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std,
        router_aux_loss_coef=cfg.aux_loss_coeff,
        rope_parameters={**(original.get("rope_parameters") or {}),
                         "rope_theta": cfg.rope_theta, "rope_type": "default"},
    )
    if original.get("head_dim") is not None:
        out["head_dim"] = cfg.kv_channels
    return out


def qwen_dense_layers(hf_config) -> tuple[int, ...]:
    """Dense-MLP layers of Qwen-style configs: layer L is MoE iff L is not in `mlp_only_layers`
    and (L + 1) % `decoder_sparse_step` == 0 (transformers `Qwen2MoeDecoderLayer`)."""
    step = hf_config.decoder_sparse_step
    mlp_only = set(hf_config.mlp_only_layers or ())
    return tuple(i for i in range(hf_config.num_hidden_layers)
                 if i in mlp_only or (i + 1) % step != 0)


def qwen_moe_hf_fields(cfg, original: dict, num_experts_key: str) -> dict:
    """`decoder_hf_fields` plus the MoE fields Qwen2-MoE and Qwen3-MoE write the same way
    (they differ in the name of the expert count: `num_experts` / `num_local_experts`)."""
    out = decoder_hf_fields(cfg, original)
    out.update({num_experts_key: cfg.num_experts},
               moe_intermediate_size=cfg.moe_ffn_hidden_size,
               norm_topk_prob=cfg.norm_topk_prob)
    if cfg.ffn_hidden_size:
        out["intermediate_size"] = cfg.ffn_hidden_size
    return out


def qwen_checks(hf_config, dense_layers: tuple[int, ...]) -> list[tuple[bool, str]]:
    """`common_checks` plus what Qwen2-MoE and Qwen3-MoE configs can get wrong the same way."""
    return [
        *common_checks(hf_config),
        (not hf_config.use_sliding_window,
         "use_sliding_window=True is not supported; Megatron attends over the full context"),
        (len(dense_layers) < hf_config.num_hidden_layers,
         "no MoE layer (check num_experts, decoder_sparse_step and mlp_only_layers)"),
    ]
