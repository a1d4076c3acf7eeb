"""Expert-parallel counters: all-to-all bytes and per-rank expert load, counted, never timed.

A forward pre-hook on each MoE layer's experts module reads what Megatron-Core's dispatcher
already computed for the forward in flight: `token_dispatcher.input_splits` (slots this rank
sends to each EP rank, the all-to-all's split sizes; absent without EP/TP or with the allgather
dispatcher) and the experts' own `tokens_per_expert` argument (rows this rank's experts compute).
Replicated condensers add their locally computed rows (`count_local_rows`). Only forwards that
build a graph count (as the router's usage does): eval and no-grad passes never, and under
activation recompute exactly one of the two passes.

Per step, `ep_metrics(model)` (every rank, one collective) reports, over all ranks:
    ep/a2a_bytes_max|mean        dispatch all-to-all bytes sent per rank (hidden states plus the
                                 fp32 gate weight of every slot, all splits including the slots a
                                 rank keeps; the combine returns the same volume, and the backward
                                 repeats both)
    ep/a2a_remote_bytes_max|mean the same, only the slots sent to other EP ranks
    ep/tokens_received_max|mean  (token, expert) rows the dispatcher delivered to a rank's experts
    ep/expert_rows_max|mean      rows a rank's experts compute: received plus replicated condensers
    ep/placeholders_max|mean     placeholder slots a rank's experts received (from every sender)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_FIELDS = ("a2a_bytes", "a2a_remote_bytes", "tokens_received", "expert_rows")


def _moe_layers(model: torch.nn.Module) -> list:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


class LayerCounts:
    """One MoE layer's counts since the last `ep_metrics`: host floats for what is known on the
    host (the split sizes, the local rows), a tensor where the experts' row counts live (no host
    read in the forward)."""

    def __init__(self) -> None:
        self.sent = 0.0
        self.remote = 0.0
        self.local_rows = 0.0
        self.received: torch.Tensor | None = None

    def add_received(self, tokens_per_expert) -> None:
        # MCore hands the experts a tensor (host or device): summed where it lives.
        rows = tokens_per_expert.sum(dtype=torch.float64)
        self.received = rows if self.received is None else self.received + rows


def _counting() -> bool:
    return torch.is_grad_enabled()


def _count_dispatch(layer, args) -> None:
    if not (layer.training and _counting()):
        return
    dispatched, tokens_per_expert, probs = args[0], args[1], args[2]
    counts: LayerCounts = layer.ep_counts
    splits = getattr(layer.token_dispatcher, "input_splits", None)
    if splits is not None:
        # Host values already: numpy after MCore's own device-to-host copy (its all-to-all needs
        # them on the host), or a host tensor on CPU.
        splits = [float(v) for v in splits.tolist()]
        slot_bytes = dispatched.shape[-1] * dispatched.element_size() + probs.element_size()
        ep_rank = layer.local_expert_indices[0] // layer.num_local_experts
        counts.sent += sum(splits) * slot_bytes
        counts.remote += (sum(splits) - splits[ep_rank]) * slot_bytes
    counts.add_received(tokens_per_expert)


def install_ep_counters(model: torch.nn.Module) -> None:
    """Attach a `LayerCounts` and the counting hook to every MoE layer of `model` (idempotent)."""
    for layer in _moe_layers(model):
        if hasattr(layer, "ep_counts"):
            continue
        layer.ep_counts = LayerCounts()
        layer.experts.register_forward_pre_hook(
            lambda module, args, layer=layer: _count_dispatch(layer, args))


def count_local_rows(layer, rows: int) -> None:
    """Rows computed on this rank outside the dispatcher (replicated condensers)."""
    if layer.training and _counting() and hasattr(layer, "ep_counts"):
        layer.ep_counts.local_rows += rows


def _local_totals(model: torch.nn.Module, device) -> torch.Tensor | None:
    """This rank's [4] totals over its MoE layers since the last call, reset."""
    layers = [m for m in _moe_layers(model) if hasattr(m, "ep_counts")]
    if not layers:
        return None
    totals = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)
    for layer in layers:
        counts = layer.ep_counts
        totals[0] += counts.sent
        totals[1] += counts.remote
        totals[3] += counts.local_rows
        if counts.received is not None:
            totals[2:] += counts.received.to(device)
        layer.ep_counts = LayerCounts()
    return totals


def _placeholders_received(model: torch.nn.Module, device, distributed: bool):
    """Placeholder slots this rank received since the last call: every sender of its EP group
    counted them per destination (one all-reduce over the EP group); None without routers."""
    from megatron_ec.moe import state

    routers = state.ec_routers(model)
    if not routers:
        return None
    per_destination = torch.stack([r.take_placeholder_load() for r in routers]).sum(dim=0)
    per_destination = per_destination.to(device, torch.float64)
    if not distributed:
        return per_destination[0]
    from megatron.core import parallel_state as ps

    dist.all_reduce(per_destination, group=ps.get_expert_model_parallel_group())
    return per_destination[ps.get_expert_model_parallel_rank()]


def ep_metrics(model: torch.nn.Module, group=None) -> dict[str, float]:
    """Max and mean over ranks of this step's counters (collective over `group`, default all)."""
    from megatron_ec.parallel import collective_device

    distributed = dist.is_available() and dist.is_initialized()
    device = collective_device(group) if distributed else torch.device("cpu")
    totals = _local_totals(model, device)
    if totals is None:
        return {}
    placeholders = _placeholders_received(model, device, distributed)
    names = _FIELDS
    if placeholders is not None:
        totals, names = torch.cat([totals, placeholders.reshape(1)]), _FIELDS + ("placeholders",)
    pieces = [totals]
    if distributed:
        pieces = [torch.zeros_like(totals) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, totals, group=group)
    per_rank = torch.stack(pieces).cpu()  # [ranks, fields]: the step's one host read
    metrics = {}
    for index, name in enumerate(names):
        metrics[f"ep/{name}_max"] = float(per_rank[:, index].max())
        metrics[f"ep/{name}_mean"] = float(per_rank[:, index].mean())
    return metrics
