"""The faster local backend (`train.attention_backend=sdpa`, `train.optimizer_impl=foreach`)
equals the current path (unfused attention, per-tensor AdamW) in fp32 and loads its checkpoints.

Oracle: the same model built with the current path, same weights, same batch. Batches cover the
causal mask with padding (`tests/tiny.tiny_batch`) and packed rows (block-diagonal causal masks
from `data.batch.attention_mask_from_segments`); models cover GQA with qkv bias, per-head
QK-norm, and MLA (different key and value widths). The TP2 layout check runs the sdpa model at
TP2 (sequence parallel, one kv head per rank) against the unfused TP1 model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_ec.data.batch import attention_mask_from_segments
from megatron_ec.models.builder import RuntimeOptions
from megatron_ec.models.config import MLAConfig
from megatron_ec.parallel import ParallelConfig, init_parallel
from megatron_ec.training.config import TrainConfig
from tests.harness import run_on_ranks
from tests.tiny import SEQ, build_tiny, forward_loss, tiny_batch, tiny_config
from tests.tolerance import FP32_LAYOUT, assert_all_close_scaled, assert_close_scaled

MODELS = {
    "gqa_qkv_bias": tiny_config(),
    "qk_norm": tiny_config(qk_norm="per_head", qkv_bias=False),
    "mla": tiny_config(num_kv_heads=None, qkv_bias=False, dense_layers=(),
                       mla=MLAConfig(q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16,
                                     qk_rope_head_dim=8, v_head_dim=12)),
}


def packed_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Row 0: samples of 6 and 7 tokens then 3 padding; row 1: one 16-token sample."""
    batch = tiny_batch(seed)
    segments = torch.tensor([[0] * 6 + [1] * 7 + [-1] * 3, [0] * SEQ])
    positions = torch.cat([torch.arange(6), torch.arange(7), torch.zeros(3, dtype=torch.long)])
    batch.update(attention_mask=attention_mask_from_segments(segments),
                 padding_mask=segments < 0, loss_mask=(segments >= 0).float(),
                 position_ids=torch.stack([positions, torch.arange(SEQ)]))
    return batch


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _pair(model_cfg):
    """(unfused model, sdpa model holding the unfused one's weights)."""
    init_parallel(ParallelConfig(), seed=7)
    unfused, _ = build_tiny(ParallelConfig(), model_cfg, RuntimeOptions(seq_length=SEQ))
    sdpa, _ = build_tiny(ParallelConfig(), model_cfg,
                         RuntimeOptions(seq_length=SEQ, attention_backend="sdpa"))
    sdpa.load_state_dict(unfused.state_dict(), strict=True)
    return unfused, sdpa


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sdpa_equals_unfused(name):
    from megatron_ec.models.attention import MLASDPAttention, SDPAttention

    unfused, sdpa = _pair(MODELS[name])
    core = sdpa.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, MLASDPAttention if name == "mla" else SDPAttention)
    for what, batch in (("causal+padding", tiny_batch()), ("packed", packed_batch())):
        ref_loss, ref_grads = _loss_and_grads(unfused, batch)
        loss, grads = _loss_and_grads(sdpa, batch)
        assert grads.keys() == ref_grads.keys()
        assert_close_scaled(loss, ref_loss, FP32_LAYOUT, f"{name} {what} loss")
        assert_all_close_scaled(grads, ref_grads, FP32_LAYOUT, f"{name} {what} grads")


def test_sdpa_respects_the_packed_mask():
    """A packed row's second sample gives the same outputs as that sample alone in its row:
    the block-diagonal mask is applied, not just causality (the logits would differ)."""
    _, sdpa = _pair(MODELS["gqa_qkv_bias"])
    batch = packed_batch()
    tokens = batch["tokens"][:1]
    alone = tokens.clone()
    alone[0, :7] = tokens[0, 6:13]
    segments = torch.tensor([[0] * 7 + [-1] * 9])
    with torch.no_grad():
        packed_logits = sdpa(tokens, batch["position_ids"][:1], batch["attention_mask"][:1])
        alone_logits = sdpa(alone, torch.cat([torch.arange(7), torch.zeros(9, dtype=torch.long)])
                            [None], attention_mask_from_segments(segments))
    assert_close_scaled(packed_logits[0, 6:13], alone_logits[0, :7], FP32_LAYOUT, "packed")
    assert not torch.allclose(packed_logits[0, 6:13], packed_logits[0, :7], atol=1e-3)


def test_sdpa_same_checkpoint_keys():
    unfused, sdpa = _pair(MODELS["gqa_qkv_bias"])
    assert unfused.state_dict().keys() == sdpa.state_dict().keys()
    ref, got = unfused.sharded_state_dict(), sdpa.sharded_state_dict()
    assert ref.keys() == got.keys()
    assert {k: v.key for k, v in ref.items() if hasattr(v, "key")} == \
        {k: v.key for k, v in got.items() if hasattr(v, "key")}


def test_sdpa_refuses_attention_sinks():
    init_parallel(ParallelConfig(), seed=7)
    cfg = tiny_config(attention_sinks=True, qkv_bias=False, linear_bias=True)
    from megatron_ec.models.family import get_family

    with pytest.raises(ValueError, match="attention_backend=sdpa does not support attention sinks"):
        from megatron_ec.models.assembly import assemble_model
        from megatron_ec.moe.methods import make_method

        assemble_model(cfg, make_method("sft"), ParallelConfig(),
                       RuntimeOptions(seq_length=SEQ, attention_backend="sdpa"),
                       family=get_family("gpt_oss"))


@pytest.mark.parametrize("key,value", [("attention_backend", "flash"),
                                       ("optimizer_impl", "fused")])
def test_bad_backend_keys(key, value):
    with pytest.raises(ValueError, match=f"train.{key}={value!r}"):
        TrainConfig(**{key: value})


def _adamw_steps(impl: str, steps: int = 3):
    from megatron_ec.training.distributed import finalize_grads, wrap_ddp
    from megatron_ec.training.optimizer import TorchAdamW

    init_parallel(ParallelConfig(), seed=11)
    model, tcfg = build_tiny(ParallelConfig())
    ddp = wrap_ddp(model, tcfg)
    optimizer = TorchAdamW(model, TrainConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5,
                                              optimizer_impl=impl))
    norms = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        forward_loss(ddp, tiny_batch(step)).backward()
        finalize_grads(ddp)
        norms.append(optimizer.step())
    state = optimizer.inner.state_dict()
    return dict(model.named_parameters()), norms, state


def test_foreach_adamw_equals_loop():
    ref_params, ref_norms, ref_state = _adamw_steps("loop")
    params, norms, state = _adamw_steps("foreach")
    assert_close_scaled(torch.tensor(norms), torch.tensor(ref_norms), FP32_LAYOUT, "grad norms")
    assert_all_close_scaled({n: p.detach() for n, p in params.items()},
                            {n: p.detach() for n, p in ref_params.items()}, FP32_LAYOUT,
                            "parameters after 3 AdamW steps")
    assert state["state"].keys() == ref_state["state"].keys()
    for index, moments in ref_state["state"].items():
        assert moments.keys() == state["state"][index].keys()
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_scaled(state["state"][index][key], moments[key], FP32_LAYOUT,
                                f"param {index} {key}")


def _tp2_worker(tmp_dir):
    """Rank 0: {(backend, batch): (loss, full grads)} for unfused TP1 and sdpa TP2."""
    import torch.distributed as dist

    from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
    from megatron_ec.models.layout import full_tensors
    from megatron_ec.training.distributed import finalize_grads, wrap_ddp

    results = {}
    for backend, tp in (("unfused", 1), ("sdpa", 2)):
        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        init_parallel(parallel, seed=5)
        model, tcfg = build_tiny(parallel, runtime=RuntimeOptions(seq_length=SEQ,
                                                                  attention_backend=backend))
        (save_model_weights if tp == 1 else load_model_weights)(model, f"{tmp_dir}/ckpt")
        ddp = wrap_ddp(model, tcfg)
        for what, batch in (("padding", tiny_batch()), ("packed", packed_batch())):
            ddp.zero_grad_buffer()
            loss = forward_loss(ddp, batch)
            loss.backward()
            finalize_grads(ddp)
            grads = full_tensors(model, lambda p: p.main_grad)  # views of the buffer at TP1
            results[(backend, what)] = (loss.detach(),
                                        {n: g.clone() for n, g in grads.items()})
    return results if dist.get_rank() == 0 else None


def test_sdpa_tp2_matches_unfused_tp1(tmp_path):
    results = run_on_ranks(_tp2_worker, 2, args=(str(tmp_path),), timeout=180)[0]
    for what in ("padding", "packed"):
        ref_loss, ref_grads = results[("unfused", what)]
        loss, grads = results[("sdpa", what)]
        assert_close_scaled(loss, ref_loss, FP32_LAYOUT, f"TP2 sdpa {what} loss")
        assert grads.keys() == ref_grads.keys()
        assert_all_close_scaled(grads, ref_grads, FP32_LAYOUT, f"TP2 sdpa {what} grads")


def test_runtime_options_reject_unknown_backend():
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        dataclasses.replace(RuntimeOptions(), attention_backend="flash")
