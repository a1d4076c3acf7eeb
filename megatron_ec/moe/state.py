"""Model-level operations on the routers: the per-step statistics and bias update, metrics.

The method calls `bias_update_step(model)` once per optimizer step, after the gradients of the
step are finalised. Everything here acts on every `ECRouter` of this rank's model and knows
nothing of methods: each router's `RouterPolicy` says whether its bias moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_ec.moe.routing import gini

if TYPE_CHECKING:  # the router imports Megatron-Core; this module must not (config parsing uses it)
    from megatron_ec.moe.router import ECRouter


def ec_routers(model: torch.nn.Module) -> list[ECRouter]:
    """This rank's `ECRouter`s, in layer order."""
    from megatron_ec.moe.router import ECRouter

    routers = [m for m in model.modules() if isinstance(m, ECRouter)]
    return sorted(routers, key=lambda r: r.layer_number)


def _token_group():
    """Every rank that routes different tokens: data parallel x tensor parallel (sequence
    parallelism gives each TP rank its own slice of the tokens)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


@torch.no_grad()
def bias_update_step(model: torch.nn.Module, group=None) -> None:
    """Reduce the step's usage over ranks, let every router end its step (bias update, reset).

    Call on every rank exactly once per optimizer step, after the last micro-batch's backward.
    The statistics of all layers travel in one all-reduce; every rank then applies the same fp32
    arithmetic to the same sums, so the biases stay bit-identical across ranks.
    """
    routers = ec_routers(model)
    if not routers:
        return
    stats = torch.stack([router.step_statistics() for router in routers])
    if dist.is_initialized():
        dist.all_reduce(stats, group=group or _token_group())
    for router, row in zip(routers, stats):
        router.end_step(row)


def check_expert_lists(key: str, lists: dict[int, list[int]], model: torch.nn.Module,
                       sizes: dict[int, int] | None = None) -> None:
    """ValueError (one line naming `key[layer]`) unless each listed layer is a MoE layer of `model`
    with distinct expert ids in [0, E) (and, when `sizes` is given, exactly `sizes[layer]` ids)."""
    routers = ec_routers(model)
    layers = sorted(r.layer_index for r in routers)
    num_experts = routers[0].config.num_moe_experts if routers else 0
    for layer, ids in sorted(lists.items()):
        where = f"{key}[{layer}]={ids}"
        if layer not in layers:
            raise ValueError(f"{where}: layer {layer} is not a MoE layer; the MoE layers are "
                             f"{layers} (0-based decoder layers)")
        if sizes is not None and len(ids) != sizes[layer]:
            raise ValueError(f"{where}: lists {len(ids)} experts but method.num_condensers "
                             f"gives r={sizes[layer]} for layer {layer}; list exactly r experts")
        if any(not 0 <= e < num_experts for e in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{where}: expert ids must be distinct and in [0, {num_experts})")


def selection_biases(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """{layer index: fp32 bias} of this rank's routers (identical on every rank)."""
    return {r.layer_index: r.selection_bias.clone() for r in ec_routers(model)}


def load_selection_biases(model: torch.nn.Module, biases: dict[int, torch.Tensor]) -> None:
    for router in ec_routers(model):
        router.selection_bias.copy_(biases[router.layer_index].to(torch.float32))


def routing_metrics(model: torch.nn.Module) -> dict[str, object]:
    """Per-layer observability after `bias_update_step`: bias stats, usage Gini, condensers.

    Every router's numbers travel to the host in ONE copy (the step's one host read for the
    routing metrics, off the forward): nothing here synchronises per layer.
    """
    routers = ec_routers(model)
    if not routers:
        return {}
    pieces = []
    for router in routers:
        bias = router.selection_bias
        pieces += [torch.stack([bias.mean(), bias.min(), bias.max(), router.last_gate]),
                   router.last_usage, router.condenser_ids.to(torch.float32)]
    host = torch.cat(pieces).cpu()
    metrics: dict[str, object] = {}
    offset = 0
    for router in routers:
        num_experts, r = router.last_usage.numel(), router.condenser_ids.numel()
        stats, usage = host[offset:offset + 4].tolist(), host[offset + 4:offset + 4 + num_experts]
        condensers = host[offset + 4 + num_experts:offset + 4 + num_experts + r]
        offset += 4 + num_experts + r
        prefix = f"routing/layer{router.layer_index}"
        metrics[f"{prefix}/bias_mean"], metrics[f"{prefix}/bias_min"] = stats[0], stats[1]
        metrics[f"{prefix}/bias_max"] = stats[2]
        if usage.sum() > 0:
            metrics[f"{prefix}/usage_gini"] = gini(usage)
        if r:
            metrics[f"{prefix}/condensers"] = [int(e) for e in condensers.tolist()]
            metrics[f"{prefix}/condenser_gate"] = stats[3]
    return metrics
