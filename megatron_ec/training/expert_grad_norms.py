"""Per-expert FFN gradient norms at logged steps (paper section 6.2, Fig. 6).

At every `output.log_interval`-th step (and the last), after `finalize_grads` and before the
optimizer, the L2 norm of each routed expert's FFN gradient (fc1 and fc2, weights and biases,
of the FULL expert) is written by rank 0 as one line of `expert_grad_norms.jsonl` beside
`metrics.jsonl`: `{"step", "phase", "norms": {layer: [E norms]}, "condensers": {layer: ids}}`
(an expert with no trainable tensor, e.g. one ESFT froze, is `null`). Switch:
`output.expert_grad_norms` (default on; the cost is one pass over the expert gradients, one
all-reduce of [2, L, E] float64 and one host read, at logged steps only).

Each rank sums the squares of the gradient elements only it holds, so that one SUM all-reduce
over every rank gives each full expert's squared norm:
- expert-tensor-parallel shards (fc1 rows, fc2 columns) on every ETP rank; tensors replicated
  over ETP (a row-parallel fc2 bias) on ETP rank 0 only;
- without the distributed optimizer the reduced gradients are identical on every expert-data-
  parallel rank: counted on EDP rank 0 only; with it each EDP rank holds the reduced values of
  its shard of each gradient bucket only (the rest of `main_grad` is stale): each rank counts the
  part of every expert tensor inside its own shard;
- expert-parallel ranks own disjoint experts, placed at their global ids
  (`MoELayer.local_expert_indices`).
Tensors: SequentialMLP's `local_experts[i]` (CPU), TEGroupedMLP's `linear_fc*.weight<i>` /
`bias<i>`, and legacy GroupedMLP's stacked `weight1 [H, E_local * 2F]` / `weight2
[E_local * F, H]` (split per expert).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ec.parallel import collective_device
from megatron_ec.training.metrics import truncate_after

log = logging.getLogger(__name__)

EXPERT_GRAD_NORMS_FILE = "expert_grad_norms.jsonl"
_INDEXED = re.compile(r"^linear_fc[12]\.(?:weight|bias)(\d+)$")
_STACKED_DIM = {"weight1": 1, "weight2": 0}


@dataclass
class ExpertTensor:
    """One expert tensor of this rank and the global experts its elements belong to."""

    row: int
    """Index of its MoE layer in `ExpertGradNorms.layers`."""
    param: torch.nn.Parameter
    expert_ids: list[int]
    """Global ids of the local experts the tensor holds (one, or E_local stacked)."""
    stacked_dim: int | None = None
    """None: the whole tensor is `expert_ids[0]`; else the dim the experts are stacked along."""
    owned: tuple[int, int] | None = None
    """Flat element range [a, b) whose reduced gradient this rank holds (None: none)."""

    def squares_E(self, num_experts: int, device: torch.device) -> torch.Tensor:
        """fp64 [E] sums of squared owned gradient elements, per global expert."""
        out = torch.zeros(num_experts, dtype=torch.float64, device=device)
        grad = getattr(self.param, "main_grad", None)
        if self.owned is None or grad is None:
            return out
        start, end = self.owned
        flat = grad.reshape(-1)[start:end].double().pow(2)
        ids = torch.as_tensor(self.expert_ids, dtype=torch.long, device=flat.device)
        if self.stacked_dim is None:
            local = torch.zeros_like(flat, dtype=torch.long)
        else:
            # The element's coordinate along the stacked dim (2-D tensors), then its block.
            index = torch.arange(start, end, device=flat.device)
            columns = self.param.shape[1]
            along = index % columns if self.stacked_dim == 1 else index // columns
            local = along // (self.param.shape[self.stacked_dim] // len(self.expert_ids))
        per_expert = torch.zeros(num_experts, dtype=torch.float64, device=flat.device)
        per_expert.index_add_(0, ids[local], flat)
        return out + per_expert.to(device)


def _moe_layers(model: torch.nn.Module) -> list:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    return sorted(layers, key=lambda m: m.router.layer_number)


def _expert_tensors(row: int, layer) -> list[ExpertTensor]:
    """Every expert tensor of one MoE layer on this rank (trainable ones only)."""
    experts, global_ids = layer.experts, list(layer.local_expert_indices)
    found = []
    if getattr(experts, "local_experts", None) is not None:  # SequentialMLP
        for local, module in enumerate(experts.local_experts):
            found += [ExpertTensor(row, p, [global_ids[local]]) for p in module.parameters()]
    else:
        for name, param in experts.named_parameters():
            match = _INDEXED.match(name)
            if name in _STACKED_DIM:
                found.append(ExpertTensor(row, param, global_ids, _STACKED_DIM[name]))
            elif match:
                found.append(ExpertTensor(row, param, [global_ids[int(match.group(1))]]))
            else:
                raise NotImplementedError(f"expert_grad_norms: cannot tell which expert owns "
                                          f"{type(experts).__name__}.{name}; set "
                                          "output.expert_grad_norms=false")
    return [t for t in found if t.param.requires_grad]


def _distributed_shards(ddp) -> dict[torch.nn.Parameter, tuple[int, int] | None]:
    """{param: flat range of it inside this rank's shard of its bucket} (distributed optimizer)."""
    owned = {}
    for group in list(ddp.bucket_groups) + list(ddp.expert_parallel_bucket_groups):
        size, rank = (group.intra_distributed_optimizer_instance_size,
                      group.intra_distributed_optimizer_instance_rank)
        for bucket in group.buckets:
            shard = bucket.grad_data.numel() // size
            low, high = rank * shard, (rank + 1) * shard
            for param, (start, end) in bucket.param_to_index.items():
                a, b = max(start, low), min(end, high)
                owned[param] = (a - start, b - start) if a < b else None
    return owned


class ExpertGradNorms:
    """Computes and writes the per-expert gradient norms of a DDP-wrapped GPTModel."""

    def __init__(self, ddp, model: torch.nn.Module, out_dir: Path, write: bool,
                 log_interval: int = 1, total_steps: int | None = None):
        from megatron.core import parallel_state as ps

        self.path = Path(out_dir) / EXPERT_GRAD_NORMS_FILE
        self.write_enabled = write
        self.log_interval, self.total_steps = log_interval, total_steps
        layers = _moe_layers(model)
        self.layers = [layer.router.layer_number - 1 for layer in layers]
        self.num_experts = max((layer.config.num_moe_experts for layer in layers), default=0)
        self.condensers = _condensers(model)
        self.tensors = [t for row, layer in enumerate(layers) for t in _expert_tensors(row, layer)]
        config = getattr(ddp, "ddp_config", None)
        if config is not None and config.use_distributed_optimizer:
            assert config.num_distributed_optimizer_instances == 1, "one optimizer instance"
            shards = _distributed_shards(ddp)
            for tensor in self.tensors:
                tensor.owned = shards.get(tensor.param)
        else:
            first_edp = ps.get_expert_data_parallel_rank() == 0
            for tensor in self.tensors:
                tensor.owned = (0, tensor.param.numel()) if first_edp else None
        etp_rank = ps.get_expert_tensor_parallel_rank()
        for tensor in self.tensors:
            if not getattr(tensor.param, "tensor_model_parallel", False) and etp_rank != 0:
                tensor.owned = None  # replicated over ETP: ETP rank 0 counts it

    def norms(self) -> dict[int, list[float | None]]:
        """{layer: [norm of each global expert]} (collective: every rank calls it)."""
        device = collective_device()
        sums = torch.zeros(2, len(self.layers), self.num_experts, dtype=torch.float64,
                           device=device)  # [squares, trainable tensors]
        for tensor in self.tensors:
            sums[0, tensor.row] += tensor.squares_E(self.num_experts, device)
            sums[1, tensor.row, tensor.expert_ids] += 1.0
        dist.all_reduce(sums)
        squares, trainable = sums.cpu().unbind(0)  # the one host read
        return {layer: [float(s) ** 0.5 if t > 0 else None
                        for s, t in zip(squares[row].tolist(), trainable[row].tolist())]
                for row, layer in enumerate(self.layers)}

    @classmethod
    def for_phase(cls, ddp, model, output_cfg, resume_step: int, total_steps: int,
                  rank0: bool) -> ExpertGradNorms | None:
        """The logger of one phase (None when `output.expert_grad_norms` is off); on resume,
        records after the resumed step (logged before a crash) are dropped."""
        if not output_cfg.expert_grad_norms:
            return None
        try:
            logger = cls(ddp, model, Path(output_cfg.dir), rank0, output_cfg.log_interval,
                         total_steps)
        except NotImplementedError as err:  # an experts module we cannot split: train on
            if rank0:
                log.warning("%s; no %s this run", err, EXPERT_GRAD_NORMS_FILE)
            return None
        if rank0:
            truncate_after(logger.path, resume_step)
        return logger

    def maybe_log(self, step: int, phase: str) -> None:
        """`log` at every `log_interval`-th step and the last (`step` is 1-based)."""
        if step % self.log_interval == 0 or step == self.total_steps:
            self.log(step, phase)

    def log(self, step: int, phase: str) -> None:
        """Compute (every rank) and append one record (rank 0)."""
        norms = self.norms()
        if not self.write_enabled:
            return
        record = {"step": step, "phase": phase, "norms": {str(k): v for k, v in norms.items()},
                  "condensers": {str(k): v for k, v in self.condensers.items()}}
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")


def _condensers(model: torch.nn.Module) -> dict[int, list[int]]:
    """{layer: condenser ids} of this phase's routers (fixed for the phase; read once)."""
    from megatron_ec.moe.state import ec_routers

    return {r.layer_index: [int(i) for i in r.condenser_ids.cpu().tolist()]
            for r in ec_routers(model) if r.condenser_ids.numel()}
