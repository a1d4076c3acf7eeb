"""Pure tensor transforms shared by the families' rule tables (`Rule.to_megatron` / `Rule.to_hf`).

Each pair is exact inverses on the tensors they are given: `to_hf(to_megatron(x)) == x` bitwise,
so an HF -> Megatron -> HF round trip reproduces every checkpoint tensor. Functions take and
return full (TP1/EP1) tensors plus the `MoEModelConfig`; sharding is `layout.py`'s business.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_ec.models.config import MoEModelConfig


def _expect(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{what}: expected shape {shape}, got {tuple(tensor.shape)}")


def pad_vocab(tensors: Sequence[torch.Tensor], cfg: MoEModelConfig) -> torch.Tensor:
    """HF [vocab, hidden] embedding/lm_head -> Megatron, zero rows up to the padded vocab."""
    (weight,) = tensors
    _expect(weight, (cfg.vocab_size, cfg.hidden_size), "vocabulary matrix")
    padding = weight.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, cfg.hidden_size)
    return torch.cat([weight, padding], dim=0)


def trim_vocab(weight: torch.Tensor, cfg: MoEModelConfig) -> Sequence[torch.Tensor]:
    """Megatron padded vocabulary matrix -> the HF rows."""
    _expect(weight, (cfg.padded_vocab_size, cfg.hidden_size), "padded vocabulary matrix")
    return [weight[: cfg.vocab_size].clone()]


def fuse_gated(tensors: Sequence[torch.Tensor], cfg: MoEModelConfig) -> torch.Tensor:
    """HF (gate_proj, up_proj) [I, H] each -> Megatron gated `linear_fc1` [2I, H] = [gate; up]."""
    gate, up = tensors
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
    return torch.cat([gate, up], dim=0)


def split_gated(fc1: torch.Tensor, cfg: MoEModelConfig) -> Sequence[torch.Tensor]:
    """Megatron gated `linear_fc1` [2I, H] -> HF (gate_proj, up_proj)."""
    gate, up = fc1.chunk(2, dim=0)
    return [gate.clone(), up.clone()]


def fuse_qkv(tensors: Sequence[torch.Tensor], cfg: MoEModelConfig) -> torch.Tensor:
    """HF q/k/v projections -> Megatron `linear_qkv`, interleaved per query group.

    Megatron's layout is [q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...], so a
    contiguous TP slice holds whole groups. Works for weights [out, H] and biases [out].
    """
    q, k, v = tensors
    groups, dim = cfg.kv_heads, cfg.kv_channels
    per_group = cfg.num_attention_heads // groups
    _expect(q, (cfg.num_attention_heads * dim, *q.shape[1:]), "q_proj")
    _expect(k, (groups * dim, *q.shape[1:]), "k_proj")
    _expect(v, (groups * dim, *q.shape[1:]), "v_proj")
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, per_group * dim, *rest),
                       k.reshape(groups, dim, *rest),
                       v.reshape(groups, dim, *rest)], dim=1)
    return fused.reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: MoEModelConfig) -> Sequence[torch.Tensor]:
    """Megatron `linear_qkv` -> HF (q_proj, k_proj, v_proj)."""
    groups, dim = cfg.kv_heads, cfg.kv_channels
    per_group = cfg.num_attention_heads // groups
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, (per_group + 2) * dim, *rest).split(
        [per_group * dim, dim, dim], dim=1)
    return [t.reshape(-1, *rest).clone() for t in (q, k, v)]
