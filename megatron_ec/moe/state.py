"""Model-level operations on the routers: the per-step bias update, condenser choice, metrics.

The trainer calls `bias_update_step(model)` once per optimizer step, after the gradients of the
step are finalised; `start_condenser_phase` when the condenser phase begins; `apply_method_state`
after loading a checkpoint. All of them act on every `ECRouter` of this rank's model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ec.moe.method_state import MethodState
from megatron_ec.moe.router import ECRouter
from megatron_ec.moe.routing import gini, select_condensers, update_bias


def ec_routers(model: torch.nn.Module) -> list[ECRouter]:
    """This rank's routers, in layer order."""
    routers = [m for m in model.modules() if isinstance(m, ECRouter)]
    return sorted(routers, key=lambda r: r.layer_number)


def _token_group():
    """Every rank that routes different tokens: data parallel x tensor parallel (sequence
    parallelism gives each TP rank its own slice of the tokens)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


@torch.no_grad()
def bias_update_step(model: torch.nn.Module, group=None) -> None:
    """Reduce the step's usage over ranks, move the biases once, reset the accumulators.

    Call on every rank exactly once per optimizer step, after the last micro-batch's backward.
    The usage of all layers travels in one all-reduce; every rank then applies the same fp32
    arithmetic to the same sums, so the biases stay bit-identical across ranks.
    """
    routers = ec_routers(model)
    if not routers:
        return
    stats = torch.stack([torch.cat([r.usage_accum, r.gate_accum]) for r in routers])
    if dist.is_initialized():
        dist.all_reduce(stats, group=group or _token_group())
    num_experts = routers[0].usage_accum.numel()
    for router, row in zip(routers, stats):
        usage_E = row[:num_experts]
        method = router.method
        if method.uses_bias and usage_E.sum() > 0:
            router.selection_bias.copy_(
                update_bias(router.selection_bias, usage_E, method.gamma, method.direction)
            )
        router.last_usage = usage_E.clone()
        router.last_gate = (row[-2] / row[-1]).item() if row[-1] > 0 else float("nan")
        router.usage_accum.zero_()
        router.gate_accum.zero_()


def _condensers_per_layer(model: torch.nn.Module, method: MethodState) -> dict[int, int]:
    """r per MoE layer (every MoE layer has a router on every rank: no pipeline split)."""
    return method.condensers_for([r.layer_index for r in ec_routers(model)])


def start_condenser_phase(model: torch.nn.Module, method: MethodState) -> MethodState:
    """Choose each layer's condensers from its current (learned) bias and fix them.

    Layers listed in `method.condensers` keep the user's choice. Condensers are the r lowest-bias
    experts, ties to the lower id. The choice is a pure function of the bias, which is identical
    on every rank, so no communication is needed.
    """
    per_layer = _condensers_per_layer(model, method)
    for router in ec_routers(model):
        layer = router.layer_index
        if layer in method.condensers:
            continue
        bias = router.selection_bias
        if per_layer[layer] > 0 and not bool(bias.ne(0).any()):
            raise ValueError(
                f"layer {layer}: the selection bias is all zeros, so there is nothing to choose "
                "condensers from; start the condenser phase from a bias-phase checkpoint "
                "(method.name=bias) or list them in method.condensers"
            )
        method.condensers[layer] = select_condensers(bias, per_layer[layer]).tolist()
    apply_method_state(model, method)
    return method


def check_listed_condensers(model: torch.nn.Module, method: MethodState) -> None:
    """ValueError (one line, naming `method.condensers`) unless every listed layer is a MoE layer
    of the model with exactly its r distinct expert ids in [0, E)."""
    per_layer = _condensers_per_layer(model, method)
    num_experts = ec_routers(model)[0].config.num_moe_experts if per_layer else 0
    for layer, ids in sorted(method.condensers.items()):
        where = f"method.condensers[{layer}]={ids}"
        if layer not in per_layer:
            raise ValueError(f"{where}: layer {layer} is not a MoE layer; the MoE layers are "
                             f"{sorted(per_layer)} (0-based decoder layers)")
        if len(ids) != per_layer[layer]:
            raise ValueError(f"{where}: lists {len(ids)} experts but method.num_condensers gives "
                             f"r={per_layer[layer]} for layer {layer}; list exactly r experts")
        if any(not 0 <= e < num_experts for e in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{where}: expert ids must be distinct and in [0, {num_experts})")


def apply_method_state(model: torch.nn.Module, method: MethodState) -> None:
    """Point every router at `method` and install its recorded condensers."""
    per_layer = _condensers_per_layer(model, method)
    for router in ec_routers(model):
        router.method = method
        ids = method.condensers.get(router.layer_index, [])
        if method.name == "condenser" and len(ids) != per_layer[router.layer_index]:
            raise ValueError(f"layer {router.layer_index}: method is 'condenser' with r="
                             f"{per_layer[router.layer_index]} but {len(ids)} condensers are "
                             "recorded; call start_condenser_phase first")
        router.set_condensers(ids)


def selection_biases(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """{layer index: fp32 bias} of this rank's routers (identical on every rank)."""
    return {r.layer_index: r.selection_bias.clone() for r in ec_routers(model)}


def load_selection_biases(model: torch.nn.Module, biases: dict[int, torch.Tensor]) -> None:
    for router in ec_routers(model):
        router.selection_bias.copy_(biases[router.layer_index].to(torch.float32))


def routing_metrics(model: torch.nn.Module) -> dict[str, object]:
    """Per-layer observability after `bias_update_step`: bias stats, usage Gini, condensers."""
    metrics: dict[str, object] = {}
    for router in ec_routers(model):
        prefix = f"routing/layer{router.layer_index}"
        bias = router.selection_bias
        metrics[f"{prefix}/bias_mean"] = bias.mean().item()
        metrics[f"{prefix}/bias_min"] = bias.min().item()
        metrics[f"{prefix}/bias_max"] = bias.max().item()
        usage = getattr(router, "last_usage", None)
        if usage is not None and usage.sum() > 0:
            metrics[f"{prefix}/usage_gini"] = gini(usage)
        if router.condenser_ids.numel():
            metrics[f"{prefix}/condensers"] = router.condenser_ids.tolist()
            metrics[f"{prefix}/condenser_gate"] = getattr(router, "last_gate", float("nan"))
    return metrics
