"""DenseMixer (METHODS.md s.5): the ordinary top-k forward, a dense straight-through router
gradient.

    y = stopgrad(y_sparse) + y_dense - stopgrad(y_dense),   y_dense = sum_e p~_e Ê_e(h)

(`megatron_ec.moe.densemixer` has the math and its oracle tests.) Megatron-Core's router ->
dispatcher -> experts -> combine path already computes y_sparse with SFT's gradients: the selected
experts' parameters and inputs train with w_e (= p~_e on the selection) and the router gets
d y / d w_e through the dispatched probs. What DenseMixer adds on top is the router gradient of the
UNSELECTED experts only,

    c_t = sum_{e not in TopK_t} p~_te stopgrad(E_e(h_t)),   added as  c_t - stopgrad(c_t)  (= 0),

with p~_te = c p_te / stopgrad(S_t) (renormalising families) or c p_te; the E_e(h_t) of unselected
experts carry no gradient (Ê), so they run under `torch.no_grad()`.

Where it enters Megatron-Core's MoE layer, through the two seams only (no fork):
- `DenseMixerRouter` (the `MoESubmodules.router`): ECRouter's routing, and in graph-building
  forwards it leaves the full scores p [T, E] (softmax of the fp32 logits, differentiable) and the
  routing map with the layer's `DenseMixerExperts` (paired at build time, `_Pairing`).
- `DenseMixerExperts` (the `MoESubmodules.experts`, Megatron-Core's SequentialMLP): after the
  ordinary expert computation it adds c_t - stopgrad(c_t) to ONE dispatched row of each token.
  The gradient reaching a dispatched row is d L / d y_t of its token (the combine's unpermute is a
  sum of rows, the expert-TP reduce-scatter's backward is an all-gather), so c_t's backward gives
  the router exactly sum_{e unsel} <dL/dy_t, E_e(h_t)> d p~_te. The row -> token map is the
  dispatchers' permutation order (local-expert-major, then token in the gathered order; both
  dispatchers), checked bitwise against the dispatched hidden states every forward.

TP: with ETP1 every rank's experts see its own sequence-parallel tokens; with ETP>1 the scores and
maps are gathered over the expert-TP group like the dispatcher gathers tokens, each rank adds its
partial c (its fc2 shard), and the scores' gather backward (a reduce-scatter) sums the partial
router gradients. EP>1: hidden states, scores and maps are gathered over EP (and expert TP, in
the dispatcher's order), each rank runs its local experts (its fc2 shard of them) on all
gathered tokens, and a zero-valued tap on the expert rows (`_EPRouterTap`) all-reduces dL/dy over
expert TP x EP in the backward, so every rank can form its unselected local experts' (partial)
router term; the scores' gathers return (and sum) it to the token owners.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_ec.moe.densemixer import dense_gate_weights
from megatron_ec.moe.methods.base import Method, MethodConfig, MoEFacts
from megatron_ec.moe.methods.registry import register

SCORE_FUNCTIONS = ("softmax", "softmax_topk")
"""p = softmax over all experts in both; `softmax_topk` (GPT-OSS: softmax over the k selected
logits) is p / S on the selection, the renormalising rule."""


@dataclass(frozen=True)
class DenseMixerConfig(MethodConfig):
    """`method:` of DenseMixer: SFT with a dense straight-through router gradient."""

    name: str = "densemixer"


class _Pairing:
    """Pairs each MoE layer's router with its experts: Megatron-Core's `MoELayer.__init__` builds
    the router, then the experts, so the experts builder takes the router built just before."""

    def __init__(self) -> None:
        self.pending = None

    def build_router(self, *args, **kwargs):
        from megatron_ec.moe.densemixer_modules import DenseMixerRouter

        router = DenseMixerRouter(*args, **kwargs)
        self.pending = router
        return router

    def build_experts(self, *args, **kwargs):
        from megatron_ec.moe.densemixer_modules import DenseMixerExperts

        router, self.pending = self.pending, None
        if router is None:
            raise RuntimeError("DenseMixerExperts built without its layer's DenseMixerRouter")
        return DenseMixerExperts(*args, router=router, **kwargs)


@register
class DenseMixer(Method):
    """The family's routing and forward; the router also learns from every unselected expert."""

    name = "densemixer"
    Config = DenseMixerConfig

    def __init__(self, config, decisions=None) -> None:
        super().__init__(config, decisions)
        self._pairing = _Pairing()

    def _check(self, facts: MoEFacts) -> None:
        if facts.routing.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"method densemixer needs softmax routing scores (METHODS.md s.5), "
                             f"not score_function={facts.routing.score_function!r}")

    def router_builder(self, facts: MoEFacts) -> Callable:
        self._check(facts)
        routing = self.routing(facts)
        return functools.partial(self._pairing.build_router, routing_cfg=routing,
                                 policy=self.router_policy(), slots=self.dispatcher_slots(facts),
                                 record_scores=bool(self.config.spec_losses))

    def experts_wrapper(self, facts: MoEFacts) -> Callable:
        """DenseMixerExperts with the spec's local-expert submodules (a family's own fc2, e.g.
        GPT-OSS's biased `ExpertRowParallelLinear`); otherwise Megatron-Core's local linears with
        `ExpertRowParallelLinear` as fc2 (the same as RowParallelLinear without a bias)."""
        self._check(facts)
        if "orthogonality" in self.config.spec_losses:
            raise ValueError(f"method.spec_losses.orthogonality: method {self.name} brings its "
                             "own experts; the orthogonality loss is not supported with it")
        return functools.partial(_with_spec_submodules, self._pairing.build_experts)


def _with_spec_submodules(build: Callable, spec_experts) -> Callable:
    """`build` bound to the local MLP submodules of the spec's SequentialMLP builder, if it is
    one (Transformer Engine's grouped experts have no per-expert MLP to reuse)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    if isinstance(spec_experts, functools.partial) and spec_experts.func is SequentialMLP \
            and "submodules" in spec_experts.keywords:
        return functools.partial(build, submodules=spec_experts.keywords["submodules"])
    return build
