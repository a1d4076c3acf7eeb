"""What a router does beyond its family's routing rule: the method's part, as plain data.

A method hands a `RouterPolicy` to every router it builds (`ECRouter` in Megatron-Core, the
restored gate of an exported HF model), so neither router asks which method is running.
"""

from __future__ import annotations

from dataclasses import dataclass

USAGE_SIGNALS = ("soft", "hard")
DIRECTIONS = ("sparsify", "balance")


@dataclass(frozen=True)
class BiasUpdate:
    """The once-per-optimizer-step sign update of the selection bias (METHODS.md s.2)."""

    gamma: float
    """Step size per optimizer step."""
    direction: str
    """"sparsify" (ExpertCondenser: b += gamma sign(u - mean u)) or "balance" (DeepSeek-V3)."""


@dataclass(frozen=True)
class RouterPolicy:
    """How a router selects, measures and updates, besides the family's rule."""

    select_with_bias: bool = False
    """Add the selection bias to the selection key (aux-loss-free bias routing)."""
    usage_signal: str = "soft"
    """What the per-step expert usage counts: "soft" (sum of softmax(s + b)) or "hard" (selection
    counts). Measured for every method (metrics); it drives the bias only with `bias_update`."""
    bias_update: BiasUpdate | None = None
    """Move the bias once per optimizer step from the step's usage; None = the bias stays."""

    def __post_init__(self) -> None:
        if self.usage_signal not in USAGE_SIGNALS:
            raise ValueError(f"usage_signal={self.usage_signal!r}: use one of soft, hard")
        if self.bias_update is not None and self.bias_update.direction not in DIRECTIONS:
            raise ValueError(f"direction={self.bias_update.direction!r}: use sparsify or balance")
