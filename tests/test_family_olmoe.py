"""OLMoE adapter: config and rule round trips, and Megatron == HF transformers at every layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, OlmoeConfig

from megatron_ec.models.family import get_family
from tests.convert_testing import (
    assert_bitwise_equal,
    disk_tensors,
    hf_logits,
    hf_state,
    random_tokens,
)
from tests.family_parity import (
    IMPORTED,
    LAYOUTS,
    RESHARDED,
    converter_round_trip,
    hf_reference,
    max_grad_rel_diff,
    max_logit_diff,
    parity_worker,
    roundtrip_mismatches,
    save_reference,
)
from tests.harness import run_on_ranks

LOGIT_TOL = 1e-4
GRAD_REL_TOL = 1e-4


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


# The converter's 4-rank import runs on IMPORT_CASE, its single-process round trip on the other.
IMPORT_CASE, ROUND_TRIP_CASE, FUSED_CASE = "renormalised", "hub_routing", "renormalised"


@pytest.fixture(scope="module")
def references():
    return {case: hf_reference(config) for case, config in CASES.items()}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """On-disk copies of the reference models: renormalised in transformers v5's fused layout."""
    root = tmp_path_factory.mktemp("olmoe_hf")
    return {case: save_reference(config, root / case, fused=case == FUSED_CASE)
            for case, config in CASES.items()}


@pytest.fixture(scope="module")
def layout_results(references, hf_dirs, tmp_path_factory):
    tokens = references["hub_routing"].tokens
    assert all(torch.equal(ref.tokens, tokens) for ref in references.values())
    configs = {case: (ref.model_cfg, ref.full) for case, ref in references.items()}
    ckpt_dir = str(tmp_path_factory.mktemp("olmoe_ckpt"))
    kwargs = {"ckpt_dir": ckpt_dir, "hf_dirs": {IMPORT_CASE: hf_dirs[IMPORT_CASE]}}
    return run_on_ranks(parity_worker, world_size=4, args=("olmoe", configs, tokens),
                        kwargs=kwargs, timeout=600)[0]


def test_model_config_fields():
    cfg = get_family("olmoe").to_model_config(olmoe_config())
    assert (cfg.qk_norm, cfg.score_function, cfg.norm_topk_prob) == ("full", "softmax", False)
    assert (cfg.num_kv_heads, cfg.num_experts, cfg.topk, cfg.moe_ffn_hidden_size) == (2, 6, 2, 32)
    assert cfg.shared_expert_size == 0 and cfg.dense_layers == ()


def test_family_imports_without_megatron_core():
    """The converter reads configs and weights before importing MCore (which, for one, widens
    torch.load's safe globals), so a family file must not import it."""
    code = "import sys, megatron_ec.models.olmoe; assert 'megatron.core' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_hf_config_round_trip():
    family = get_family("olmoe")
    original = olmoe_config().to_dict()
    assert family.to_hf_config(family.to_model_config(olmoe_config()), original) == original


@pytest.mark.parametrize("setting", [{"clip_qkv": 8.0}, {"attention_bias": True},
                                     {"hidden_act": "gelu"}])
def test_unsupported_settings_raise(setting):
    with pytest.raises(ValueError, match="olmoe: unsupported"):
        get_family("olmoe").to_model_config(olmoe_config(**setting))


@pytest.mark.parametrize("case", CASES)
def test_rules_round_trip_every_hf_tensor_bitwise(references, case):
    assert roundtrip_mismatches(references[case]) == []


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_mapped_tensors_cover_the_model_exactly(layout_results, case, layout):
    assert layout_results[(case, layout)].unmatched == []


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(references, layout_results, case, layout):
    diff = max_logit_diff(references[case], layout_results[(case, layout)].logits)
    assert diff <= LOGIT_TOL, f"{case} TP{layout[0]}/EP{layout[1]}: max |dlogit| = {diff:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_resharded_checkpoint_keeps_hf_logits(references, layout_results, case):
    diff = max_logit_diff(references[case], layout_results[(case, RESHARDED)])
    assert diff <= LOGIT_TOL, f"{case}: {RESHARDED}: max |dlogit| = {diff:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_hf(references, layout_results, case, layout):
    diffs = max_grad_rel_diff(references[case], layout_results[(case, layout)].grads)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= GRAD_REL_TOL, f"{case} {layout}: {worst} rel diff {diffs[worst]:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converter_import_matches_hf(references, layout_results, layout):
    """`checkpoint_convert` import (each rank reads its own slices) at every layout."""
    logits = layout_results[(IMPORT_CASE, layout, IMPORTED)]
    diff = max_logit_diff(references[IMPORT_CASE], logits)
    assert diff <= LOGIT_TOL, f"{IMPORT_CASE} imported at {layout}: max |dlogit| = {diff:.2e}"


def test_converter_round_trip(hf_dirs, tmp_path):
    """import -> verify -> export gives back the hub tensors bitwise and the same HF logits."""
    hf_dir = hf_dirs[ROUND_TRIP_CASE]
    result = converter_round_trip(hf_dir, tmp_path)
    assert result.verify_diff <= LOGIT_TOL
    if ROUND_TRIP_CASE != FUSED_CASE:  # the exporter writes the hub's per-expert layout
        assert_bitwise_equal(disk_tensors(result.exported), disk_tensors(hf_dir))
    assert_bitwise_equal(hf_state(result.exported), hf_state(hf_dir))
    assert AutoConfig.from_pretrained(result.exported).to_dict() | {"_name_or_path": ""} == \
        AutoConfig.from_pretrained(hf_dir).to_dict() | {"_name_or_path": ""}
    tokens = random_tokens()
    assert torch.equal(hf_logits(result.exported, tokens), hf_logits(hf_dir, tokens))
