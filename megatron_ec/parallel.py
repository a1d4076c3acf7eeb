"""Process groups from torchrun's environment: TP, EP and expert-TP, gloo on CPU, NCCL on GPU.

`init_parallel()` checks the layout against the world size before any collective runs, so a
mistyped layout fails at once with a fix-it message instead of hanging ranks.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ec.compat import apply_cpu_compat, patch_sync_save_queue


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout of one run (recipe section `parallel`)."""

    tensor_model_parallel_size: int = 1
    """TP: attention/dense weights split over this many ranks (sequence parallel on when > 1)."""
    expert_model_parallel_size: int = 1
    """EP: routed experts distributed over this many ranks; must divide the expert count."""
    expert_tensor_parallel_size: int = 1
    """ETP: each expert's weights split over this many ranks (1 = experts are not TP-split)."""
    token_dispatcher: str = "alltoall"
    """Megatron-Core token dispatcher: "alltoall" or "allgather" ("flex" on GPU, untested here)."""

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "expert_model_parallel_size",
                     "expert_tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.token_dispatcher not in ("alltoall", "allgather", "flex"):
            raise ValueError(
                f"parallel.token_dispatcher={self.token_dispatcher!r}: use alltoall, allgather or flex"
            )

    @property
    def sequence_parallel(self) -> bool:
        return self.tensor_model_parallel_size > 1


def check_layout(world_size: int, cfg: ParallelConfig) -> None:
    """Raise `ValueError` unless `world_size` factors into the requested layout."""
    tp, ep, etp = (cfg.tensor_model_parallel_size, cfg.expert_model_parallel_size,
                   cfg.expert_tensor_parallel_size)
    if world_size % tp:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size={tp}; "
            f"launch a multiple of {tp} ranks or change parallel.tensor_model_parallel_size"
        )
    if world_size % (ep * etp):
        raise ValueError(
            f"world size {world_size} is not divisible by expert_model_parallel_size x "
            f"expert_tensor_parallel_size = {ep} x {etp}; launch a multiple of {ep * etp} ranks "
            "or change parallel.expert_model_parallel_size"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """torchrun's environment when present; otherwise a world of one on a free local port.

    The single-process case passes the rendezvous explicitly instead of writing MASTER_PORT and
    friends into os.environ, so that subprocesses started later do not inherit a port that this
    process still holds.
    """
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{_free_port()}")


COLLECTIVE_TIMEOUT_ENV = "MEGATRON_EC_COLLECTIVE_TIMEOUT"
"""Seconds a collective may wait for a peer before it fails (default 1800, torch's own); the
launcher sets it (`COLLECTIVE_TIMEOUT`, default 600) so that a lost node ends the others' run."""


def collective_timeout_minutes() -> int:
    """The collective timeout from `MEGATRON_EC_COLLECTIVE_TIMEOUT` (seconds), in whole minutes."""
    text = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "1800")
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}={text!r} must be a number of seconds") from None
    return max(1, math.ceil(seconds / 60))


def init_parallel(cfg: ParallelConfig, seed: int, timeout_minutes: int | None = None) -> None:
    """Initialise torch.distributed and Megatron-Core's parallel state from the environment.

    Args:
        cfg: the parallel layout.
        seed: base seed; Megatron derives the TP/EP streams from it.
        timeout_minutes: collective timeout; None = `collective_timeout_minutes()`.
    """
    if timeout_minutes is None:
        timeout_minutes = collective_timeout_minutes()
    from megatron.core import parallel_state, tensor_parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world_size, cfg)
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        apply_cpu_compat()
    patch_sync_save_queue()  # no manager process to outlive a killed trainer
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group("nccl" if use_cuda else "gloo",
                            datetime.timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown_parallel() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def collective_device(group=None) -> torch.device:
    """Where a tensor handed to a collective over `group` must live: the current CUDA device
    under NCCL (which refuses CPU tensors), the CPU under gloo or without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
