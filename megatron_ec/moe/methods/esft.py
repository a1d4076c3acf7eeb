"""ESFT (METHODS.md s.4): score the routed experts on task data, train only the selected ones.

When the phase starts (and the run has no selection yet), a no-grad eval-mode pass of the FROZEN
starting model over the training micro-batches (`PhaseStart.micro_batches`, the trainer's data
pipeline) records every router's (probs, routing_map) through a forward hook owned by this
method, accumulates `esft.score_sums` per MoE layer over real tokens, reduces the [L, 2E + 1]
sums over every rank that routes different tokens in ONE all-reduce, and selects per layer the
experts whose ES-Token or ES-Gate score reaches `top_p` (`esft.select_experts`). The selection is
this run's decision: saved with every checkpoint and at export, so resume never rescores; rank 0
also writes it, with the scores, to `output.dir/esft_selection.json`.

Training: routing is the family's own (no bias); only the selected routed experts train, the
router, attention, embeddings, norms (and shared experts) are frozen unless switched on. Global
expert g lives on EP rank g // (E / EP) as local g % (E / EP) (`esft.local_trainable_experts`).
Per-expert tensors (SequentialMLP on CPU, TEGroupedMLP's weight<i> on GPU) are frozen whole
(`requires_grad_(False)`: neither Megatron DDP nor the optimizers see them). An expert tensor
that stacks several local experts (legacy GroupedMLP weight1/weight2) trains as a whole with the
frozen experts' rows masked out of its gradient (`after_backward`) and written back after every
optimizer step (`after_optimizer_step`), so weight decay cannot move them (`esft.ExpertRowFreeze`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ec.moe import esft
from megatron_ec.moe import state as router_ops
from megatron_ec.moe.methods.base import Decisions, Method, MethodConfig, PhaseStart, layer_ids
from megatron_ec.moe.methods.registry import register

logger = logging.getLogger(__name__)

SELECTION_FILE = "esft_selection.json"
"""Written by rank 0 into `output.dir` after the scoring pass."""

_INDEXED = re.compile(r"^linear_fc[12]\.(?:weight|bias)(\d+)$")
"""TEGroupedMLP's per-expert tensors: linear_fc1.weight<i>, linear_fc2.bias<i>, ..."""
_STACKED = {"weight1": 1, "weight2": 0}
"""Legacy GroupedMLP: weight1 [H, E_local * 2F] (experts along dim 1), weight2 [E_local * F, H]."""


@dataclass(frozen=True)
class ESFTConfig(MethodConfig):
    """`method:` of Expert-Specialized Fine-Tuning (Wang et al. 2024)."""

    name: str = "esft"
    score: str = "token"
    """Expert score of the selection pass: token (ES-Token, the share of a layer's top-k
    selections) or gate (ES-Gate, the mean gate weight per token)."""
    top_p: float | None = None
    """Cumulative per-layer score to select, in (0, 1]; null = the paper's default for the
    chosen score (token 0.2, gate 0.1)."""
    score_batches: int | None = None
    """Micro-batches per data-parallel rank of the scoring pass; null = one pass over the
    training data."""
    experts: dict[int, list[int]] = field(default_factory=dict)
    """Selected experts given by the user, {layer index (0-based, all decoder layers): global
    expert ids}: no scoring pass; MoE layers not listed train no routed expert."""
    train_shared_experts: bool = False
    """Train the shared experts too (ESFT's switch)."""
    train_non_expert_modules: bool = False
    """Train attention, norms, embeddings, output layer and the routers too (ESFT's switch)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "experts", layer_ids(self.experts))
        if self.score not in esft.DEFAULT_TOP_P:
            raise ValueError(f"method.score={self.score!r}: use one of "
                             f"{', '.join(sorted(esft.DEFAULT_TOP_P))}")
        if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"method.top_p={self.top_p!r} must be in (0, 1], or null for the "
                             f"default of the score ({esft.DEFAULT_TOP_P})")
        if self.score_batches is not None and (isinstance(self.score_batches, bool)
                                               or int(self.score_batches) < 1):
            raise ValueError(f"method.score_batches={self.score_batches!r} must be >= 1, or "
                             "null for one pass over the training data")

    @property
    def threshold(self) -> float:
        """`top_p`, or the default of the chosen score function."""
        return float(self.top_p) if self.top_p is not None else esft.DEFAULT_TOP_P[self.score]


@dataclass
class ESFTDecisions(Decisions):
    """What an ESFT run decided."""

    experts: dict[int, list[int]] = field(default_factory=dict)
    """Selected global expert ids per MoE layer ({layer index: sorted ids}); empty until the
    phase starts, fixed after."""
    scores: dict[int, list[float]] = field(default_factory=dict)
    """The per-layer scores the selection was made from (empty when given by the user)."""

    def __post_init__(self) -> None:
        self.experts = layer_ids(self.experts)
        self.scores = {int(k): [float(x) for x in v] for k, v in self.scores.items()}


def _moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    return sorted(layers, key=lambda m: m.router.layer_number)


def _local_expert_params(experts: torch.nn.Module, num_local: int):
    """(per-expert [(local id, param)], stacked [(name, param, dim)]) of one experts module."""
    per_expert, stacked = [], []
    local_experts = getattr(experts, "local_experts", None)
    if local_experts is not None:  # SequentialMLP
        for local, module in enumerate(local_experts):
            per_expert += [(local, p) for p in module.parameters()]
        return per_expert, stacked
    for name, param in experts.named_parameters():
        match = _INDEXED.match(name)
        if name in _STACKED:  # GroupedMLP's own weight1/weight2 (TE's sit under linear_fc1/2)
            stacked.append((name, param, _STACKED[name]))
        elif match and "." in name and int(match.group(1)) < num_local:
            per_expert.append((int(match.group(1)), param))
        else:
            raise NotImplementedError(
                f"ESFT cannot tell which expert owns {type(experts).__name__}.{name} "
                f"{tuple(param.shape)}; use per-expert weights (moe_single_grouped_weight off)")
    return per_expert, stacked


def freeze_experts(experts: torch.nn.Module, trainable_local, num_local: int) -> list[tuple]:
    """Only the `trainable_local` experts of one experts module keep requires_grad; returns the
    (param, ExpertRowFreeze, snapshot) of each tensor that stacks trainable and frozen experts."""
    local = set(int(e) for e in trainable_local)
    per_expert, stacked = _local_expert_params(experts, num_local)
    for expert, param in per_expert:
        param.requires_grad_(expert in local)
    freezes = []
    for _, param, dim in stacked:
        param.requires_grad_(bool(local))
        if local and len(local) < num_local:
            freeze = esft.expert_row_freeze(sorted(local), num_local, param.shape[dim], dim)
            freezes.append((param, freeze, freeze.snapshot(param)))
    return freezes


@register
class ESFT(Method):
    """The family's routing; only the selected routed experts train."""

    name = "esft"
    Config = ESFTConfig
    Decisions = ESFTDecisions

    def __init__(self, config, decisions=None) -> None:
        super().__init__(config, decisions)
        self._row_freezes: list[tuple[torch.nn.Parameter, esft.ExpertRowFreeze, torch.Tensor]] = []

    # Phase start: the selection.
    def begin_phase(self, start: PhaseStart) -> None:
        """Keep the selection when resuming; else, first match wins: `method.experts`
        (validated), the starting checkpoint's ESFT selection, a scoring pass on
        `start.micro_batches()` (written to `start.out_dir/esft_selection.json` on rank 0)."""
        if not (start.resumed and self.decisions.experts):
            carried = start.source.decisions if isinstance(start.source, ESFT) else None
            if self.config.experts:
                self.decisions.experts = self.check_listed_experts(start.model)
                self.decisions.scores = {}
            elif carried is not None and carried.experts:
                logger.info("keeping the ESFT selection of the starting checkpoint")
                self.decisions.experts = dict(carried.experts)
                self.decisions.scores = dict(carried.scores)
            else:
                if start.micro_batches is None:
                    raise ValueError("ESFT scores experts on the training data: run it through "
                                     "the trainer, or list the experts in method.experts")
                token_LE, gate_LE, tokens = self.score_experts(start.model, start.micro_batches)
                self.select(start.model, token_LE, gate_LE)
                if start.out_dir is not None and (not dist.is_initialized()
                                                  or dist.get_rank() == 0):
                    self.write_selection(start.out_dir, token_LE, gate_LE, tokens)
        self.apply(start.model)

    def check_listed_experts(self, model: torch.nn.Module) -> dict[int, list[int]]:
        """`method.experts`, checked: MoE layers of the model, distinct ids in [0, E)."""
        router_ops.check_expert_lists("method.experts", self.config.experts, model)
        return {layer: sorted(ids) for layer, ids in self.config.experts.items()}

    @torch.no_grad()
    def score_experts(self, model: torch.nn.Module, micro_batches):
        """(ES-Token [L, E], ES-Gate [L, E], real tokens per layer [L]) of the frozen `model`
        over `micro_batches()` (at most `score_batches` of them), summed over every rank that
        routes different tokens. Collective: every rank must call it with the same number of
        micro-batches (the trainer's `eval_micro_batches` pads the last global one)."""
        routers = router_ops.ec_routers(model)
        if not routers:
            raise ValueError("ESFT: the model has no MoE layer to score")
        device = routers[0].weight.device
        num_experts = routers[0].config.num_moe_experts
        sums = {r.layer_index: torch.zeros(2 * num_experts + 1, dtype=torch.float64,
                                           device=device) for r in routers}

        def record(router, args, kwargs, output):
            probs_TE, routing_map_TE = output
            padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
            real_T = None if padding is None else ~padding.reshape(-1).to(torch.bool)
            sums[router.layer_index] += esft.score_sums(probs_TE, routing_map_TE, real_T)

        hooks = [r.register_forward_hook(record, with_kwargs=True) for r in routers]
        was_training = model.training
        model.eval()
        try:
            for index, batch in enumerate(micro_batches()):
                if self.config.score_batches is not None and index >= self.config.score_batches:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                      padding_mask=batch["padding_mask"])
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)
        sums_LS = torch.stack([sums[r.layer_index] for r in routers])
        if dist.is_initialized():
            dist.all_reduce(sums_LS, group=router_ops._token_group())
        sums_LS = sums_LS.cpu()
        token_LE, gate_LE = esft.scores_from_sums(sums_LS)
        return token_LE, gate_LE, sums_LS[:, -1]

    def select(self, model: torch.nn.Module, token_LE: torch.Tensor, gate_LE: torch.Tensor):
        """Fill the decisions from the scores of the configured score function."""
        layers = [r.layer_index for r in router_ops.ec_routers(model)]
        scores_LE = token_LE if self.config.score == "token" else gate_LE
        chosen = esft.select_experts_per_layer(scores_LE, self.config.threshold)
        self.decisions.experts = {layer: sorted(ids) for layer, ids in zip(layers, chosen)}
        self.decisions.scores = {layer: row.tolist() for layer, row in zip(layers, scores_LE)}

    def write_selection(self, out_dir, token_LE, gate_LE, tokens) -> Path:
        """`esft_selection.json`: ESFT's expert-config format, the scores, how it was made."""
        c = self.config
        record = esft.selection_record(self.decisions.experts, c.score, c.threshold,
                                       c.train_shared_experts, c.train_non_expert_modules)
        layers = sorted(self.decisions.experts)
        record.update({
            "layers": "0-based decoder layer indices (Megatron layer_number - 1)",
            "score_batches": c.score_batches,
            "tokens": {str(l): int(n) for l, n in zip(layers, tokens.tolist())},
            "scores": {str(l): {"token": token_LE[i].tolist(), "gate": gate_LE[i].tolist()}
                       for i, l in enumerate(layers)},
        })
        path = Path(out_dir) / SELECTION_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        return path

    # What trains.
    def set_trainable(self, model: torch.nn.Module) -> None:
        """Only the selected routed experts (and what the switches add) keep requires_grad."""
        from megatron.core import parallel_state as ps

        ep_rank = ps.get_expert_model_parallel_rank()
        ep_size = ps.get_expert_model_parallel_world_size()
        for param in model.parameters():
            param.requires_grad_(self.config.train_non_expert_modules)
        self._row_freezes = []
        for layer in _moe_layers(model):
            if layer.shared_experts is not None:
                layer.shared_experts.requires_grad_(self.config.train_shared_experts)
            num_experts = layer.router.config.num_moe_experts
            selected = self.decisions.experts.get(layer.router.layer_index, [])
            local = set(esft.local_trainable_experts(selected, num_experts, ep_rank, ep_size))
            self._row_freezes += freeze_experts(layer.experts, local, num_experts // ep_size)

    def after_backward(self, model: torch.nn.Module) -> None:
        for param, freeze, _ in self._row_freezes:
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                grad.copy_(freeze.mask_grad(grad))

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        for param, freeze, snapshot in self._row_freezes:
            freeze.restore_(param, snapshot)
        super().after_optimizer_step(model)
