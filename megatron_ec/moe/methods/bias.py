"""Aux-loss-free bias routing (METHODS.md s.2): select on s + b, move b once per step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_ec.moe.methods.base import Method, MethodConfig, MoEFacts
from megatron_ec.moe.methods.registry import register
from megatron_ec.moe.policy import DIRECTIONS, USAGE_SIGNALS, BiasUpdate, RouterPolicy
from megatron_ec.moe.routing import RoutingConfig

CONDENSER_MODES = ("paper", "reference")


@dataclass(frozen=True)
class BiasConfig(MethodConfig):
    """`method:` of bias routing (the ExpertCondenser recipe's phase 1)."""

    name: str = "bias"
    condenser_mode: str = "paper"
    """"paper" (Eq. 2-3: k experts, r of them condensers, unbiased gate weights) or "reference"
    (public code: top-k plus r appended condensers, gate weights from the biased softmax, also
    in the bias phase)."""
    gamma: float = 1e-4
    """Bias update rate per optimizer step (paper: 1e-4 DeepSeek-V2-Lite/OLMoE, 5e-5 Qwen1.5)."""
    direction: str = "sparsify"
    """"sparsify" (ExpertCondenser: popular experts up, rare ones down) or "balance"
    (DeepSeek-V3 / Megatron-Core aux-free balancing)."""
    usage_signal: str = "soft"
    """"soft" (sum of softmax(s + b) over tokens, reference code) or "hard" (selection counts)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"condenser_mode": CONDENSER_MODES, "direction": DIRECTIONS,
                   "usage_signal": USAGE_SIGNALS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"method.{key}={getattr(self, key)!r}: use one of "
                                 f"{', '.join(allowed)}")
        if self.gamma < 0:
            raise ValueError(f"method.gamma={self.gamma} must be >= 0")


@register
class BiasRouting(Method):
    """Selection key s + b (sigmoid(s) + b for sigmoid routers); b moves once per step."""

    name = "bias"
    Config = BiasConfig

    def routing(self, facts: MoEFacts) -> RoutingConfig:
        return dataclasses.replace(facts.routing, condenser_mode=self.config.condenser_mode)

    def router_policy(self) -> RouterPolicy:
        update = BiasUpdate(gamma=self.config.gamma, direction=self.config.direction)
        return RouterPolicy(select_with_bias=True, usage_signal=self.config.usage_signal,
                            bias_update=update)
