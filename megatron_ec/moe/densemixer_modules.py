"""DenseMixer's router and experts for Megatron-Core's `MoESubmodules` seams.

The design (where the dense term enters the MoE layer, TP, the EP limit) is the docstring of
`megatron_ec/moe/methods/densemixer.py`; the math is `megatron_ec/moe/densemixer.py`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_ec.moe.densemixer import dense_gate_weights
from megatron_ec.moe.expert_linear import ExpertRowParallelLinear
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

    def __init__(self, num_local_experts, config, pg_collection=None, name=None, *,
                 router: DenseMixerRouter, submodules=None) -> None:
        if submodules is None:  # e.g. the spec's experts are grouped GEMM (GPU)
            submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                       linear_fc2=ExpertRowParallelLinear)
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         name=name)
        self.tp_ep_group = pg_collection.tp_ep
        self._router = _RouterRef(router)

    def forward(self, permuted_hidden, tokens_per_expert, permuted_probs):
        output, bias = super().forward(permuted_hidden, tokens_per_expert, permuted_probs)
        router = self._router.router
        stash, router.dense_stash = router.dense_stash, None
        if stash is None or not torch.is_grad_enabled():
            return output, bias
        return output + self._correction(permuted_hidden, stash, router.routing_cfg), bias

    def _correction(self, permuted_hidden, stash, routing_cfg) -> torch.Tensor:
        """[rows, H] of zeros whose backward gives the router the unselected experts' term
        (EP1), or the EP tap's input passed through (EP>1, `_EPRouterTap`)."""
        hidden_TH, scores_TE, routing_map_TE = stash
        for group in self._gather_groups():  # the tokens in the dispatcher's gathered order
            scores_TE = gather_from_sequence_parallel_region(scores_TE, group=group)
            routing_map_TE = _gather_rows(routing_map_TE, group)
            hidden_TH = _gather_rows(hidden_TH, group)
        num_tokens, num_rows = routing_map_TE.shape[0], permuted_hidden.shape[0]
        first = self.ep_group.rank() * self.num_local_experts
        local = slice(first, first + self.num_local_experts)
        # the dispatchers' order: local-expert-major, then token in the gathered order
        token_of_row = routing_map_TE[:, local].t().nonzero()[:, 1]
        if token_of_row.numel() != num_rows or not torch.equal(
                permuted_hidden.detach(), hidden_TH[token_of_row].to(permuted_hidden.dtype)):
            raise RuntimeError("densemixer: dispatched rows are not in the expected token order "
                               "(a dispatcher this method was not built for)")
        with torch.no_grad():  # unit per-token scale: E_e(h) with its fc2 bias, if any
            hidden = hidden_TH.to(permuted_hidden.dtype)
            ones_T = hidden.new_ones(hidden.shape[0])
            outputs_ETH = torch.stack([expert(hidden, ones_T)[0] for expert in self.local_experts])
        renormalise = routing_cfg.norm_topk_prob or routing_cfg.score_function == "softmax_topk"
        weights_TE = dense_gate_weights(scores_TE, routing_map_TE, renormalise,
                                        routing_cfg.scaling_factor)
        weights_TE = torch.where(routing_map_TE, 0.0, weights_TE)[:, local]  # unselected only
        rows = torch.arange(num_rows, device=token_of_row.device)
        first_row_T = torch.full((num_tokens,), num_rows, dtype=rows.dtype, device=rows.device)
        first_row_T = first_row_T.scatter_reduce(0, token_of_row, rows, "amin")
        if self.ep_group.size() > 1:
            # the lowest EP rank holding one of the token's rows (its first expert-TP rank:
            # every expert-TP rank holds the same rows) hands its dL/dy to all
            owner_E = torch.arange(routing_map_TE.shape[1], device=rows.device) \
                // self.num_local_experts
            holder_T = torch.where(routing_map_TE, owner_E, self.ep_group.size()).amin(dim=1)
            mine_T = (holder_T == self.ep_group.rank()) & (self.tp_group.rank() == 0)
            return _EPRouterTap.apply(permuted_hidden.new_zeros(permuted_hidden.shape),
                                      weights_TE, outputs_ETH, first_row_T, mine_T,
                                      self.tp_ep_group)
        extra_TH = torch.einsum("te,eth->th", weights_TE.to(outputs_ETH.dtype), outputs_ETH)
        zero_TH = extra_TH - extra_TH.detach()
        return torch.zeros_like(permuted_hidden).index_add(0, first_row_T, zero_TH.to(
            permuted_hidden.dtype))


    def _gather_groups(self) -> list:
        """The groups the dispatcher gathered this layer's tokens over, in its order: the
        alltoall dispatcher's all-to-all over EP, then its all-gather over expert TP (sources
        expert-TP-major); the allgather dispatcher's one gather over expert TP x EP."""
        ep, tp = self.ep_group.size() > 1, self.tp_group.size() > 1
        if ep and tp and self.config.moe_token_dispatcher_type == "allgather":
            return [self.tp_ep_group]
        return [group for group, used in ((self.ep_group, ep), (self.tp_group, tp)) if used]


class _EPRouterTap(torch.autograd.Function):
    """Under EP: zeros [rows, H] added to the expert rows; in the backward, dL/dy of every token
    of the expert TP x EP group (from a row of it, all-reduced over the group) times this rank's
    unselected local expert outputs (its fc2 shard's part under expert TP) is the gradient of
    their weights p~ [T_gathered, E_local]."""

    @staticmethod
    def forward(ctx, zeros_RH, weights_TE, outputs_ETH, first_row_T, mine_T, group):
        ctx.save_for_backward(outputs_ETH, first_row_T, mine_T)
        ctx.group = group
        ctx.weights_dtype = weights_TE.dtype
        return zeros_RH.clone()

    @staticmethod
    def backward(ctx, grad_RH):
        outputs_ETH, first_row_T, mine_T = ctx.saved_tensors
        tokens = mine_T.nonzero().squeeze(-1)
        grad_TH = grad_RH.new_zeros((mine_T.numel(), grad_RH.shape[-1]))
        grad_TH[tokens] = grad_RH[first_row_T[tokens]]
        dist.all_reduce(grad_TH, group=ctx.group)  # one holder per token: exact
        grad_weights_TE = torch.einsum("th,eth->te", grad_TH, outputs_ETH.to(grad_TH.dtype))
        return grad_RH, grad_weights_TE.to(ctx.weights_dtype), None, None, None, None
