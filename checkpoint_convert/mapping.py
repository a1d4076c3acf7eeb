"""A family's rule table expanded for one model: one entry per Megatron tensor, with its HF names.

Names are TP1/EP1 Megatron names with global expert ids in SequentialMLP naming
(`megatron_ec.models.layout`); `megatron_name()` brings any backend's parameter name to that form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family, Rule
from megatron_ec.models.layout import global_expert_name

# Transformer Engine layer specs (GPU) fuse the pre-attention/pre-MLP norm into the next linear
# layer; our rules use the local (CPU) names. Not exercised on this CPU-only machine.
_TE_NORM_NAMES = (
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
)
_EXPERT_ID = re.compile(r"\.local_experts\.\d+\.")


@dataclass(frozen=True)
class Entry:
    """One Megatron tensor and the HF tensors its rule maps it to."""

    megatron: str
    hf: tuple[str, ...]
    rule: Rule
    expert: int | None = None
    """Global expert id of an expert rule's entry (the dim-0 index of stacked HF tensors)."""

    def to_megatron(self, hf_tensors: Sequence[torch.Tensor], cfg: MoEModelConfig
                    ) -> torch.Tensor:
        """This entry's Megatron tensor from the HF tensors its names hold (stacked: all
        experts, of which this entry takes its own)."""
        if self.rule.stacked_experts:
            hf_tensors = [tensor[self.expert] for tensor in hf_tensors]
        return self.rule.to_megatron(hf_tensors, cfg)


def fill(pattern: str, layer: int | None = None, expert: int | None = None) -> str:
    """Substitute the {layer} and {expert} placeholders of a name pattern."""
    return pattern.replace("{layer}", str(layer)).replace("{expert}", str(expert))


def pattern_regex(pattern: str) -> re.Pattern:
    """A regex matching the names of `pattern`, with groups `layer` and `expert`."""
    groups = {"{layer}": r"(?P<layer>\d+)", "{expert}": r"(?P<expert>\d+)"}
    pieces = re.split(r"(\{layer\}|\{expert\})", pattern)
    return re.compile("".join(groups.get(p, re.escape(p)) for p in pieces) + r"\Z")


def _rule_layers(rule: Rule, cfg: MoEModelConfig):
    if "{layer}" not in rule.megatron:
        return [None]
    return {"all": range(cfg.num_layers), "moe": cfg.moe_layers,
            "dense": cfg.dense_layers}[rule.layers]


def expand(family: Family, cfg: MoEModelConfig) -> list[Entry]:
    """Every entry of `family`'s table for `cfg`, in table order (layer-major within a rule)."""
    entries = []
    for rule in family.rules(cfg):
        experts = range(cfg.num_experts) if "{expert}" in rule.megatron else [None]
        for layer in _rule_layers(rule, cfg):
            for expert in experts:
                hf = tuple(fill(name, layer, expert) for name in rule.hf)
                entries.append(Entry(fill(rule.megatron, layer, expert), hf, rule, expert))
    _check_unique(family, entries)
    return entries


def _check_unique(family: Family, entries: list[Entry]) -> None:
    seen: set[str] = set()
    hf_names = [h for group in hf_groups(entries) for h in group[0].hf]
    for name in [e.megatron for e in entries] + hf_names:
        if name in seen:
            raise RuntimeError(f"family {family.model_type}: {name} appears in two rules")
        seen.add(name)


def hf_groups(entries: list[Entry]) -> Iterator[list[Entry]]:
    """The entries that produce one set of HF tensors together, in table order: one entry, or
    the E consecutive entries of a stacked-experts rule's layer (same HF names)."""
    group: list[Entry] = []
    for entry in entries:
        if group and not (entry.rule.stacked_experts and entry.hf == group[0].hf):
            yield group
            group = []
        group.append(entry)
    if group:
        yield group


def group_to_hf(group: list[Entry], cfg: MoEModelConfig,
                tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The HF tensors (in `group[0].hf` order) of a group's Megatron `tensors` (by name);
    stacked experts are stacked on dim 0 in expert order."""
    outputs = [entry.rule.to_hf(tensors[entry.megatron], cfg) for entry in group]
    if not group[0].rule.stacked_experts:
        (only,) = outputs
        return list(only)
    return [torch.stack(parts) for parts in zip(*outputs, strict=True)]


def megatron_name(name: str, expert_offset: int = 0) -> str:
    """A rank's parameter name -> its TP1/EP1 name (global expert id, local-backend spelling)."""
    name = global_expert_name(name.removeprefix("module."), expert_offset)
    for pattern, local in _TE_NORM_NAMES:
        match = pattern.search(name)
        if match:
            return name[: match.start()] + local
    return name


def shape_key(name: str) -> str:
    """The name with its expert id wildcarded: all experts of a layer share their shapes."""
    return _EXPERT_ID.sub(".local_experts.*.", name)
