"""Family adapters on their own (no Megatron-Core): config translation, rejected settings, rule
tables against real HF checkpoints (both on-disk layouts), transforms and their TP-slicing law."""

from __future__ import annotations

import pytest
import torch

from checkpoint_convert.hf_checkpoint import HFCheckpoint
from checkpoint_convert.load import check_names
from checkpoint_convert.mapping import expand
from megatron_ec.models.family import get_family
from megatron_ec.models.transforms import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from tests.convert_testing import FAMILIES
from tools.make_tiny_hf import make_tiny_hf, tiny_config


def test_config_translation():
    qwen2 = get_family("qwen2_moe").to_model_config(tiny_config("qwen2_moe"))
    assert (qwen2.dense_layers, qwen2.ffn_hidden_size, qwen2.shared_expert_size) == ((0,), 96, 48)
    assert qwen2.shared_expert_gate and qwen2.qkv_bias and not qwen2.norm_topk_prob
    assert (qwen2.num_experts, qwen2.topk, qwen2.kv_heads, qwen2.vocab_size) == (6, 2, 2, 250)
    qwen3 = get_family("qwen3_moe").to_model_config(tiny_config("qwen3_moe"))
    assert (qwen3.qk_norm, qwen3.kv_channels, qwen3.norm_topk_prob) == ("per_head", 24, True)
    mixtral = get_family("mixtral").to_model_config(tiny_config("mixtral"))
    assert mixtral.norm_topk_prob and mixtral.dense_layers == () and mixtral.rope_theta == 1e6
    sparse_step = get_family("qwen2_moe").to_model_config(
        tiny_config("qwen2_moe", mlp_only_layers=[], decoder_sparse_step=2))
    assert sparse_step.dense_layers == (0, 2) and sparse_step.moe_layers == (1,)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family):
    hf_config = tiny_config(family)
    original = hf_config.to_dict()
    adapter = get_family(family)
    assert adapter.to_hf_config(adapter.to_model_config(hf_config), original) == original


@pytest.mark.parametrize("family, overrides, message", [
    ("qwen2_moe", dict(use_sliding_window=True), "use_sliding_window"),
    ("qwen2_moe", dict(tie_word_embeddings=True), "tie_word_embeddings"),
    ("qwen2_moe", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen3_moe", dict(attention_bias=True), "attention_bias"),
    ("qwen3_moe", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                        "original_max_position_embeddings": 32}), "yarn"),
    ("mixtral", dict(sliding_window=4096), "sliding_window"),
])
def test_unsupported_settings_are_rejected(family, overrides, message):
    with pytest.raises(ValueError, match=message):
        get_family(family).to_model_config(tiny_config(family, **overrides))


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match="supported: .*mixtral.*qwen2_moe.*qwen3_moe"):
        get_family("llama")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fused", [False, True])
def test_tables_map_every_tensor_of_both_layouts(tmp_path, family, fused):
    hf_dir = make_tiny_hf(family, tmp_path / "hf", fused=fused)
    adapter = get_family(family)
    cfg = adapter.to_model_config(tiny_config(family))
    ckpt = HFCheckpoint(hf_dir, adapter)
    check_names(ckpt, expand(adapter, cfg), adapter)  # raises on any unmapped or missing name
    if fused:  # a fused expert reads back as the per-expert tensor save_pretrained would write
        per_expert = HFCheckpoint(make_tiny_hf(family, tmp_path / "split"), adapter)
        for name in per_expert.names():
            assert torch.equal(ckpt.read(name), per_expert.read(name)), name


def _qkv_inputs(heads=4, groups=2, head_dim=3, hidden=5):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(heads * head_dim, hidden, generator=gen)
    k, v = (torch.randn(groups * head_dim, hidden, generator=gen) for _ in range(2))
    return q, k, v


def test_qkv_interleaves_per_query_group():
    cfg = tiny_config_for_heads(heads=4, groups=2, head_dim=3)
    q, k, v = _qkv_inputs()
    fused = fuse_qkv([q, k, v], cfg)
    # Megatron-Core order: q1 q2 k1 v1 | q3 q4 k2 v2 (3 rows per head)
    expected = torch.cat([q[:6], k[:3], v[:3], q[6:], k[3:], v[3:]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v)))


@pytest.mark.parametrize("pieces", [1, 2])
def test_transforms_commute_with_tp_slicing(pieces):
    """The contract of `to_megatron`: transforming TP pieces == the TP piece of the transform."""
    cfg = tiny_config_for_heads(heads=4, groups=2, head_dim=3)
    q, k, v = _qkv_inputs()
    fused = fuse_qkv([q, k, v], cfg)
    for rank in range(pieces):
        piece = fuse_qkv([t.chunk(pieces)[rank] for t in (q, k, v)], cfg)
        assert torch.equal(piece, fused.chunk(pieces)[rank])
    gate, up = torch.randn(8, 5), torch.randn(8, 5)
    fc1 = fuse_gate_up([gate, up], cfg)
    for rank in range(pieces):  # layout.py's gated TP shard: [gate_r; up_r]
        want = torch.cat([gate.chunk(pieces)[rank], up.chunk(pieces)[rank]])
        assert torch.equal(fuse_gate_up([gate.chunk(pieces)[rank], up.chunk(pieces)[rank]], cfg),
                           want)
    assert all(torch.equal(a, b) for a, b in zip(split_gate_up(fc1, cfg), (gate, up)))


def tiny_config_for_heads(heads: int, groups: int, head_dim: int):
    from megatron_ec.models.config import MoEModelConfig

    return MoEModelConfig(vocab_size=10, hidden_size=5, num_layers=1, num_attention_heads=heads,
                          num_kv_heads=groups, head_dim=head_dim, num_experts=2, topk=1,
                          moe_ffn_hidden_size=4)
