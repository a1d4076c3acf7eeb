"""SFT (METHODS.md s.1): the family's own routing, everything trainable, optional aux loss."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ec.moe.methods.base import Method, MethodConfig, MoEFacts
from megatron_ec.moe.methods.registry import register


@dataclass(frozen=True)
class SFTConfig(MethodConfig):
    """`method:` of plain supervised fine-tuning."""

    name: str = "sft"
    aux_loss: bool = False
    """Add the family's load-balancing loss with the family's coefficient (paper ablation
    "with-aux"; off = "aux-free")."""


@register
class SFT(Method):
    """The family's routing; the bias is measured for metrics but never moves."""

    name = "sft"
    Config = SFTConfig

    def aux_loss_coeff(self, facts: MoEFacts) -> float:
        return facts.aux_loss_coeff if self.config.aux_loss else 0.0
