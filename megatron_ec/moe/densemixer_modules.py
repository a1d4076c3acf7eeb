"""DenseMixer's router and experts for Megatron-Core's `MoESubmodules` seams.

The design (where the dense term enters the MoE layer, TP, the EP limit) is the docstring of
`megatron_ec/moe/methods/densemixer.py`; the math is `megatron_ec/moe/densemixer.py`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_ec.moe.densemixer import dense_gate_weights
from megatron_ec.moe.router import ECRouter


class DenseMixerRouter(ECRouter):
    """ECRouter that leaves, in graph-building forwards, what the dense term needs: its input
    (for a bitwise check), the scores p over all experts and the routing map."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dense_stash: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._input = None

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        self._input = input
        try:
            return super().forward(input, padding_mask)
        finally:
            self._input = None

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs_TE, routing_map_TE = super().routing(logits, padding_mask)
        self.dense_stash = None
        if self.training and torch.is_grad_enabled() and self._input is not None:
            logits_TE = logits.view(-1, self.config.num_moe_experts).float()
            scores_TE = torch.softmax(logits_TE, dim=-1)
            hidden_TH = self._input.reshape(-1, self._input.shape[-1]).detach()
            self.dense_stash = (hidden_TH, scores_TE, routing_map_TE)
        return probs_TE, routing_map_TE


class _RouterRef:
    """A plain holder, so the experts do not register the router as their submodule."""

    def __init__(self, router: DenseMixerRouter) -> None:
        self.router = router


def _gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 without autograd (equal sizes on every rank)."""
    out = tensor.new_empty((group.size() * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    return out


class DenseMixerExperts(SequentialMLP):
    """Megatron-Core's SequentialMLP plus the unselected experts' straight-through router term."""

    def __init__(self, num_local_experts, config, submodules=None, pg_collection=None,
                 name=None, *, router: DenseMixerRouter) -> None:
        if submodules is None:
            submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                       linear_fc2=RowParallelLinear)
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         name=name)
        if self.ep_group.size() > 1:
            from megatron_ec.moe.methods.densemixer import EP_LIMIT

            raise ValueError(EP_LIMIT)
        self._router = _RouterRef(router)

    def forward(self, permuted_hidden, tokens_per_expert, permuted_probs):
        output, bias = super().forward(permuted_hidden, tokens_per_expert, permuted_probs)
        router = self._router.router
        stash, router.dense_stash = router.dense_stash, None
        if stash is None or not torch.is_grad_enabled():
            return output, bias
        return output + self._correction(permuted_hidden, stash, router.routing_cfg), bias

    def _correction(self, permuted_hidden, stash, routing_cfg) -> torch.Tensor:
        """[rows, H] of zeros whose backward gives the router the unselected experts' term."""
        hidden_TH, scores_TE, routing_map_TE = stash
        if self.tp_group.size() > 1:  # the dispatcher gathered the tokens over expert TP
            scores_TE = gather_from_sequence_parallel_region(scores_TE, group=self.tp_group)
            routing_map_TE = _gather_rows(routing_map_TE, self.tp_group)
            hidden_TH = _gather_rows(hidden_TH, self.tp_group)
        num_tokens, num_rows = routing_map_TE.shape[0], permuted_hidden.shape[0]
        # the dispatchers' order at EP1: expert-major, then token (both dispatchers, any TP)
        token_of_row = routing_map_TE.t().nonzero()[:, 1]
        if token_of_row.numel() != num_rows:
            raise RuntimeError(f"densemixer: {num_rows} dispatched rows, routing map has "
                               f"{token_of_row.numel()}")
        rows = torch.arange(num_rows, device=token_of_row.device)
        first_row_T = torch.full((num_tokens,), num_rows, dtype=rows.dtype, device=rows.device)
        first_row_T = first_row_T.scatter_reduce(0, token_of_row, rows, "amin")
        if not torch.equal(permuted_hidden[first_row_T[token_of_row]].detach(),
                           permuted_hidden.detach()) or \
                not torch.equal(permuted_hidden[first_row_T].detach(),
                                hidden_TH.to(permuted_hidden.dtype)):
            raise RuntimeError("densemixer: dispatched rows are not in the expected token order "
                               "(a dispatcher this method was not built for)")
        with torch.no_grad():
            outputs_ETH = torch.stack([expert(hidden_TH.to(permuted_hidden.dtype))[0]
                                       for expert in self.local_experts])
        weights_TE = dense_gate_weights(scores_TE, routing_map_TE, routing_cfg.norm_topk_prob,
                                        routing_cfg.scaling_factor)
        weights_TE = torch.where(routing_map_TE, 0.0, weights_TE)  # selected: the sparse path
        extra_TH = torch.einsum("te,eth->th", weights_TE.to(outputs_ETH.dtype), outputs_ETH)
        zero_TH = extra_TH - extra_TH.detach()
        return torch.zeros_like(permuted_hidden).index_add(0, first_row_T, zero_TH.to(
            permuted_hidden.dtype))
