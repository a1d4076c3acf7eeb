"""One fine-tuning phase: build the model from a checkpoint, train, log, checkpoint, resume.

Loss: the mean of the per-token cross entropy over every loss-mask token of the GLOBAL batch (all
micro-batches of the step on all data-parallel ranks), i.e. token-weighted, as if the global batch
were one forward pass. Each rank first counts the step's loss tokens (one all-reduce over the
data-parallel group), then back-propagates sum(loss x mask) x dp_size / global_tokens per
micro-batch; Megatron DDP averages gradients over data-parallel ranks, which cancels the dp_size.
Micro-batches with few answer tokens therefore weigh less than in a mean of per-micro-batch means.

Per optimizer step, in order: lr from the schedule; micro-batch forward/backward (gradient
accumulation); `finalize_grads` (DP/EP reduction, sequence-parallel grads); optimizer (global-norm
clipping + AdamW); the method's once-per-step bias update (`method.after_optimizer_step`);
validation on `data.valid` every `train.eval_interval` steps and at the end (`training.validation`:
no gradient, no usage, no bias change); metrics; checkpoint every `output.save_interval` steps and
at the end.

The method object (`megatron_ec.moe.methods`) is asked at each of its hooks: the model is
assembled with its router and experts, `begin_phase` makes or keeps its decisions once the
weights are loaded, `set_trainable` freezes before the DDP wrap, `micro_batch_loss` adds to each
micro-batch's loss, `after_backward` runs after `finalize_grads` (gradient masks),
`after_optimizer_step` after the update, and `metrics` joins each step's record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ec.models import ckpt_dir
from megatron_ec.models.assembly import assemble_model
from megatron_ec.models.builder import RuntimeOptions
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.moe.methods import Method, PhaseStart, build_method
from megatron_ec.moe.methods.saved import load_method
from megatron_ec.parallel import collective_device
from megatron_ec.training import checkpoint, validation
from megatron_ec.training.config import FinetuneConfig
from megatron_ec.training.distributed import finalize_grads, micro_batch_losses, unwrap, wrap_ddp
from megatron_ec.training.expert_grad_norms import ExpertGradNorms
from megatron_ec.training.metrics import MetricsWriter
from megatron_ec.training.optimizer import build_optimizer
from megatron_ec.training.progress import Progress
from megatron_ec.training.schedule import WarmupCosine

logger = logging.getLogger(__name__)


@dataclass
class StartPoint:
    """Where a phase starts: the source checkpoint, and this run's own latest (when resuming)."""

    source: Path
    """The iteration directory of `model.checkpoint` (model.json, tokenizer, weights)."""
    model_cfg: MoEModelConfig
    family: str
    source_method: Method
    resume: Path | None
    """This run's latest iteration in `output.dir` with a train state, or None (fresh start)."""


@dataclass
class PhaseResult:
    """What a finished phase reports."""

    steps: int
    first_loss: float | None
    last_loss: float | None
    checkpoint: Path


def build_model(start: StartPoint, cfg: FinetuneConfig, method: Method):
    """This rank's GPTModel with the method's router (Float16Module-wrapped unless fp32)."""
    from megatron_ec.models.family import get_family

    runtime = RuntimeOptions(precision=cfg.train.precision, recompute=cfg.train.recompute,
                             seq_length=cfg.data.seq_length,
                             attention_backend=cfg.train.attention_backend)
    family = get_family(start.family) if start.family else None
    model, tcfg = assemble_model(start.model_cfg, method, cfg.parallel, runtime, family=family)
    if torch.cuda.is_available():  # built on the host (use_cpu_initialization): as get_model
        model.cuda(torch.cuda.current_device())
    if cfg.train.precision != "fp32":
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tcfg, model)
    return model, tcfg


def _dp_sum(values: list[float | torch.Tensor]) -> list[float]:
    """Sums over the data-parallel group, read back to the host in one copy.

    The tensor lives where the group's backend wants it (CUDA under NCCL, CPU under gloo).
    """
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    device = collective_device(group)
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                          for v in values])
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def _set_aux_loss_scale(accumulation: int) -> None:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / accumulation, device=device))


def forward_backward(ddp, micro_batches: list[dict[str, torch.Tensor]],
                     method: Method | None = None) -> dict[str, float]:
    """Accumulate one step's gradients; return the global token-weighted loss and token counts.

    `method.micro_batch_loss` (a mean per micro-batch) is added to each micro-batch's loss,
    divided by the number of micro-batches; it is not part of the reported loss.
    """
    from megatron.core import parallel_state as ps

    dp_size = ps.get_data_parallel_world_size()
    local_tokens = sum(float(b["loss_mask"].sum()) for b in micro_batches)
    local_real = sum(float((~b["padding_mask"]).sum()) for b in micro_batches)
    global_tokens, global_real = _dp_sum([local_tokens, local_real])
    scale = dp_size / max(global_tokens, 1.0)
    _set_aux_loss_scale(len(micro_batches))
    loss_sum = None  # on the device of the losses: no host read per micro-batch
    for batch in micro_batches:
        losses, loss_mask = micro_batch_losses(ddp, batch)
        micro_sum = (losses.float() * loss_mask).sum()
        loss = micro_sum * scale
        extra = method.micro_batch_loss(unwrap(ddp)) if method is not None else None
        if extra is not None:
            loss = loss + extra / len(micro_batches)
        loss.backward()
        micro = micro_sum.detach().double()
        loss_sum = micro if loss_sum is None else loss_sum + micro
    (global_loss_sum,) = _dp_sum([loss_sum if loss_sum is not None else 0.0])
    return {"loss": global_loss_sum / max(global_tokens, 1.0), "tokens": int(global_tokens),
            "real_tokens": int(global_real)}


class Phase:
    """A phase assembled on this rank: model, optimizer, schedule, sampler, method state."""

    def __init__(self, cfg: FinetuneConfig, start: StartPoint, dataset, valid_dataset=None):
        self.cfg, self.start = cfg, start
        self.valid_dataset = valid_dataset
        self.out = Path(cfg.output.dir)
        self.rank0 = dist.get_rank() == 0
        self.total = cfg.train.total_steps(len(dataset))
        saved_step = checkpoint.saved_step(start.resume) if start.resume else 0
        if saved_step > self.total:
            raise ValueError(f"{start.resume} is at step {saved_step}, beyond this run's "
                             f"{self.total} steps; raise train.max_steps or use a new output.dir")
        self.complete = saved_step == self.total
        if not self.complete:  # a finished phase is not rebuilt (re-running a recipe is cheap)
            self._assemble(dataset)

    def _assemble(self, dataset) -> None:
        from megatron.core import parallel_state as ps

        from megatron_ec.data import BatchSampler

        cfg, resume = self.cfg, self.start.resume
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._build_model(dataset, dp_rank, dp_size)
        # GPU: Megatron's distributed optimizer needs DDP's buffers laid out for it.
        self.ddp = wrap_ddp(self.ddp_model, self.tcfg,
                            use_distributed_optimizer=torch.cuda.is_available())
        self.optimizer = build_optimizer(self.ddp, cfg.train)
        self.sampler = BatchSampler(dataset, cfg.train.micro_batch_size, dp_rank, dp_size,
                                    seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                    global_batch_size=cfg.train.global_batch_size)
        self.accumulation = cfg.train.accumulation_steps(dp_size)
        t = cfg.train
        self.schedule = WarmupCosine.from_ratio(t.lr, self.total, t.warmup_ratio, t.min_lr_ratio)
        self.state = checkpoint.TrainState(step=0, sampler={}, layout=checkpoint.current_layout(),
                                           schedule=self.schedule.state_dict())
        if resume:
            self._resume(resume)

    def _build_model(self, dataset, dp_rank: int, dp_size: int) -> None:
        """The method (this run's saved one when resuming), its model, weights, decisions."""
        from megatron_ec.data import eval_micro_batches

        cfg, start, resume = self.cfg, self.start, self.start.resume
        self.method = load_method(resume) if resume else build_method(cfg.method)
        self.ddp_model, self.tcfg = build_model(start, cfg, self.method)
        self.model = unwrap(self.ddp_model)
        checkpoint.load_weights(self.model, resume or start.source)
        self.method.begin_phase(PhaseStart(
            self.model, start.source_method, resumed=resume is not None,
            micro_batches=lambda: eval_micro_batches(dataset, cfg.train.micro_batch_size,
                                                     dp_rank, dp_size),
            out_dir=str(self.out)))
        self.method.set_trainable(self.model)

    def _resume(self, resume: Path) -> None:
        saved = checkpoint.load_train_state(resume, self.model, self.optimizer)
        if saved.schedule != self.schedule.state_dict():
            logger.warning("resuming with a different schedule: saved %s, now %s",
                           saved.schedule, self.schedule.state_dict())
        self.sampler.load_state_dict(saved.sampler)
        saved.layout, saved.schedule = self.state.layout, self.schedule.state_dict()
        self.state = saved

    def run(self) -> PhaseResult:
        """Train to `total` steps from wherever the state is; checkpoint; return the losses."""
        if self.complete:
            if self.rank0:
                logger.info("%s: already complete (%d steps); nothing to do", self.out, self.total)
            return PhaseResult(0, None, None, self.out)
        cfg = self.cfg
        start_step = self.state.step
        checkpoint.remove_partial_saves(self.out)
        metrics = MetricsWriter(self.out, start_step, cfg.output.tensorboard, self.rank0)
        self.expert_norms = ExpertGradNorms.for_phase(self.ddp, self.model, cfg.output,
                                                      start_step, self.total, self.rank0)
        progress = Progress(self.method.name, self.total, start_step, cfg.output.log_interval,
                            enabled=self.rank0)
        if start_step:
            progress.message(f"[{self.method.name}] resuming {self.out} at step {start_step}")
        losses = []
        last_saved = start_step if self.start.resume else None
        self.ddp.train()
        for step in range(start_step, self.total):
            record = self._train_step(step)
            if self._should_validate(record["step"]):
                record.update(self.validate().record())
                progress.message(f"[{self.method.name}] step {record['step']}: valid_loss "
                                 f"{record['valid_loss']:.4f} ({record['valid_tokens']} tokens)")
            losses.append(record["loss"])
            metrics.write(record)
            progress.update(record["step"], loss=record["loss"], lr=record["lr"],
                            grad_norm=record["grad_norm"])
            checkpoint.maybe_fault("kill_after_step", record["step"])
            if self._should_save(record["step"]):
                self.save()
                last_saved = record["step"]
        if last_saved != self.total:
            self.save()
        metrics.close()
        return PhaseResult(self.total - start_step, losses[0] if losses else None,
                           losses[-1] if losses else None, self.out)

    def _should_save(self, step: int) -> bool:
        interval = self.cfg.output.save_interval
        return step == self.total or (interval > 0 and step % interval == 0)

    def _should_validate(self, step: int) -> bool:
        interval = self.cfg.train.eval_interval
        return self.valid_dataset is not None and (
            step == self.total or (bool(interval) and step % interval == 0))

    def validate(self) -> validation.ValidationResult:
        """The validation loss of the current weights (collective over data-parallel ranks)."""
        from megatron.core import parallel_state as ps

        return validation.evaluate(self.ddp, self.valid_dataset, self.cfg.train.micro_batch_size,
                                   ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                                   ps.get_data_parallel_group())

    def _train_step(self, step: int) -> dict:
        began = time.monotonic()
        lr = self.schedule(step)
        self.optimizer.set_lr(lr)
        self.ddp.zero_grad_buffer()
        micro_batches = [self.sampler.next_micro_batch() for _ in range(self.accumulation)]
        result = forward_backward(self.ddp, micro_batches, self.method)
        finalize_grads(self.ddp)
        self.method.after_backward(self.model)
        if getattr(self, "expert_norms", None) is not None:  # pre-clip, as grad_norm
            self.expert_norms.maybe_log(step + 1, self.method.name)
        grad_norm = self.optimizer.step()
        self.method.after_optimizer_step(self.model)
        elapsed = time.monotonic() - began
        self.state.step = step + 1
        self.state.tokens += result["tokens"]
        return {"step": step + 1, "phase": self.method.name, "loss": result["loss"], "lr": lr,
                "grad_norm": grad_norm, "tokens": result["tokens"],
                "tokens_per_s": result["real_tokens"] / max(elapsed, 1e-9),
                "step_time": elapsed, **self.method.metrics(self.model)}

    def save(self) -> Path:
        self.state.sampler = self.sampler.state_dict()
        path = checkpoint.save_checkpoint(self.out, self.state, self.model, self.optimizer,
                                          self.method, self.start.source)
        checkpoint.prune_checkpoints(self.out, self.cfg.output.keep_last)
        return path


def _check_output_dir(out: Path) -> None:
    """output.dir is a directory, or can be created as one (checked before anything runs)."""
    ancestor = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not ancestor.is_dir():
        what = "is not a directory" if ancestor == out else f"cannot be created: {ancestor} is a file"
        raise ValueError(f"output.dir={out} {what}; choose another output.dir")


def find_start(cfg: FinetuneConfig) -> StartPoint:
    """Resolve `model.checkpoint` and look for this run's own checkpoint in `output.dir`."""
    _check_output_dir(Path(cfg.output.dir))
    source = ckpt_dir.resolve(cfg.model.checkpoint)
    meta = ckpt_dir.read_model_meta(source)
    try:
        model_cfg = MoEModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{source / ckpt_dir.MODEL_META}: no usable model_config ({err})") from None
    resume = ckpt_dir.latest_iteration(cfg.output.dir) if Path(cfg.output.dir).exists() else None
    if resume is not None and not checkpoint.has_train_state(resume):
        raise ValueError(f"output.dir={cfg.output.dir} holds a checkpoint without a train state "
                         f"({resume.name}); choose an empty output.dir")
    return StartPoint(source=source, model_cfg=model_cfg, family=meta.get("family", ""),
                      source_method=load_method(source), resume=resume)
