"""The model config: one small, family-agnostic description of a decoder-only MoE LLM.

Family adapters (`megatron_ec/models/<family>.py`) translate a Hugging Face config into this
dataclass; `megatron_ec.models.builder` turns it into Megatron-Core's `TransformerConfig`, a block
spec and a `GPTModel`. Sizes are in elements, layer indices are 0-based.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_ec.moe.methods.base import MoEFacts
from megatron_ec.moe.routing import RoutingConfig


@dataclass(frozen=True)
class MLAConfig:
    """Multi-latent attention (DeepSeek-V2/V3). Head sizes in elements."""

    q_lora_rank: int | None
    """Rank of the query down-projection; None = a plain `q_proj` (V2-Lite)."""
    kv_lora_rank: int
    """Rank of the joint key/value down-projection."""
    qk_nope_head_dim: int
    """Per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int
    """Per-head query/key width that carries the rotary embedding."""
    v_head_dim: int
    """Per-head value width."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN rotary scaling (`rope_type == "yarn"`), as DeepSeek (MLA) and GPT-OSS configure it."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    """Round the correction range to integers (HF `truncate`, default True; GPT-OSS: False).
    Read only on the non-MLA path (MCore's `yarn_correction_range_round_to_int`)."""


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert activation on [gate, up]: `g = min(gate, limit)`, `u = clamp(up, ±limit)`,
    out = `g * sigmoid(alpha * g) * (u + 1)` (HF `swiglu_limit`, `swiglu_alpha`)."""

    limit: float = 7.0
    alpha: float = 1.702


@dataclass(frozen=True)
class MoEModelConfig:
    """A decoder-only MoE transformer, independent of any parallel layout."""

    vocab_size: int
    """Real vocabulary size (the HF tokenizer/model size); the Megatron model pads it."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_experts: int
    """Routed experts per MoE layer (E)."""
    topk: int
    """Routed experts per token (k) of the family's own routing."""
    moe_ffn_hidden_size: int
    """Intermediate size of one routed expert."""
    ffn_hidden_size: int | None = None
    """Intermediate size of the dense MLP layers (see `dense_layers`); None = no dense layer."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA); None = `num_attention_heads`."""
    head_dim: int | None = None
    """Per-head width; None = hidden_size / num_attention_heads."""
    shared_expert_size: int = 0
    """Intermediate size of the (fused) shared expert MLP; 0 = none."""
    shared_expert_gate: bool = False
    """Qwen2-MoE style scalar sigmoid gate on the shared expert output."""
    dense_layers: tuple[int, ...] = ()
    """Layers whose MLP is dense instead of MoE (DeepSeek `first_k_dense_replace`)."""
    normalization: str = "RMSNorm"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2-MoE)."""
    linear_bias: bool = False
    """Bias on EVERY linear layer: q/k/v, output projection, router and expert fc1/fc2 (GPT-OSS;
    MCore `add_bias_linear`). Expert fc2 biases are weighted by the routing weight, as in HF."""
    attention_sinks: bool = False
    """A learned per-head logit joins each softmax and is dropped after it (GPT-OSS `sinks`;
    MCore `softmax_type="learnable"`)."""
    sliding_window: int | None = None
    """Keys a query sees in a sliding-window layer, itself included (HF `sliding_window`)."""
    sliding_layers: tuple[int, ...] = ()
    """Layers that use `sliding_window`; the others attend over the full context."""
    clamped_swiglu: ClampedSwiGLU | None = None
    """GPT-OSS's clamped SwiGLU experts; None = plain SwiGLU (silu(gate) * up)."""
    qk_norm: str = "none"
    """"none", "per_head" (Qwen3-MoE: RMSNorm over each head) or "full" (OLMoE: over the whole
    projection width)."""
    mla: MLAConfig | None = None
    tie_word_embeddings: bool = False
    score_function: str = "softmax"
    """The family's router score function: "softmax", "sigmoid" or "softmax_topk"."""
    norm_topk_prob: bool = False
    """Renormalise the selected experts' weights (HF `norm_topk_prob`)."""
    routed_scaling_factor: float = 1.0
    """Multiplier on routed-expert weights (DeepSeek `routed_scaling_factor`)."""
    num_groups: int | None = None
    """Group-limited routing (DeepSeek `n_group`); None = off."""
    group_topk: int | None = None
    """Groups kept per token (DeepSeek `topk_group`)."""
    aux_loss_coeff: float = 0.0
    """The family's load-balancing loss coefficient, used by the SFT method with aux loss on."""
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this (independent of the TP layout)."""
    extra: dict = field(default_factory=dict, hash=False, compare=False)
    """Family-specific facts the builder does not need (kept for export)."""

    def __post_init__(self) -> None:
        checks = [
            (self.hidden_size > 0 and self.num_layers > 0, "hidden_size and num_layers must be > 0"),
            (1 <= self.topk <= self.num_experts, "topk must be between 1 and num_experts"),
            (self.normalization in ("RMSNorm", "LayerNorm"), "normalization: RMSNorm | LayerNorm"),
            (self.qk_norm in ("none", "per_head", "full"), "qk_norm: none | per_head | full"),
            (self.score_function in ("softmax", "sigmoid", "softmax_topk"),
             "score_function: softmax | sigmoid | softmax_topk"),
            (self.num_attention_heads % self.kv_heads == 0,
             "num_attention_heads must be a multiple of num_kv_heads"),
            (not self.dense_layers or self.ffn_hidden_size,
             "dense_layers needs ffn_hidden_size"),
            (all(0 <= i < self.num_layers for i in self.dense_layers),
             "dense_layers must be layer indices in [0, num_layers)"),
            (all(0 <= i < self.num_layers for i in self.sliding_layers),
             "sliding_layers must be layer indices in [0, num_layers)"),
            (not self.sliding_layers or (self.sliding_window or 0) >= 1,
             "sliding_layers needs sliding_window >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"MoEModelConfig: {message}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    def moe_facts(self) -> MoEFacts:
        """What a fine-tuning method may know about this model: its routing rule and MoE layers."""
        routing = RoutingConfig(
            num_experts=self.num_experts, topk=self.topk, score_function=self.score_function,
            norm_topk_prob=self.norm_topk_prob, scaling_factor=self.routed_scaling_factor,
            num_groups=self.num_groups, group_topk=self.group_topk,
        )
        return MoEFacts(routing=routing, moe_layers=self.moe_layers,
                        aux_loss_coeff=self.aux_loss_coeff)

    def replace(self, **changes) -> "MoEModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MoEModelConfig":
        data = dict(data)
        if data.get("mla"):
            data["mla"] = MLAConfig(**data["mla"])
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if data.get("clamped_swiglu"):
            data["clamped_swiglu"] = ClampedSwiGLU(**data["clamped_swiglu"])
        data["dense_layers"] = tuple(data.get("dense_layers", ()))
        data["sliding_layers"] = tuple(data.get("sliding_layers", ()))
        return cls(**data)
