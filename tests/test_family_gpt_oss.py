"""GPT-OSS adapter: config, stacked-expert rules, MXFP4 import, bf16/fp32 export round trips, and
Megatron == HF transformers at every layout (sinks, sliding + full layers, YaRN, clamped SwiGLU,
biases on every linear)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GptOssConfig

from checkpoint_convert.hf_checkpoint import HFCheckpoint
from checkpoint_convert.mxfp4 import E2M1_VALUES, dequantize
from megatron_ec.models.family import Rule, get_family
from megatron_ec.parallel import shutdown_parallel
from tests.convert_testing import assert_bitwise_equal, disk_tensors, hf_state
from tests.family_checks import FamilyParityChecks
from tools.make_tiny_hf import make_tiny_hf, tiny_config
from tools.mxfp4_quantize import quantize, quantize_checkpoint

EXPERTS = "model.layers.{}.mlp.experts."


def gpt_oss_config(**overrides) -> GptOssConfig:
    """Tiny GPT-OSS: sliding then full layer (window 4 < SEQ 16), GQA 4/2, head_dim 24 (not
    hidden/heads), 6 experts top-2, vocab 250, YaRN factor 4 past 8 positions, truncate=False,
    a SwiGLU limit that clamps."""
    fields = dict(
        vocab_size=250, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_local_experts=6,
        num_experts_per_tok=2, max_position_embeddings=32, initializer_range=0.1,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 8},
        pad_token_id=None, eos_token_id=None,
    )
    fields.update(overrides)
    return GptOssConfig(**fields)


CASES = {
    "hub_layout": gpt_oss_config(),
    # three layers (full, sliding, sliding), top-3, window 3, another alpha, truncated YaRN
    "awkward": gpt_oss_config(
        num_hidden_layers=3, layer_types=["full_attention", "sliding_attention",
                                          "sliding_attention"],
        num_experts_per_tok=3, sliding_window=3, swiglu_alpha=1.3, head_dim=20,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                         "beta_fast": 8.0, "beta_slow": 1.0, "truncate": True,
                         "original_max_position_embeddings": 16}),
}


@pytest.fixture(scope="module", autouse=True)
def one_process():
    yield
    shutdown_parallel()


def test_model_config_fields():
    cfg = get_family("gpt_oss").to_model_config(gpt_oss_config())
    assert (cfg.score_function, cfg.linear_bias, cfg.attention_sinks) == ("softmax_topk", True, True)
    assert (cfg.sliding_window, cfg.sliding_layers) == (4, (0,))
    assert (cfg.clamped_swiglu.limit, cfg.clamped_swiglu.alpha) == (1.0, 1.702)
    assert (cfg.rope_scaling.factor, cfg.rope_scaling.truncate, cfg.kv_channels) == (4.0, False, 24)
    assert (cfg.num_experts, cfg.topk, cfg.moe_ffn_hidden_size, cfg.kv_heads) == (6, 2, 32, 2)


def test_hf_config_round_trip():
    family = get_family("gpt_oss")
    original = gpt_oss_config().to_dict()
    assert family.to_hf_config(family.to_model_config(gpt_oss_config()), original) == original


@pytest.mark.parametrize("setting, message", [
    ({"attention_bias": False}, "attention_bias"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
])
def test_unsupported_settings_raise(setting, message):
    with pytest.raises(ValueError, match=message):
        get_family("gpt_oss").to_model_config(gpt_oss_config(**setting))


def test_stacked_rule_needs_expert_in_megatron_name_only():
    with pytest.raises(ValueError, match="stacked_experts"):
        Rule("decoder.layers.{layer}.mlp.router.weight", ("x.{layer}",), stacked_experts=True)


# ---------------------------------------------------------------------------------------------
# MXFP4: our dequantisation == transformers'; import dequantises; export writes bf16.
# ---------------------------------------------------------------------------------------------


def test_dequantize_equals_transformers_on_every_code_and_scale():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), generator=gen, dtype=torch.uint8)
    blocks[0, 0, 0] = torch.arange(16, dtype=torch.uint8) * 17  # every code, both nibbles
    scales = torch.randint(100, 150, (3, 5, 2), generator=gen, dtype=torch.uint8)
    scales[0, 0] = torch.tensor([1, 254], dtype=torch.uint8)  # near both ends of the range
    for dtype in (torch.bfloat16, torch.float32):
        ours, theirs = dequantize(blocks, scales, dtype), convert_moe_packed_tensors(
            blocks, scales, dtype=dtype)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert set(dequantize(blocks[:1, :1, :1], torch.full((1, 1, 1), 127, dtype=torch.uint8)
                          ).flatten().tolist()) == set(E2M1_VALUES)


def test_quantizer_is_exact_on_the_fp4_grid():
    gen = torch.Generator().manual_seed(1)
    codes = torch.tensor(E2M1_VALUES)[torch.randint(0, 16, (2, 64, 8), generator=gen)]
    codes[:, 0] = 6.0  # every block reaches the top of the range: scale 2**exponent exactly
    w = codes * 2.0 ** torch.randint(-3, 4, (2, 1, 8), generator=gen)
    assert torch.equal(dequantize(*quantize(w), torch.float32), w)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return quantize_checkpoint(make_tiny_hf("gpt_oss", root / "bf16", dtype="bf16"), root / "mx")


def test_checkpoint_reads_mxfp4_as_dequantised_tensors(mxfp4_dir):
    from safetensors.torch import load_file

    disk = load_file(mxfp4_dir / "model.safetensors")
    ckpt = HFCheckpoint(mxfp4_dir, get_family("gpt_oss"))
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    for proj in ("gate_up_proj", "down_proj"):
        name = EXPERTS.format(1) + proj
        assert f"{name}_blocks" in disk and name not in disk
        want = convert_moe_packed_tensors(disk[f"{name}_blocks"], disk[f"{name}_scales"])
        assert ckpt.shape(name) == tuple(want.shape) and torch.equal(ckpt.read(name), want)
        assert torch.equal(ckpt.read(name, 0, 2, 4), want[2:4])  # one rank's experts only


def test_mxfp4_import_exports_transformers_dequantisation(mxfp4_dir, tmp_path):
    """import (dequantise) -> export (bf16) == the state transformers loads with
    Mxfp4Config(dequantize=True), bitwise; export carries no quantization_config."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from checkpoint_convert.exporter import export_hf
    from checkpoint_convert.importer import import_hf

    import_hf(mxfp4_dir, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(
        mxfp4_dir, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    want = {k: v.detach() for k, v in hf.state_dict().items()}
    assert_bitwise_equal(disk_tensors(tmp_path / "out"), want)
    assert "quantization_config" not in json.loads((tmp_path / "out/config.json").read_text())


def test_bf16_checkpoint_exports_bitwise(tmp_path):
    from checkpoint_convert.exporter import export_hf
    from checkpoint_convert.importer import import_hf

    hf_dir = make_tiny_hf("gpt_oss", tmp_path / "hf", dtype="bf16")
    import_hf(hf_dir, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert_bitwise_equal(disk_tensors(tmp_path / "out"), disk_tensors(hf_dir))
    assert_bitwise_equal(hf_state(tmp_path / "out"), hf_state(hf_dir))


class TestParity(FamilyParityChecks):
    """The shared checks (tests/family_checks.py): logits and gradients at TP1/EP1, TP2/EP1,
    TP1/EP2, TP2/EP2, resharding, converter import at every layout, fp32 export bitwise."""

    FAMILY, CASES = "gpt_oss", CASES
    # GPT-OSS has one on-disk layout (stacked experts); "fused" saves write the same tensors
    IMPORT_CASE, ROUND_TRIP_CASE, FUSED_CASE = "awkward", "hub_layout", "awkward"

    @pytest.fixture(params=list(CASES))
    def case(self, request):
        return request.param


def test_tiny_tool_config_is_the_hub_layout():
    assert tiny_config("gpt_oss").layer_types == ["sliding_attention", "full_attention"]
