"""The fine-tuning config: one small dataclass per recipe section.

    model:    ModelSection     where the run starts (a checkpoint from import or a previous phase)
    data:     DataConfig       megatron_ec.data: files, format, template, seq_length, packing
    train:    TrainConfig      batch sizes, optimizer, schedule, precision, seed
    parallel: ParallelConfig   megatron_ec.parallel: TP, EP, ETP, dispatcher
    method:   MethodConfig     megatron_ec.moe.methods: one config class per method (by name)
    output:   OutputConfig     run directory, checkpoint interval, logging

A recipe file may add `phases:` (a list of per-phase overrides, see `megatron_ec.recipe`) and
`pipeline:` (paths for the launcher: HF model to import, export directory, evaluation).
Defaults follow the paper's App. C (AdamW, lr 1e-5, cosine to 0.1 x lr, warmup 10%, global batch 32,
seed 1234) where it states them, and TRL's defaults (the reference code's trainer) where it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_ec.data import DataConfig
from megatron_ec.moe.methods import MethodConfig
from megatron_ec.moe.methods.sft import SFTConfig
from megatron_ec.parallel import ParallelConfig


@dataclass(frozen=True)
class ModelSection:
    """Where a run starts (recipe section `model`)."""

    checkpoint: str
    """A megatron_ec checkpoint: the directory written by `checkpoint_convert import`, or a
    previous phase's `output.dir` (its `latest` iteration is used), or one `iter_N` directory.
    Weights, bias, method state and tokenizer come from it; its optimizer state never does: a run
    resumes with optimizer state only from its own `output.dir`."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one phase (recipe section `train`)."""

    max_steps: int | None = None
    """Optimizer steps of this phase; None = `epochs` passes over the training data."""
    epochs: float = 1.0
    """Passes over the data when `max_steps` is None (the reference recipe: 1 epoch per phase)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all ranks = micro_batch_size x data-parallel size x
    gradient-accumulation steps (paper App. C: 32). Must divide evenly."""
    lr: float = 1e-5
    """Peak learning rate (paper App. C: 1e-5)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr x min_lr_ratio (paper: cosine_with_min_lr, 0.1)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with a linear warmup (paper: 0.1)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices (TRL default 0.0; biases and norms never decay)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (torch/TRL default)."""
    adam_beta2: float = 0.999
    """AdamW beta2 (torch/TRL default)."""
    adam_eps: float = 1e-8
    """AdamW epsilon (torch/TRL default)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (over all TP/EP shards) to this; 0 = off (TRL default 1.0)."""
    seed: int = 1234
    """Seeds torch and Megatron's model-parallel RNG streams (paper: 1234); the data order has
    its own `data.seed`."""
    precision: str = "fp32"
    """"fp32" (CPU and GPU), "bf16" or "fp8" (GPU only: Float16Module + Megatron's optimizer with
    fp32 master weights; FP8 GEMMs through Transformer Engine)."""
    recompute: str = "none"
    """Activation recompute: "none", "selective" (MoE layers) or "full"."""
    attention_backend: str = "unfused"
    """Core attention of the local (non-Transformer-Engine) backend: "unfused" (Megatron-Core's
    DotProductAttention: baddbmm, masked softmax, bmm) or "sdpa" (torch's
    scaled_dot_product_attention with the same causal and packed-sample mask; fused kernels,
    ~2x faster attention on CPU, equal in fp32, same checkpoints; refused with attention sinks or
    sliding windows, i.e. GPT-OSS). Transformer Engine layers (GPU) use TE's own attention."""
    optimizer_impl: str = "loop"
    """torch AdamW's implementation on CPU: "loop" (one parameter at a time; bitwise
    reproducible whatever the parameter grouping) or "foreach" (multi-tensor kernels, one pass
    per update term over all parameters). Both equal in fp32 up to rounding, same optimizer state.
    GPU runs use Megatron's optimizer and ignore it."""
    eval_interval: int | None = None
    """Validate on `data.valid` every this many optimizer steps; None or 0 = only at the end of
    the phase (the end is always validated when `data.valid` is set). Logged as `valid_loss`
    (token-weighted over every validation sequence) and `valid_tokens`; evaluation never moves
    the bias and never counts usage."""

    def __post_init__(self) -> None:
        positive = {"micro_batch_size": self.micro_batch_size,
                    "global_batch_size": self.global_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"train.{name}={value} must be >= 1")
        if self.eval_interval is not None and self.eval_interval < 0:
            raise ValueError(f"train.eval_interval={self.eval_interval} must be >= 0 "
                             "(null or 0 = validate only at the end)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be >= 1 (or null = epochs)")
        if not self.epochs > 0:
            raise ValueError(f"train.epochs={self.epochs} must be > 0")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("train.clip_grad and train.weight_decay must be >= 0")
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise ValueError(f"train.precision={self.precision!r}: use fp32, bf16 or fp8")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"train.recompute={self.recompute!r}: use none, selective or full")
        if self.attention_backend not in ("unfused", "sdpa"):
            raise ValueError(f"train.attention_backend={self.attention_backend!r}: use unfused "
                             "or sdpa")
        if self.optimizer_impl not in ("foreach", "loop"):
            raise ValueError(f"train.optimizer_impl={self.optimizer_impl!r}: use foreach or loop")

    def accumulation_steps(self, dp_size: int) -> int:
        """Micro-batches per optimizer step on each rank; ValueError unless the sizes divide."""
        per_micro = self.micro_batch_size * dp_size
        if self.global_batch_size % per_micro:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp_size}; "
                f"use e.g. train.global_batch_size={per_micro * max(1, round(self.global_batch_size / per_micro))}"
            )
        return self.global_batch_size // per_micro

    def total_steps(self, num_sequences: int) -> int:
        """Optimizer steps of the phase for a dataset of `num_sequences` training rows."""
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = num_sequences // self.global_batch_size
        if per_epoch == 0:
            raise ValueError(
                f"the training data has {num_sequences} sequences, fewer than one global batch of "
                f"{self.global_batch_size}; add data or lower train.global_batch_size"
            )
        return max(1, math.floor(per_epoch * self.epochs))


@dataclass(frozen=True)
class OutputConfig:
    """Where a phase writes (recipe section `output`)."""

    dir: str
    """Run directory: checkpoints (`latest`, `iter_N/` in the `megatron_ec.models.ckpt_dir`
    layout), `metrics.jsonl`, `tensorboard/`, `config.yaml`. A run whose `dir` already holds a
    checkpoint resumes from it (optimizer, scheduler, RNG and data position included)."""
    save_interval: int = 0
    """Save a checkpoint every this many steps; 0 = only at the end (the end is always saved)."""
    keep_last: int = 0
    """Keep only this many newest checkpoints; 0 = keep all."""
    tensorboard: bool = True
    """Write TensorBoard event files under `dir/tensorboard` (rank 0)."""
    log_interval: int = 10
    """Progress line every this many steps when stderr is not a terminal (a terminal gets a bar
    redrawn every step); also the interval of `expert_grad_norms`."""
    expert_grad_norms: bool = True
    """Every `log_interval` steps (and the last), write each routed expert's FFN gradient norm
    to `dir/expert_grad_norms.jsonl` (paper Fig. 6; `megatron_ec.training.expert_grad_norms`).
    Cheap: one pass over the expert gradients and one small all-reduce per logged step."""

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("output.dir must be a directory path")
        if self.save_interval < 0 or self.keep_last < 0 or self.log_interval < 1:
            raise ValueError("output.save_interval/keep_last must be >= 0, log_interval >= 1")


@dataclass(frozen=True)
class FinetuneConfig:
    """One phase of fine-tuning: everything `python -m megatron_ec.finetune` reads."""

    model: ModelSection
    data: DataConfig
    output: OutputConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    method: MethodConfig = field(default_factory=SFTConfig)
    """The `method:` section; its `name` picks the method's config class (the registry in
    `megatron_ec.moe.methods`), and keys of other methods are errors."""

    def __post_init__(self) -> None:
        from megatron_ec.moe.spec_losses import check_layout

        self.method.check_for_training()
        check_layout(self.method.spec_losses, self.parallel.tensor_model_parallel_size,
                     self.parallel.expert_model_parallel_size, self.train.recompute,
                     self.parallel.token_dispatcher, self.parallel.expert_tensor_parallel_size)


def describe(cfg: Any) -> str:
    """A short one-line summary for logs."""
    return (f"method={cfg.method.name} steps={cfg.train.max_steps or f'{cfg.train.epochs} epoch'} "
            f"lr={cfg.train.lr:g} gbs={cfg.train.global_batch_size} "
            f"TP{cfg.parallel.tensor_model_parallel_size}/EP{cfg.parallel.expert_model_parallel_size}")
