"""Trainer checkpoints in the shared layout (`megatron_ec.models.ckpt_dir`), saved atomically.

    OUTPUT/iter_0000120/
      weights/            torch_dist model state (weights + the fp32 selection bias), any layout
      model.json          copied from the starting checkpoint (family, model config, HF config)
      method_state.json   the run's method: config and decisions (`moe.methods.saved`)
      tokenizer/          copied from the starting checkpoint
      train_state/
        common.pt         step, schedule, data-sampler position, layout, config (rank 0)
        rank_00003.pt     per-rank RNG states (CPU, CUDA, Megatron's model-parallel tracker)
        optimizer/        torch_dist optimizer state aligned with the weights' shards, any layout

A checkpoint resumes at any TP/EP/ETP layout and world size: weights and optimizer state are
resharded on load, the step, schedule and sampler position are global. The per-rank RNG states
are restored only at the saved layout (elsewhere each rank keeps this run's seeded streams; the
trainer's models have no dropout, so no number depends on them). Train states of earlier versions
(`optimizer_rankNNNNN.pt` per rank instead of `optimizer/`) resume at their own layout only.

Everything is written into `.iter_N.partial/` and published with one rename plus an atomic
`latest` swap, so a crash at any point of a save leaves the previous checkpoint loadable. Saving
and loading are collective (every rank calls them).

Fault injection for tests: MEGATRON_EC_FAULT=kill_in_save:N makes every rank SIGKILL itself while
saving step N, after the weights are on disk and before publishing; MEGATRON_EC_FAULT=
kill_after_step:N kills after step N's metrics are logged.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_ec.models import ckpt_dir
from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
from megatron_ec.moe.methods import Method
from megatron_ec.moe.methods.saved import save_method
from megatron_ec.training.optimizer import has_per_rank_state

logger = logging.getLogger(__name__)

COMMON = "common.pt"
FAULT_ENV = "MEGATRON_EC_FAULT"


def maybe_fault(point: str, step: int) -> None:
    """SIGKILL this process if MEGATRON_EC_FAULT names `point:step` (a test hook)."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainState:
    """What a resumed run needs besides weights and optimizer state (identical on every rank)."""

    step: int
    """Optimizer steps completed."""
    sampler: dict
    """`BatchSampler.state_dict()` (the position is global, the same on every data-parallel rank)."""
    layout: dict
    """World size and TP/EP/ETP of the run that saved it."""
    schedule: dict
    """The schedule's parameters, to warn when a resume changes them."""
    tokens: int = 0
    """Loss tokens consumed so far (for logs)."""


def current_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(),
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size()}


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank_file() -> str:
    return f"rank_{dist.get_rank():05d}.pt"


def save_checkpoint(root: Path, train_state: TrainState, model, optimizer, method: Method,
                    source: Path) -> Path:
    """Write `root/iter_<step>` (collective) and return it.

    Args:
        root: the run's output directory.
        train_state: step, sampler position, layout, schedule.
        model: the unwrapped GPTModel.
        optimizer: the `megatron_ec.training.optimizer.Optimizer` of the run.
        method: the run's method (config and decisions are saved).
        source: the iteration directory the run started from (model.json, tokenizer).
    """
    step = train_state.step
    stage = ckpt_dir.staging_dir(root, step)
    if dist.get_rank() == 0:
        if stage.exists():
            shutil.rmtree(stage)  # left by a crash during an earlier save of this step
        (stage / ckpt_dir.TRAIN_STATE).mkdir(parents=True)
    dist.barrier()
    save_model_weights(model, stage / ckpt_dir.WEIGHTS)
    state_dir = stage / ckpt_dir.TRAIN_STATE
    optimizer.save(state_dir, model)
    torch.save(_rng_state(), state_dir / _rank_file())
    if dist.get_rank() == 0:
        torch.save(vars(train_state), state_dir / COMMON)
        _copy_metadata(source, stage, method)
    dist.barrier()
    maybe_fault("kill_in_save", step)
    if dist.get_rank() == 0:
        final = ckpt_dir.publish(root, step)
    dist.barrier()
    return Path(root) / ckpt_dir.iteration_name(step) if dist.get_rank() else final


def _copy_metadata(source: Path, stage: Path, method: Method) -> None:
    shutil.copy2(source / ckpt_dir.MODEL_META, stage / ckpt_dir.MODEL_META)
    tokenizer = source / ckpt_dir.TOKENIZER
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, stage / ckpt_dir.TOKENIZER)
    save_method(stage, method)


def remove_partial_saves(root: Path) -> None:
    """Delete staging directories left by saves that were killed (rank 0)."""
    if dist.get_rank() == 0:
        for partial in Path(root).glob(".iter_*.partial"):
            shutil.rmtree(partial, ignore_errors=True)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` published iterations (rank 0; 0 = keep all)."""
    if keep_last <= 0 or dist.get_rank() != 0:
        return
    latest = ckpt_dir.latest_iteration(root)
    iterations = sorted(p for p in Path(root).glob("iter_*") if p.is_dir())
    for old in iterations[:-keep_last]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def load_weights(model, iteration: Path) -> None:
    """Model weights and selection bias from an iteration directory (any saved layout)."""
    load_model_weights(model, iteration / ckpt_dir.WEIGHTS)


def has_train_state(iteration: Path) -> bool:
    return (iteration / ckpt_dir.TRAIN_STATE / COMMON).is_file()


def saved_step(iteration: Path) -> int:
    """The step a trainer checkpoint was saved at (read without loading anything else)."""
    return int(torch.load(iteration / ckpt_dir.TRAIN_STATE / COMMON, weights_only=False)["step"])


def load_train_state(iteration: Path, model, optimizer) -> TrainState:
    """Optimizer state (resharded to this layout), RNG states and the common train state
    (collective).

    Raises:
        ValueError: the checkpoint is of an earlier version (per-rank optimizer files) and was
            saved at another parallel layout.
    """
    state_dir = iteration / ckpt_dir.TRAIN_STATE
    common = TrainState(**torch.load(state_dir / COMMON, weights_only=False))
    same_layout = common.layout == current_layout()
    if not same_layout and has_per_rank_state(state_dir):
        raise ValueError(
            f"{iteration} was saved at {_layout_text(common.layout)} by an earlier version, with "
            f"per-rank optimizer state, but this run is {_layout_text(current_layout())}; resume "
            f"it with the saved layout (its next checkpoint can then resume at any layout), or "
            f"start a new output.dir with model.checkpoint={iteration} (weights and bias kept, "
            f"fresh optimizer)"
        )
    optimizer.load(state_dir, model)
    if same_layout:
        _set_rng_state(torch.load(state_dir / _rank_file(), weights_only=False))
    elif dist.get_rank() == 0:
        logger.info("resuming a %s checkpoint at %s: optimizer state resharded, RNG streams "
                    "of this run kept", _layout_text(common.layout), _layout_text(current_layout()))
    return common


def _layout_text(layout: dict) -> str:
    return (f"{layout['world_size']} ranks TP{layout['tensor_model_parallel_size']}/"
            f"EP{layout['expert_model_parallel_size']}/ETP{layout['expert_tensor_parallel_size']}")
