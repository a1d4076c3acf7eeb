"""DeepSeek-V2 adapter: config, routing and rule round trips, Megatron == HF at every layout."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

from megatron_ec.models.config import RopeScaling
from megatron_ec.models.family import get_family
from megatron_ec.moe.methods import make_method
from megatron_ec.moe.routing import route
from tests.family_checks import FamilyParityChecks


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}


def deepseek_config(**overrides) -> DeepseekV2Config:
    """Tiny DeepSeek-V2: dense layer 0, 6 routed + 2 shared experts, vocab 250 (padded to 256)."""
    fields = dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, n_routed_experts=6, num_experts_per_tok=2,
        n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256, initializer_range=0.1,
    )
    fields.update(overrides)
    return DeepseekV2Config(**fields)


CASES = {
    # DeepSeek-V2 style: q-LoRA, YaRN (a non-trivial ramp and mscale at this size), two groups of
    # three experts with one kept per token, scaled weights.
    "v2_qlora_yarn_grouped": deepseek_config(
        q_lora_rank=24, rope_scaling=YARN, topk_method="group_limited_greedy", n_group=2,
        topk_group=1, routed_scaling_factor=1.5),
    # V2-Lite style: plain q_proj, plain RoPE, greedy; rms_norm_eps far from the latent norms'
    # fixed 1e-6 so that using the wrong eps there would show in the logits.
    "lite": deepseek_config(q_lora_rank=None, rms_norm_eps=1e-3),
}


def test_model_config_fields():
    cfg = get_family("deepseek_v2").to_model_config(CASES["v2_qlora_yarn_grouped"])
    assert cfg.dense_layers == (0,) and cfg.ffn_hidden_size == 96
    assert cfg.shared_expert_size == 2 * 32
    assert (cfg.num_groups, cfg.group_topk, cfg.routed_scaling_factor) == (2, 1, 1.5)
    assert (cfg.score_function, cfg.norm_topk_prob) == ("softmax", False)
    assert cfg.mla.q_lora_rank == 24 and cfg.mla.kv_lora_rank == 16
    assert cfg.rope_scaling == RopeScaling(4.0, 64, 32.0, 1.0, 0.707, 1.0)


def test_norm_topk_prob_is_ignored_like_the_modeling_code():
    cfg = get_family("deepseek_v2").to_model_config(deepseek_config(norm_topk_prob=True))
    assert cfg.norm_topk_prob is False


def test_hub_style_config_dict_loads():
    """Hub config.json keys (rope_scaling "type", rope_theta, aux_loss_alpha) as V2-Lite ships."""
    hub = deepseek_config().to_dict()
    hub.pop("rope_parameters")
    hub.update(rope_theta=10000.0, rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
               aux_loss_alpha=0.001, scoring_func="softmax")
    cfg = get_family("deepseek_v2").to_model_config(DeepseekV2Config.from_dict(hub))
    assert cfg.rope_scaling.mscale_all_dim == 0.707 and cfg.aux_loss_coeff == 0.001


def test_hf_config_round_trip():
    family = get_family("deepseek_v2")
    hf_config = CASES["v2_qlora_yarn_grouped"]
    original = hf_config.to_dict()
    assert family.to_hf_config(family.to_model_config(hf_config), original) == original


@pytest.mark.parametrize("setting", [
    {"topk_method": "noaux_tc"}, {"attention_bias": True}, {"num_experts_per_tok": None},
    {"rope_scaling": dict(YARN, mscale=0.0)},
])
def test_unsupported_settings_raise(setting):
    with pytest.raises(ValueError, match="deepseek_v2: unsupported"):
        get_family("deepseek_v2").to_model_config(deepseek_config(**setting))


@pytest.mark.parametrize("case", CASES)
def test_routing_matches_hf_router(case):
    """Our route() (what ECRouter runs) selects and weights like DeepseekV2TopkRouter."""
    hf_config = CASES[case]
    torch.manual_seed(0)
    router = DeepseekV2TopkRouter(hf_config)
    torch.nn.init.normal_(router.weight, std=0.5)
    hidden = torch.randn(64, hf_config.hidden_size)
    logits, weights, ids = router(hidden)
    expected = torch.zeros_like(logits).scatter(1, ids, weights)
    model_cfg = get_family("deepseek_v2").to_model_config(hf_config)
    probs, routing_map = route(logits, make_method("sft").routing(model_cfg.moe_facts()))
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


class TestParity(FamilyParityChecks):
    """The shared checks (tests/family_checks.py) on this family's cases."""

    FAMILY, CASES = "deepseek_v2", CASES
    IMPORT_CASE, ROUND_TRIP_CASE, FUSED_CASE = "lite", "v2_qlora_yarn_grouped", "v2_qlora_yarn_grouped"

    @pytest.fixture(params=list(CASES))
    def case(self, request):
        return request.param
