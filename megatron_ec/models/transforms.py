"""Tensor transforms and rule constructors shared by the family tables.

Every `to_megatron` here commutes with cutting its inputs into equal TP pieces along the Megatron
partition dim (see `megatron_ec.models.family`): head and group counts are derived from tensor
sizes, so the same function fuses whole tensors and per-rank slices.

Shape legend: H hidden size, D head dim, G query groups (KV heads), Q query heads per group,
I MLP intermediate size.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import FusedExperts, Rule


def fuse_qkv(tensors: Sequence[torch.Tensor], cfg: MoEModelConfig) -> torch.Tensor:
    """q [G*Q*D, ...], k [G*D, ...], v [G*D, ...] -> Megatron's per-group [q_g; k_g; v_g] rows.

    Megatron-Core's `linear_qkv` interleaves by query group (`q1 q2 k1 v1 | q3 q4 k2 v2 | ...`);
    HF keeps q, k and v apart. Works for weights and biases.
    """
    q, k, v = tensors
    num_groups = k.shape[0] // cfg.kv_channels
    rest = q.shape[1:]
    grouped = [t.reshape(num_groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, cfg: MoEModelConfig) -> list[torch.Tensor]:
    """Inverse of `fuse_qkv` on the whole tensor: [q; k; v] in HF's order."""
    head_dim, num_groups = cfg.kv_channels, cfg.kv_heads
    q_rows = cfg.num_attention_heads // num_groups * head_dim
    rest = fused.shape[1:]
    q, k, v = fused.reshape(num_groups, -1, *rest).split([q_rows, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def fuse_gate_up(tensors: Sequence[torch.Tensor], cfg: MoEModelConfig) -> torch.Tensor:
    """gate [I, H], up [I, H] -> Megatron's gated `linear_fc1` [gate; up] (per TP piece too)."""
    gate, up = tensors
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, cfg: MoEModelConfig) -> list[torch.Tensor]:
    """Inverse of `fuse_gate_up`."""
    return list(fc1.chunk(2, dim=0))


# Rule constructors: the rows of a family table.


def same(megatron: str, hf: str, layers: str = "all", pads_vocab: bool = False) -> Rule:
    """One tensor, unchanged."""
    return Rule(megatron, (hf,), layers=layers, pads_vocab=pads_vocab)


def qkv(megatron: str, q: str, k: str, v: str) -> Rule:
    """Fused Megatron `linear_qkv` <-> separate HF q/k/v projections (weights or biases)."""
    return Rule(megatron, (q, k, v), fuse_qkv, split_qkv)


def gate_up(megatron: str, gate: str, up: str, layers: str = "all") -> Rule:
    """Gated Megatron `linear_fc1` <-> HF gate and up projections."""
    return Rule(megatron, (gate, up), fuse_gate_up, split_gate_up, layers=layers)


# Name prefixes of one decoder layer: Megatron (TP1/EP1, global expert ids) and HF.
M, H = "decoder.layers.{layer}.", "model.layers.{layer}."
ATTN = H + "self_attn."
MEGATRON_EXPERT = M + "mlp.experts.local_experts.{expert}."


def decoder_rules(router: str, expert: str, gate: str = "gate_proj", up: str = "up_proj",
                  down: str = "down_proj") -> list[Rule]:
    """The table every Llama-style MoE family shares: embeddings, final norm, output layer,
    fused QKV and output projection, the two layer norms, the router and the routed experts.

    Args:
        router: HF name of the router weight, e.g. H + "mlp.gate.weight".
        expert: HF prefix of one routed expert, e.g. H + "mlp.experts.{expert}.".
        gate, up, down: HF names of the expert's projections under that prefix.
    """
    return [
        same("embedding.word_embeddings.weight", "model.embed_tokens.weight", pads_vocab=True),
        same("decoder.final_layernorm.weight", "model.norm.weight"),
        same("output_layer.weight", "lm_head.weight", pads_vocab=True),
        same(M + "input_layernorm.weight", H + "input_layernorm.weight"),
        qkv(M + "self_attention.linear_qkv.weight",
            ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"),
        same(M + "self_attention.linear_proj.weight", ATTN + "o_proj.weight"),
        same(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        same(M + "mlp.router.weight", router, layers="moe"),
        gate_up(MEGATRON_EXPERT + "linear_fc1.weight", f"{expert}{gate}.weight",
                f"{expert}{up}.weight", layers="moe"),
        same(MEGATRON_EXPERT + "linear_fc2.weight", f"{expert}{down}.weight", layers="moe"),
    ]


def qk_norm_rules() -> list[Rule]:
    """Query/key norm weights (per head or full width: the tensors map one to one)."""
    return [same(M + "self_attention.q_layernorm.weight", ATTN + "q_norm.weight"),
            same(M + "self_attention.k_layernorm.weight", ATTN + "k_norm.weight")]


def dense_mlp_rules(mlp: str) -> list[Rule]:
    """The gated MLP of dense layers, HF prefix `mlp` (e.g. H + "mlp.")."""
    return [gate_up(M + "mlp.linear_fc1.weight", mlp + "gate_proj.weight", mlp + "up_proj.weight",
                    layers="dense"),
            same(M + "mlp.linear_fc2.weight", mlp + "down_proj.weight", layers="dense")]


def fused_expert_layout(fused: str, expert: str, gate: str = "gate_proj", up: str = "up_proj",
                  down: str = "down_proj") -> tuple[FusedExperts, ...]:
    """transformers v5's fused `[E, ...]` expert tensors under HF prefix `fused` (e.g.
    H + "mlp.experts."), read as the per-expert tensors under prefix `expert`."""
    return (FusedExperts(fused + "gate_up_proj", (f"{expert}{gate}.weight", f"{expert}{up}.weight")),
            FusedExperts(fused + "down_proj", (f"{expert}{down}.weight",)))
