"""A family's rule table expanded for one model: one entry per Megatron tensor, with its HF names.

Names are TP1/EP1 Megatron names with global expert ids in SequentialMLP naming
(`megatron_ec.models.layout`); `megatron_name()` brings any backend's parameter name to that form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
                entries.append(Entry(fill(rule.megatron, layer, expert), hf, rule))
    _check_unique(family, entries)
    return entries


def _check_unique(family: Family, entries: list[Entry]) -> None:
    seen: set[str] = set()
    for name in [e.megatron for e in entries] + [h for e in entries for h in e.hf]:
        if name in seen:
            raise RuntimeError(f"family {family.model_type}: {name} appears in two rules")
        seen.add(name)


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
