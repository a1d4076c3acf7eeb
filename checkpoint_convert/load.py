"""HF tensors -> this rank's Megatron parameters, strictly.

Before anything is read: every HF tensor is mapped by a rule or ignored by the family, every rule
finds its tensors, and every HF shape equals the shape the rule derives from the Megatron model
(all ranks check all names and shapes, from file headers only, so they fail alike). Then each rank
reads only its own slices: its experts, and its TP piece of every split tensor, and of a tensor
replicated over ranks only the replica it saves (`saved_storages`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from checkpoint_convert.errors import ConversionError
from checkpoint_convert.hf_checkpoint import HFCheckpoint
from checkpoint_convert.mapping import Entry, expand, megatron_name, shape_key
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family
from megatron_ec.models.layout import _shard, is_expert_param, local_expert_offset

_FIX_CONFIG = "use the config.json these weights were saved with"


@dataclass
class RankParam:
    """A parameter of this rank and its tensor-parallel coordinates."""

    param: torch.nn.Parameter
    rank: int
    size: int

    @property
    def split(self) -> bool:
        return self.size > 1 and getattr(self.param, "tensor_model_parallel", False)

    @property
    def full_shape(self) -> tuple[int, ...]:
        shape = list(self.param.shape)
        if self.split:
            shape[self.param.partition_dim] *= self.size
        return tuple(shape)


def rank_params(model: torch.nn.Module) -> dict[str, RankParam]:
    """This rank's parameters by TP1/EP1 name, with their TP (experts: expert-TP) coordinates."""
    from megatron.core import parallel_state as ps

    offset = local_expert_offset(model)
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    params = {}
    for name, param in model.named_parameters():
        rank, size = etp if is_expert_param(name) else tp
        params[megatron_name(name, offset)] = RankParam(param, rank, size)
    return params


def check_names(ckpt: HFCheckpoint, entries: list[Entry], family: Family) -> None:
    """Every HF tensor mapped or ignored, every mapped tensor present."""
    expected = {name for entry in entries for name in entry.hf}
    ignored = [re.compile(p) for p in family.ignored_hf_keys]
    present = set(ckpt.names())
    unexpected = sorted(n for n in present - expected if not any(p.fullmatch(n) for p in ignored))
    missing = sorted(expected - present)
    if missing:
        raise ConversionError(f"{ckpt.hf_dir}[{missing[0]}]",
                              f"missing tensor{_more(missing)}",
                              f"copy every shard of the checkpoint, or {_FIX_CONFIG}")
    if unexpected:
        raise ConversionError(ckpt.where(unexpected[0]), f"unexpected tensor{_more(unexpected)}",
                              f"the weights are not a {family.model_type} model with this "
                              f"config.json; {_FIX_CONFIG}")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def expected_hf_shapes(entry: Entry, full_shape: tuple[int, ...], cfg: MoEModelConfig
                       ) -> list[tuple[int, ...]]:
    """HF shapes the rule derives from a TP1/EP1 Megatron shape (computed on the meta device)."""
    outputs = entry.rule.to_hf(torch.empty(full_shape, device="meta"), cfg)
    if len(outputs) != len(entry.hf):
        raise RuntimeError(f"rule for {entry.megatron}: to_hf returned {len(outputs)} tensors "
                           f"for {len(entry.hf)} HF names")
    shapes = [tuple(t.shape) for t in outputs]
    if entry.rule.pads_vocab:
        shapes = [(cfg.vocab_size, *shape[1:]) for shape in shapes]
    if entry.rule.stacked_experts:
        shapes = [(cfg.num_experts, *shape) for shape in shapes]
    return shapes


def check_shapes(ckpt: HFCheckpoint, entries: list[Entry], params: dict[str, RankParam],
                 cfg: MoEModelConfig) -> None:
    """Every rule's HF tensors have the shapes the Megatron model needs."""
    full_shapes = {shape_key(name): p.full_shape for name, p in params.items()}
    for entry in entries:
        if shape_key(entry.megatron) not in full_shapes:
            raise RuntimeError(f"family rule names {entry.megatron}, which the Megatron model "
                               "does not have")
        wanted = expected_hf_shapes(entry, full_shapes[shape_key(entry.megatron)], cfg)
        for name, shape in zip(entry.hf, wanted):
            if ckpt.shape(name) != shape:
                raise ConversionError(ckpt.where(name), f"shape {list(ckpt.shape(name))} but the "
                                      f"model needs {list(shape)}", _FIX_CONFIG)


def _read_piece(ckpt: HFCheckpoint, name: str, entry: Entry, p: RankParam,
                cfg: MoEModelConfig) -> torch.Tensor:
    """This rank's TP piece of one HF tensor (vocab rows zero-padded to the padded size)."""
    dim = p.param.partition_dim
    length = cfg.padded_vocab_size if entry.rule.pads_vocab else ckpt.shape(name)[dim]
    if length % p.size:
        raise ConversionError(ckpt.where(name), f"dim {dim} of size {length} does not split "
                              f"into {p.size} tensor-parallel pieces", "choose another --tp")
    step = length // p.size
    return ckpt.read(name, dim, p.rank * step, (p.rank + 1) * step)


def _read_whole(ckpt: HFCheckpoint, name: str, entry: Entry, cfg: MoEModelConfig):
    if entry.rule.pads_vocab:
        return ckpt.read(name, 0, 0, cfg.padded_vocab_size)
    return ckpt.read(name)


def read_param(ckpt: HFCheckpoint, entry: Entry, name: str, p: RankParam,
               cfg: MoEModelConfig) -> torch.Tensor:
    """The value of this rank's slice of Megatron parameter `name`, read from the HF tensors."""
    if entry.rule.stacked_experts:  # this expert's row of every HF tensor, whole
        rows = [ckpt.read(hf, 0, entry.expert, entry.expert + 1)[0] for hf in entry.hf]
        full = entry.rule.to_megatron(rows, cfg)
        return _shard(name, p.param, full, p.rank, p.size, gated=True) if p.split else full
    if p.split and entry.rule.shardable:
        pieces = [_read_piece(ckpt, hf, entry, p, cfg) for hf in entry.hf]
        return entry.rule.to_megatron(pieces, cfg)
    full = entry.rule.to_megatron([_read_whole(ckpt, hf, entry, cfg) for hf in entry.hf], cfg)
    return _shard(name, p.param, full, p.rank, p.size, gated=True) if p.split else full


def saved_storages(model: torch.nn.Module) -> set[int] | None:
    """Storage addresses of the parameters this rank's torch_dist save writes; None: all.

    The save writes each replicated tensor (attention, embeddings, shared experts under EP or
    data parallelism) from its main replica only (`TorchDistSaveShardedStrategy`,
    `keep_only_main_replica=True`), so the other replicas need not be read: across ranks every
    HF byte is read once. Megatron-Core checks at save time that every tensor has its writer.
    """
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
        is_main_replica,
    )

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return {value.data.untyped_storage().data_ptr()
            for value in nested_values(model.sharded_state_dict())
            if isinstance(value, (ShardedTensor, ShardedTensorFactory))
            and isinstance(value.data, torch.Tensor) and is_main_replica(value.replica_id)}


def load_hf(model: torch.nn.Module, family: Family, cfg: MoEModelConfig,
            ckpt: HFCheckpoint) -> None:
    """Check the whole mapping, then fill the parameters this rank saves from `ckpt` (the
    replicas another rank saves are zeroed, not read)."""
    entries = expand(family, cfg)
    check_names(ckpt, entries, family)
    params = rank_params(model)
    check_shapes(ckpt, entries, params, cfg)
    by_name = {entry.megatron: entry for entry in entries}
    saved = saved_storages(model)
    for name, p in params.items():
        if name not in by_name:
            raise RuntimeError(f"family {family.model_type} has no rule for Megatron parameter "
                               f"{name}")
        if saved is not None and p.param.untyped_storage().data_ptr() not in saved:
            with torch.no_grad():
                p.param.zero_()
            continue
        value = read_param(ckpt, by_name[name], name, p, cfg)
        if tuple(value.shape) != tuple(p.param.shape):
            raise RuntimeError(f"{name}: rule produced {tuple(value.shape)}, parameter is "
                               f"{tuple(p.param.shape)} (a to_megatron that does not commute "
                               "with TP slicing must set shardable=False)")
        _assign(p.param, value)


def _assign(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """`param.copy_(value)`, or, when `value` is a fresh tensor of the parameter's dtype that
    owns exactly its storage (what `HFCheckpoint.read` returns), adopt its storage: the bytes
    just read become the parameter without a second pass over them."""
    fresh = (value.dtype == param.dtype and value.device == param.device
             and value.is_contiguous() and value.storage_offset() == 0
             and value.untyped_storage().nbytes() == value.numel() * value.element_size())
    with torch.no_grad():
        if fresh:
            param.data = value
        else:
            param.copy_(value)
