"""The HF side of a family: how to find and swap the router of its MoE blocks (no Megatron-Core).

In transformers 5.23 every supported family's MoE block calls its router (`self.gate`; GPT-OSS:
`self.router`, which also has a linear bias) `(hidden) -> (router_logits, weights [T, K], expert
ids [T, K])` and hands the last two to its experts module, which accepts any K; `GateAdapter` swaps that gate for a `RestoredGate`, which selects
with `megatron_ec.moe.routing.route()` exactly as `ECRouter` does in Megatron. In reference mode a
token gets k + r slots and the HF experts compute all of them. Each family names its adapter
(`Family.hf_gate`); `megatron_ec.models.hf_restore` installs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_ec.moe.fp32_buffers import KeepsFp32Buffers
from megatron_ec.moe.routing import RoutingConfig, num_slots, route, validate_condensers


class RestoredGate(KeepsFp32Buffers, torch.nn.Module):
    """A family gate with `route()`'s selection: same weight, same (logits, weights, ids) output.

    The selection bias stays fp32 through `model.to(torch.bfloat16)`, as in `ECRouter`.
    Shape legend: T tokens, E routed experts, K slots (k, or k + r in reference mode).
    """

    fp32_buffers = ("selection_bias",)

    def __init__(self, weight: torch.nn.Parameter, routing_cfg: RoutingConfig,
                 bias_E: torch.Tensor | None, condensers: list[int] | None,
                 fp32_weights: bool, linear_bias: torch.nn.Parameter | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = linear_bias
        """The router's own (trained) linear bias (GPT-OSS), not the selection bias."""
        self.routing_cfg = routing_cfg
        self.fp32_weights = fp32_weights
        self.register_buffer("selection_bias", bias_E, persistent=False)
        # Validated once, here on the host; the forward reads no values.
        ids = validate_condensers(list(condensers or []), routing_cfg.num_experts, weight.device)
        self.slots = num_slots(routing_cfg, ids.numel())
        self.register_buffer("condenser_ids", ids, persistent=False)

    def router_logits(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, E], as Megatron's router computes them (moe_router_dtype="fp32")."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(hidden_TH.float(), self.weight.float(), bias)

    def forward(self, hidden_states: torch.Tensor):
        hidden_TH = hidden_states.reshape(-1, self.weight.shape[1])
        logits_TE = self.router_logits(hidden_TH)
        condensers = self.condenser_ids if self.condenser_ids.numel() else None
        probs_TE, routing_map_TE = route(logits_TE, self.routing_cfg, self.selection_bias,
                                         condensers)
        # The selected ids in ascending order, as `nonzero()` listed them, without its host
        # read: a stable descending sort puts each row's True entries first, in id order.
        order_TE = torch.sort(routing_map_TE.to(torch.uint8), dim=1, descending=True,
                              stable=True).indices
        ids_TK = order_TE[:, :self.slots]
        weights_TK = probs_TE.gather(1, ids_TK)
        if not self.fp32_weights:
            weights_TK = weights_TK.to(hidden_states.dtype)
        return logits_TE.to(hidden_states.dtype), weights_TK, ids_TK


@dataclass(frozen=True)
class GateAdapter:
    """How to find and swap the router of one HF MoE block type."""

    block_class: str
    """Class name of the family's MoE block (e.g. "Qwen2MoeSparseMoeBlock")."""
    gate_attr: str = "gate"
    fp32_weights: bool = False
    """The family hands fp32 gate weights to its experts (Mixtral, DeepSeek) rather than casting
    them to the hidden dtype (Qwen, OLMoE)."""

    def blocks(self, hf_model) -> dict[int, torch.nn.Module]:
        """{decoder layer index: MoE block} of a `*ForCausalLM`."""
        layers = hf_model.model.layers
        return {i: layer.mlp for i, layer in enumerate(layers)
                if type(layer.mlp).__name__ == self.block_class}

    def install(self, block: torch.nn.Module, routing_cfg: RoutingConfig,
                bias_E: torch.Tensor | None, condensers: list[int] | None) -> None:
        router = getattr(block, self.gate_attr)
        gate = RestoredGate(router.weight, routing_cfg, bias_E, condensers, self.fp32_weights,
                            getattr(router, "bias", None))
        setattr(block, self.gate_attr, gate)
