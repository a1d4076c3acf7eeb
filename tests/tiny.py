"""Tiny models and batches shared by the tests (fp32, seq 16, well under 1 M parameters)."""

from __future__ import annotations

import torch

from megatron_ec.models.assembly import assemble_model
from megatron_ec.models.builder import RuntimeOptions
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.moe.methods import Method, make_method
from megatron_ec.parallel import ParallelConfig

SEQ = 16
BATCH = 2


def tiny_config(**overrides) -> MoEModelConfig:
    """GQA, a dense first layer, a gated shared expert, 6 experts (not a power of two... of 8)."""
    fields = dict(
        vocab_size=250, hidden_size=64, num_layers=3, num_attention_heads=4, num_kv_heads=2,
        num_experts=6, topk=2, moe_ffn_hidden_size=32, ffn_hidden_size=96, dense_layers=(0,),
        shared_expert_size=48, shared_expert_gate=True, qkv_bias=True,
        max_position_embeddings=64,
    )
    fields.update(overrides)
    return MoEModelConfig(**fields)


def build_tiny(parallel: ParallelConfig, model_cfg: MoEModelConfig | None = None,
               runtime: RuntimeOptions | None = None, method: Method | None = None):
    """(model, TransformerConfig) for this rank's slice of the tiny model (SFT by default)."""
    return assemble_model(model_cfg or tiny_config(), method or make_method("sft"), parallel,
                          runtime or RuntimeOptions(seq_length=SEQ))


def tiny_batch(seed: int = 0, vocab: int = 250) -> dict[str, torch.Tensor]:
    """A fixed batch: same on every rank, a causal mask, the last 3 tokens of row 1 are padding."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[1, -3:] = True
    loss_mask = (~padding).float()
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, dims=1),
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).clone(),
        "attention_mask": causal[None, None].expand(BATCH, 1, SEQ, SEQ).clone(),
        "loss_mask": loss_mask,
        "padding_mask": padding,
    }


def forward_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the unmasked tokens."""
    losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"], padding_mask=batch["padding_mask"])
    return (losses.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def start_phase(model, method: Method, source: Method | None = None) -> Method:
    """`method.begin_phase` on a model with loaded weights, starting from a checkpoint of
    `source` (default: a plain SFT import), not resumed."""
    from megatron_ec.moe.methods import PhaseStart

    method.begin_phase(PhaseStart(model, source or make_method("sft"), resumed=False))
    return method


def sgd_step(ddp, model, batch: dict[str, torch.Tensor], lr: float):
    """One plain SGD step on the DDP gradient: (loss, full TP1/EP1 gradients before the update)."""
    from megatron_ec.models.layout import full_tensors
    from megatron_ec.training.distributed import finalize_grads

    ddp.zero_grad_buffer()
    loss = forward_loss(ddp, batch)
    loss.backward()
    finalize_grads(ddp)
    grads = full_tensors(model, lambda p: p.main_grad)
    with torch.no_grad():
        for param in model.parameters():
            param -= lr * param.main_grad
    return loss, grads
