"""The train steps `train_bench.py` times: ours (Megatron-Core + a method) and HF transformers'.

Each builder returns a `Step`: a callable doing one optimizer step on a fixed batch, the tokens it
trains on, and counted facts (executed expert slots per token, saved expert activations). Our
step is the trainer's own (`training.loop.forward_backward`, `finalize_grads`, the method's
hooks, `TorchAdamW`); HF's is `Qwen2MoeForCausalLM` with its default attention and experts
implementations, loss from `labels`, and torch AdamW with the same hyper-parameters.

The reference code's approach (`shared/reference/REFERENCE_IMPLEMENTATIONS.md` s.1.4, Qwen): the
HF block runs its whole original forward, then routes again with the bias in the softmax, takes
k + r slots (top-k over all experts plus the r condensers), runs the experts again and overwrites
the first output in place; its bias moves once per forward by the sign rule. Written here from
that description (the reference repository is all-rights-reserved).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

METHOD_VARIANTS = {
    # variant: (method name, method config keys)
    "stock_router": ("sft", {}),
    "sft": ("sft", {}),
    "bias": ("bias", {"gamma": 1e-3}),
    "condenser_paper": ("condenser", {"condenser_mode": "paper", "num_condensers": 2}),
    "condenser_reference": ("condenser", {"condenser_mode": "reference", "num_condensers": 2}),
    "esft": ("esft", {"top_p": 0.5}),
    "densemixer": ("densemixer", {}),
}
HF_VARIANTS = ("hf", "hf_reference")
NUM_CONDENSERS = 2


@dataclass(frozen=True)
class Shapes:
    """The benchmarked model and batch (a mid Qwen2-MoE by default)."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    experts: int = 16
    topk: int = 4
    expert_ffn: int = 128
    shared_ffn: int = 512
    vocab: int = 8192
    seq: int = 512
    batch: int = 4

    def hf_config(self):
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.heads,
            intermediate_size=self.shared_ffn, moe_intermediate_size=self.expert_ffn,
            shared_expert_intermediate_size=self.shared_ffn, num_experts=self.experts,
            num_experts_per_tok=self.topk, norm_topk_prob=False, decoder_sparse_step=1,
            max_position_embeddings=max(self.seq, 64), tie_word_embeddings=False,
            use_cache=False)


@dataclass
class Step:
    """One optimizer step on a fixed batch, and what it counts."""

    run: Callable[[], None]
    tokens: int
    expert_slots_forward: float
    """Routed-expert MLPs run per token in one forward (k for top-k; DenseMixer E + k)."""
    expert_saved_rows: float
    """Expert-output rows of width hidden kept for the backward per token and layer."""
    info: dict = dataclasses.field(default_factory=dict)


def _batch(shapes: Shapes) -> dict[str, torch.Tensor]:
    """Random tokens, one sample per row, causal, no padding (the batch contract's keys)."""
    gen = torch.Generator().manual_seed(0)
    b, s = shapes.batch, shapes.seq
    tokens = torch.randint(0, shapes.vocab, (b, s), generator=gen)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1),
            "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).clone(),
            "attention_mask": causal[None, None].expand(b, 1, s, s).clone(),
            "padding_mask": torch.zeros(b, s, dtype=torch.bool)}


def _method(variant: str, shapes: Shapes):
    from megatron_ec.moe.methods import build_method, method_class

    name, keys = METHOD_VARIANTS[variant]
    if name == "condenser":  # fixed condensers: a fresh model has no phase-1 bias to pick from
        keys = {**keys, "condensers": {layer: list(range(NUM_CONDENSERS))
                                       for layer in range(shapes.layers)}}
    method = build_method(method_class(name).Config(name=name, **keys))
    if variant == "stock_router":
        method.router_builder = lambda facts: None  # the spec keeps Megatron-Core's TopKRouter
    return method


def _slots(variant: str, shapes: Shapes) -> tuple[float, float]:
    k, e = shapes.topk, shapes.experts
    if variant == "condenser_reference":
        return k + NUM_CONDENSERS, k + NUM_CONDENSERS
    if variant == "densemixer":
        return e + k, e + k  # all E under no_grad (their outputs kept for the router term)
    if variant == "hf_reference":
        return 2 * k + NUM_CONDENSERS, 2 * k + NUM_CONDENSERS
    return k, k


def ours(variant: str, shapes: Shapes, runtime_keys: dict, train_keys: dict,
         precision: str = "fp32") -> Step:
    """Our train step for a method variant (a world of one process, gloo)."""
    from megatron_ec.models.assembly import assemble_model
    from megatron_ec.models.builder import RuntimeOptions
    from megatron_ec.models.family import get_family
    from megatron_ec.moe.methods import PhaseStart, make_method
    from megatron_ec.parallel import ParallelConfig, init_parallel
    from megatron_ec.training.config import TrainConfig
    from megatron_ec.training.distributed import finalize_grads, wrap_ddp
    from megatron_ec.training.loop import forward_backward
    from megatron_ec.training.optimizer import build_optimizer

    parallel = ParallelConfig()
    init_parallel(parallel, seed=1234)
    family = get_family("qwen2_moe")
    model_cfg = family.to_model_config(shapes.hf_config())
    method = _method(variant, shapes)
    runtime = RuntimeOptions(seq_length=shapes.seq, precision=precision, **runtime_keys)
    model, tcfg = assemble_model(model_cfg, method, parallel, runtime, family=family)
    batch = _batch(shapes)
    cuda = torch.cuda.is_available()
    if cuda:  # as the trainer's build_model: built on the host, moved, then wrapped
        model.cuda(torch.cuda.current_device())
        batch = {key: value.cuda() for key, value in batch.items()}
    method.begin_phase(PhaseStart(model, make_method("sft"), resumed=False,
                                  micro_batches=lambda: [batch]))
    method.set_trainable(model)
    wrapped = model  # the method's hooks keep the GPTModel; DDP gets the bf16 wrapper
    if precision != "fp32":
        from megatron.core.transformer.module import Float16Module

        wrapped = Float16Module(tcfg, model)
    ddp = wrap_ddp(wrapped, tcfg, use_distributed_optimizer=cuda)
    optimizer = build_optimizer(ddp, TrainConfig(lr=1e-5, precision=precision, **train_keys))

    def run() -> None:
        ddp.zero_grad_buffer()
        forward_backward(ddp, [batch], method)
        finalize_grads(ddp)
        method.after_backward(model)
        optimizer.step()
        method.after_optimizer_step(model)

    forward, saved = _slots(variant, shapes)
    return Step(run, shapes.batch * shapes.seq, forward, saved,
                {"runtime": runtime_keys, "train": train_keys, "precision": precision})


class _ReferenceBlock(torch.nn.Module):
    """The reference code's Qwen block: the original forward, then a second routing with the
    bias and k + r slots whose result overwrites the first in place."""

    def __init__(self, block, gamma: float = 1e-3) -> None:
        super().__init__()
        self.block = block
        experts = block.gate.num_experts
        self.register_buffer("bias", torch.zeros(experts))
        self.register_buffer("condensers", torch.arange(NUM_CONDENSERS))
        self.gamma = gamma

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        first = self.block(hidden)
        b, s, h = hidden.shape
        flat = hidden.reshape(-1, h)
        logits = torch.nn.functional.linear(flat, self.block.gate.weight)
        probs = torch.softmax(logits.float() + self.bias, dim=-1)
        top, index = torch.topk(probs, self.block.gate.top_k, dim=-1)
        index = torch.cat([index, self.condensers.expand(flat.shape[0], -1)], dim=-1)
        weights = torch.cat([top, probs[:, self.condensers]], dim=-1).to(flat.dtype)
        routed = self.block.experts(flat, index, weights)
        shared = torch.sigmoid(self.block.shared_expert_gate(flat)) * self.block.shared_expert(flat)
        with torch.no_grad():  # anti-balancing sign rule on the soft usage
            usage = probs.sum(dim=0)
            self.bias += self.gamma * torch.sign(usage - usage.mean())
        return first.copy_((routed + shared).view(b, s, h))


def hf(variant: str, shapes: Shapes, device: str = "cpu", precision: str = "fp32") -> Step:
    """HF transformers' Qwen2-MoE train step (stock, or the reference code's double block)."""
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(1234)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = Qwen2MoeForCausalLM(shapes.hf_config()).to(device=device, dtype=dtype)
    model.train()
    if variant == "hf_reference":
        for layer in model.model.layers:
            layer.mlp = _ReferenceBlock(layer.mlp)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = _batch(shapes)["tokens"].to(device)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    forward, saved = _slots(variant, shapes)
    info = {"attn_implementation": model.config._attn_implementation,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    return Step(run, shapes.batch * shapes.seq, forward, saved, info)


def model_flops_per_token(shapes: Shapes) -> float:
    """Training FLOPs per token of the model as defined (top-k experts, 3 x forward).

    Matrix products only, 2 FLOPs per multiply-add: q/k/v/o projections, attention scores and
    values over the full sequence (no causal halving, Megatron's convention), router, k routed
    experts and the gated shared expert (SwiGLU: 3 matrices), the output layer. Every variant is
    charged the same model FLOPs, so FLOP/s compares like tokens/s; the extra work a method does
    (k + r slots, DenseMixer's dense experts) is in `expert_slots_forward`.
    """
    h, s, layers = shapes.hidden, shapes.seq, shapes.layers
    attention = 2 * h * 4 * h + 2 * 2 * s * h
    mlp = 2 * h * shapes.experts + shapes.topk * 2 * 3 * h * shapes.expert_ffn \
        + 2 * 3 * h * shapes.shared_ffn + 2 * h
    return 3.0 * (layers * (attention + mlp) + 2 * h * shapes.vocab)


def expert_flops_per_token(shapes: Shapes, slots: float) -> float:
    """Forward FLOPs per token and layer of `slots` routed-expert MLPs."""
    return slots * 2 * 3 * shapes.hidden * shapes.expert_ffn
