"""Expert-specialisation losses (METHODS.md s.6) as an add-on of ANY method: the wiring.

The math is `megatron_ec.moe.specialization` (oracle-tested); this module gathers its inputs from
the model during a training forward and turns them into the `micro_batch_loss` of the method:

    method:
      spec_losses: {variance: 1.0e-3, orthogonality: 1.0e-4}   # weights; {} (default) = off

Variance (any layout): every `ECRouter` built with `record_scores=True` keeps, per training
forward that builds a graph, softmax(logits) over all E experts [T, E] (with its graph), the
real-token mask and the routing map of its own tokens (`ECRouter.spec_record`).

Orthogonality (any TP; EP > 1 or expert TP > 1 with the alltoall dispatcher): the experts of
every MoE layer are
Megatron-Core's own class with `UnweightedOutputs` mixed in (`with_unweighted_outputs`, through
`MoESubmodules.experts`): they run with probs = 1, keep that unweighted output [rows, H]
(`spec_outputs`, on the expert's rank, in the dispatched order) and return it times the probs,
which is what Megatron-Core computes (its experts scale the activation before the bias-free fc2
by the prob). After the forward, `micro_batch_loss` sends those rows home along the dispatcher's
own combine path: `combine_preprocess` (un-sort by local expert; under expert TP the
reduce-scatter that sums the fc2 shards' partial outputs and returns each sequence-parallel
rank its own tokens) and `token_combine` (the all-to-all back, with the splits the forward's
dispatch recorded), both side-effect free and autograd-aware; it stops before
`combine_postprocess`, whose `unpermute` would sum a token's K rows. On the token's rank the
rows are then complete and in the order of the dispatcher's `permute` (expert-major, tokens
ascending within an expert: `routing_map.T.nonzero()`), so sorting them by token gives
[T, K, H] aligned with the routing. The extra reduce-scatter / all-to-all is collective: every
rank of the expert TP x EP group runs it per MoE layer, in layer order, in `micro_batch_loss`.
At EP1 and expert TP1 the rows need no transport (any dispatcher; with TP > 1 and expert TP1
each rank's experts ran on its own sequence-parallel tokens). EP > 1 or expert TP > 1 with the
allgather dispatcher is a one-line config error (`check_layout`): its `combine_preprocess`
already sums a token's K rows on the expert side.

Normalisation (ours): each term is the mean over MoE layers of the per-layer loss (means over
the real tokens of the micro-batch), so the weights do not scale with depth. Under sequence
parallelism a TP rank holds a slice of the tokens and the router's gradient is summed over TP:
the variance term divides its local sum by the real tokens of the whole TP group (one small
all-reduce per micro-batch), so the summed gradient is that of the full micro-batch's mean; the
orthogonality term does the same with its rank's tokens (Megatron-Core sums the expert
gradients of the sequence-parallel ranks over the expert data-parallel group, and the expert-TP
reduce-scatter's backward hands every shard the gradient of every rank's share).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist

from megatron_ec.moe.specialization import orthogonality_loss, variance_loss

SPEC_LOSSES = ("variance", "orthogonality")


def check_weights(weights: dict) -> None:
    """ValueError (one line) unless `weights` maps only the two loss names to floats >= 0."""
    if not isinstance(weights, dict):
        raise ValueError(f"method.spec_losses must be a mapping {{name: weight}}, got {weights!r}")
    for name, weight in weights.items():
        if name not in SPEC_LOSSES:
            raise ValueError(f"method.spec_losses.{name}: unknown loss; use "
                             f"{' or '.join(SPEC_LOSSES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"method.spec_losses.{name}={weight!r} must be a number >= 0")


def check_layout(weights: dict, tensor_parallel: int, expert_parallel: int,
                 recompute: str, dispatcher: str = "alltoall",
                 expert_tensor_parallel: int = 1) -> None:
    """ValueError (one line) for a layout the configured losses do not support.

    `tensor_parallel` is accepted for the callers' symmetry: every TP size is supported.
    """
    del tensor_parallel
    if weights and recompute != "none":
        raise ValueError(f"method.spec_losses needs train.recompute=none (got {recompute!r}): a "
                         "recomputed MoE layer builds its graph only in the backward")
    spread = expert_parallel > 1 or expert_tensor_parallel > 1
    if "orthogonality" in weights and spread and dispatcher != "alltoall":
        raise ValueError("method.spec_losses.orthogonality with parallel.expert_model_parallel_size"
                         f"={expert_parallel}, expert_tensor_parallel_size="
                         f"{expert_tensor_parallel} needs parallel.token_dispatcher=alltoall (got "
                         f"{dispatcher!r})")


class UnweightedOutputs:
    """Mixin before a Megatron-Core experts class: keep the unweighted outputs of the forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spec_outputs: torch.Tensor | None = None
        """[T*K, H] unweighted outputs of the last training forward (with graph), permuted."""

    def forward(self, hidden, tokens_per_expert, permuted_probs, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(hidden, tokens_per_expert, permuted_probs, **kwargs)
        output, bias = super().forward(hidden, tokens_per_expert,
                                       torch.ones_like(permuted_probs), **kwargs)
        self.spec_outputs = output
        return output * permuted_probs.unsqueeze(-1).to(output.dtype), bias

    def take_spec_outputs(self) -> torch.Tensor | None:
        outputs, self.spec_outputs = self.spec_outputs, None
        return outputs


@functools.lru_cache(maxsize=None)
def _unweighted_class(cls: type) -> type:
    return type(f"Unweighted{cls.__name__}", (UnweightedOutputs, cls), {})


def with_unweighted_outputs(builder: Callable) -> Callable:
    """The `MoESubmodules.experts` builder `builder` (a class or a partial of one) with
    `UnweightedOutputs` mixed in; the module's parameters and state-dict keys are unchanged."""
    if isinstance(builder, functools.partial) and isinstance(builder.func, type):
        return functools.partial(_unweighted_class(builder.func), *builder.args,
                                 **builder.keywords)
    if isinstance(builder, type):
        return _unweighted_class(builder)
    raise ValueError(f"method.spec_losses.orthogonality: cannot wrap the experts builder "
                     f"{builder!r} (a class or functools.partial of one is needed)")


def _moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    return sorted(layers, key=lambda m: m.router.layer_number)


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def _global_count(local: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Real tokens of the micro-batch: this rank's, or the TP group's under sequence parallel."""
    if sequence_parallel and dist.is_initialized() and dist.get_world_size(_tp_group()) > 1:
        local = local.clone()
        dist.all_reduce(local, group=_tp_group())
    return local


def rank_share(mean: torch.Tensor, real_T: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """This rank's share of a per-token mean: its real tokens' sum over the group's real tokens
    (the TP ranks' shares sum to the micro-batch's mean under sequence parallelism)."""
    count = real_T.sum().to(mean.dtype)
    total = _global_count(count.detach(), sequence_parallel)
    return mean * count / total.clamp(min=1.0)


def layer_variance(scores_TE: torch.Tensor, real_T: torch.Tensor,
                   sequence_parallel: bool) -> torch.Tensor:
    """This rank's share of the layer's L_v."""
    return rank_share(variance_loss(scores_TE, real_T), real_T, sequence_parallel)


def rows_on_token_rank(layer, rows_NH: torch.Tensor) -> torch.Tensor:
    """The expert-side rows of `layer`'s last forward, on their tokens' rank, in `permute` order."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    dispatcher = layer.token_dispatcher
    if dispatcher.ep_size == 1 and dispatcher.tp_size == 1:
        return rows_NH
    if not isinstance(dispatcher, MoEAlltoAllTokenDispatcher) or \
            dispatcher.shared_experts is not None or dispatcher.drop_and_pad:
        raise RuntimeError("orthogonality under EP or expert TP needs the alltoall dispatcher "
                           "without shared-expert overlap or capacity padding")
    return dispatcher.token_combine(dispatcher.combine_preprocess(rows_NH))


def group_per_token(outputs_NH: torch.Tensor, routing_map_TE: torch.Tensor):
    """([T, K, H] outputs, [T, K] expert ids) from the rows in `permute` order (expert-major)."""
    experts_N, tokens_N = routing_map_TE.T.nonzero(as_tuple=True)
    if experts_N.numel() != outputs_NH.shape[0]:
        raise RuntimeError(f"orthogonality: {outputs_NH.shape[0]} expert rows for "
                           f"{experts_N.numel()} routed slots (not this rank's tokens?)")
    order = torch.argsort(tokens_N, stable=True)
    num_tokens, slots = routing_map_TE.shape[0], experts_N.numel() // routing_map_TE.shape[0]
    return (outputs_NH[order].view(num_tokens, slots, -1),
            experts_N[order].view(num_tokens, slots))


def micro_batch_terms(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """{loss name: mean over MoE layers} of the micro-batch just forwarded (consumes the records)."""
    from megatron_ec.moe.router import ECRouter

    per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for layer in _moe_layers(model):
        router = layer.router
        if not isinstance(router, ECRouter):
            raise RuntimeError("method.spec_losses needs the ECRouter of this method")
        record = router.take_spec_record()
        if record is None:
            raise RuntimeError(f"layer {router.layer_index}: no router record of the micro-batch "
                               "(method.spec_losses needs a training forward with grad, and a "
                               "router built with record_scores: Method.router_builder's)")
        scores_TE, real_T, routing_map_TE = record
        if "variance" in per_layer:
            per_layer["variance"].append(
                layer_variance(scores_TE, real_T, router.config.sequence_parallel))
        if "orthogonality" in per_layer:
            outputs = layer.experts.take_spec_outputs()
            if outputs is None:
                raise RuntimeError(f"layer {router.layer_index}: no expert outputs recorded")
            outputs_TKH, ids_TK = group_per_token(rows_on_token_rank(layer, outputs),
                                                  routing_map_TE)
            per_layer["orthogonality"].append(rank_share(
                orthogonality_loss(outputs_TKH, ids_TK, real_T), real_T,
                router.config.sequence_parallel))
    return {name: torch.stack(values).mean() for name, values in per_layer.items() if values}


class SpecLossMeter:
    """Per-step metrics `spec/<name>`: mean over micro-batches and data-parallel ranks.

    The sums stay on the terms' device (no host read per micro-batch); `end_step` reads them once.
    """

    def __init__(self, names) -> None:
        self.names = tuple(names)
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.last: dict[str, float] = {}

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        values = torch.stack([terms[n].detach().double() for n in self.names])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def end_step(self) -> None:
        """Collective over tensor x data parallel ranks; call once per step on every rank."""
        if self.sums is None:
            return
        stats = torch.cat([self.sums, self.sums.new_full((1,), float(self.count))])
        tp = 1
        if dist.is_initialized():
            from megatron.core import parallel_state as ps

            dist.all_reduce(stats, group=ps.get_tensor_and_data_parallel_group())
            tp = ps.get_tensor_model_parallel_world_size()
        values = stats.tolist()
        # each TP rank added its own micro-batch count: the DP x micro-batch count is count / tp;
        # every term is a TP share (`rank_share`): the shares sum to the micro-batch value
        count = values[-1] / tp
        self.last = {}
        if count > 0:
            for index, name in enumerate(self.names):
                self.last[f"spec/{name}"] = values[index] / count
        self.sums = None
        self.count = 0
