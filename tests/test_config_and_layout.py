"""Model config validation, layout checks and the block spec's backend choices (single process)."""

from __future__ import annotations

import pytest

from megatron_ec.models.builder import RuntimeOptions, local_block_spec, transformer_config
from megatron_ec.moe.spec import inject_moe_submodules
from megatron_ec.parallel import ParallelConfig, check_layout
from tests.tiny import tiny_config


@pytest.mark.parametrize("world,tp,ep,message", [
    (3, 2, 1, "not divisible by tensor_model_parallel_size=2"),
    (2, 1, 4, "expert_model_parallel_size x expert_tensor_parallel_size = 4 x 1"),
    (6, 2, 4, "launch a multiple of 4 ranks"),
])
def test_layout_that_does_not_factor_is_refused(world, tp, ep, message):
    with pytest.raises(ValueError, match=message):
        check_layout(world, ParallelConfig(tensor_model_parallel_size=tp,
                                           expert_model_parallel_size=ep))


def test_layout_that_factors_passes():
    check_layout(4, ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2))


@pytest.mark.parametrize("overrides,message", [
    ({"topk": 7}, "topk"),
    ({"qk_norm": "sometimes"}, "qk_norm"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"dense_layers": (5,)}, "dense_layers"),
])
def test_bad_model_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_padded_vocab_is_layout_independent():
    assert tiny_config(vocab_size=250).padded_vocab_size == 256
    assert tiny_config(vocab_size=257).padded_vocab_size == 384


def test_runtime_options_refuse_unknown_values():
    with pytest.raises(ValueError, match="precision"):
        RuntimeOptions(precision="fp16")
    with pytest.raises(ValueError, match="fp8 needs Transformer Engine"):
        RuntimeOptions(precision="fp8")


def test_local_spec_and_router_injection():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_ec.compat import SequenceParallelTorchNorm

    tcfg = transformer_config(tiny_config(), ParallelConfig(tensor_model_parallel_size=2))
    assert tcfg.sequence_parallel and tcfg.moe_layer_freq == [0, 1, 1]
    spec = local_block_spec(tcfg)
    assert spec.layer_norm is SequenceParallelTorchNorm
    assert all(ls.submodules.input_layernorm is SequenceParallelTorchNorm for ls in spec.layer_specs)

    class MarkerRouter:  # only its identity matters here
        pass

    injected = inject_moe_submodules(spec, router=MarkerRouter)
    moe = [ls.submodules.mlp for ls in injected.layer_specs if getattr(ls.submodules.mlp, "func", None) is MoELayer]
    assert len(moe) == 2 and all(m.keywords["submodules"].router is MarkerRouter for m in moe)
    # the input spec is untouched, dense layers are unchanged
    assert all(m.keywords["submodules"].router is not MarkerRouter for m in
               [ls.submodules.mlp for ls in spec.layer_specs[1:]])
    assert injected.layer_specs[0].submodules.mlp is spec.layer_specs[0].submodules.mlp
