"""OLMoE adapter: config and rule round trips, and Megatron == HF transformers at every layout."""

from __future__ import annotations

import pytest
from transformers import OlmoeConfig

from megatron_ec.models.family import get_family
from tests.family_checks import FamilyParityChecks


def olmoe_config(**overrides) -> OlmoeConfig:
    """Tiny OLMoE: GQA (4 query heads, 2 kv heads), 6 experts, vocab 250 (padded to 256)."""
    fields = dict(
        vocab_size=250, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
        max_position_embeddings=64, initializer_range=0.1, pad_token_id=None, eos_token_id=None,
    )
    fields.update(overrides)
    return OlmoeConfig(**fields)


CASES = {
    "hub_routing": olmoe_config(),  # norm_topk_prob=False, as OLMoE-1B-7B-0924
    "renormalised": olmoe_config(norm_topk_prob=True, num_key_value_heads=4),
}


def test_model_config_fields():
    cfg = get_family("olmoe").to_model_config(olmoe_config())
    assert (cfg.qk_norm, cfg.score_function, cfg.norm_topk_prob) == ("full", "softmax", False)
    assert (cfg.num_kv_heads, cfg.num_experts, cfg.topk, cfg.moe_ffn_hidden_size) == (2, 6, 2, 32)
    assert cfg.shared_expert_size == 0 and cfg.dense_layers == ()


def test_hf_config_round_trip():
    family = get_family("olmoe")
    original = olmoe_config().to_dict()
    assert family.to_hf_config(family.to_model_config(olmoe_config()), original) == original


@pytest.mark.parametrize("setting", [{"clip_qkv": 8.0}, {"attention_bias": True},
                                     {"hidden_act": "gelu"}])
def test_unsupported_settings_raise(setting):
    with pytest.raises(ValueError, match="olmoe: unsupported"):
        get_family("olmoe").to_model_config(olmoe_config(**setting))


class TestParity(FamilyParityChecks):
    """The shared checks (tests/family_checks.py) on this family's cases."""

    FAMILY, CASES = "olmoe", CASES
    IMPORT_CASE, ROUND_TRIP_CASE, FUSED_CASE = "renormalised", "hub_routing", "renormalised"

    @pytest.fixture(params=list(CASES))
    def case(self, request):
        return request.param
