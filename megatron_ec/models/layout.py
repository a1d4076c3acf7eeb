"""Layout-independent views of a sharded Megatron model.

`full_tensors()` gathers a model's parameters (or their gradients) from any TP/EP/ETP layout into
the tensors a TP1/EP1 model would hold, keyed by TP1/EP1 names (global expert ids). It is how tests
compare layouts and how small models are exported in memory. It all-gathers everything on every
rank, so it is meant for models that fit in one process's memory.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.distributed as dist

_SEQUENTIAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def is_expert_param(name: str) -> bool:
    """Routed-expert parameters (SequentialMLP or TE grouped GEMM naming)."""
    return bool(_SEQUENTIAL_EXPERT.search(name) or _GROUPED_EXPERT.search(name))


def global_expert_name(name: str, expert_offset: int) -> str:
    """Rewrite a local expert index into its global id in SequentialMLP naming."""
    match = _SEQUENTIAL_EXPERT.search(name)
    if match:
        gid = expert_offset + int(match.group(1))
        return name[: match.start()] + f".experts.local_experts.{gid}." + name[match.end():]
    match = _GROUPED_EXPERT.search(name)
    if match:
        gid = expert_offset + int(match.group(3))
        return name[: match.start()] + f".experts.local_experts.{gid}.{match.group(1)}.{match.group(2)}"
    return name


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def _unshard(name: str, param: torch.nn.Parameter, tensor: torch.Tensor, group,
             gated: bool) -> torch.Tensor:
    """Concatenate TP shards; gated fc1 shards hold [gate_i; up_i] and are regrouped."""
    if not getattr(param, "tensor_model_parallel", False) or dist.get_world_size(group) == 1:
        return tensor
    pieces = _all_gather(tensor, group)
    dim = param.partition_dim
    if gated and re.search(r"linear_fc1\.(weight|bias)\d*$", name):
        halves = [piece.chunk(2, dim=dim) for piece in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(pieces, dim=dim)


def full_tensors(model: torch.nn.Module, select: Callable[[torch.nn.Parameter], torch.Tensor]
                 = lambda p: p.detach(), gated: bool = True) -> dict[str, torch.Tensor]:
    """Gather `select(param)` for every parameter into TP1/EP1 tensors on every rank.

    Args:
        model: the (unwrapped) Megatron model on this rank.
        select: what to gather per parameter, e.g. `lambda p: p.main_grad` for gradients.
        gated: the MLPs are gated (SwiGLU): fc1 shards are [gate; up] halves.

    Returns:
        {TP1/EP1 parameter name: full fp32 tensor}.
    """
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    etp_group = ps.get_expert_tensor_parallel_group()
    ep_group = ps.get_expert_model_parallel_group()
    ep_size = ps.get_expert_model_parallel_world_size()
    dense, experts = {}, {}
    for name, param in model.named_parameters():
        name = name.removeprefix("module.")
        tensor = select(param).float()
        if is_expert_param(name):
            experts[name] = _unshard(name, param, tensor, etp_group, gated)
        else:
            dense[name] = _unshard(name, param, tensor, tp_group, gated)
    per_rank = [None] * ep_size
    dist.all_gather_object(per_rank, experts, group=ep_group)
    num_local = _num_local_experts(experts)
    for rank, rank_experts in enumerate(per_rank):
        for name, tensor in rank_experts.items():
            dense[global_expert_name(name, rank * num_local)] = tensor
    return dict(sorted(dense.items()))


def _num_local_experts(expert_tensors: dict[str, torch.Tensor]) -> int:
    ids = set()
    for name in expert_tensors:
        match = _SEQUENTIAL_EXPERT.search(name) or _GROUPED_EXPERT.search(name)
        ids.add(int(match.group(1) if match.re is _SEQUENTIAL_EXPERT else match.group(3)))
    return len(ids)


def _shard(name: str, param: torch.nn.Parameter, full: torch.Tensor, rank: int, size: int,
           gated: bool) -> torch.Tensor:
    """This rank's TP slice of a full tensor (the inverse of `_unshard`)."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if gated and re.search(r"linear_fc1\.(weight|bias)\d*$", name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def local_expert_offset(model: torch.nn.Module) -> int:
    """Global id of this rank's first routed expert (experts are placed contiguously per EP rank)."""
    from megatron.core import parallel_state as ps

    names = [n.removeprefix("module.") for n, _ in model.named_parameters() if is_expert_param(n)]
    return ps.get_expert_model_parallel_rank() * _num_local_experts(dict.fromkeys(names))


def load_full_tensors(model: torch.nn.Module, full: dict[str, torch.Tensor],
                      gated: bool = True, strict: bool = True) -> None:
    """Copy TP1/EP1 tensors (names as `full_tensors` returns them) into this rank's slices.

    Args:
        model: the (unwrapped) Megatron model on this rank.
        full: {TP1/EP1 parameter name: full tensor}; extra entries are ignored unless `strict`.
        gated: the MLPs are gated (SwiGLU).
        strict: every parameter of the model must be present in `full`.
    """
    from megatron.core import parallel_state as ps

    offset = local_expert_offset(model)
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    for name, param in model.named_parameters():
        name = name.removeprefix("module.")
        expert = is_expert_param(name)
        key = global_expert_name(name, offset) if expert else name
        if key not in full:
            if strict:
                raise KeyError(f"no tensor for Megatron parameter {key}")
            continue
        rank, size = etp if expert else tp
        piece = _shard(name, param, full[key], rank, size, gated)
        if piece.shape != param.shape:
            raise ValueError(f"{key}: shard shape {tuple(piece.shape)} != parameter {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(piece.to(param.dtype))
