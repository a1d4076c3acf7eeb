"""Learning-rate schedule: linear warmup, then cosine decay to a floor (HF `cosine_with_min_lr`).

Step `i` is the 0-based index of the optimizer step about to run. Warmup ramps linearly and reaches
the peak at the last warmup step: lr_i = peak * (i + 1) / warmup for i < warmup, so the first step
already trains (HF starts at 0 and wastes one step). Afterwards

    lr_i = floor + (peak - floor) * (1 + cos(pi * (i - warmup) / (total - warmup))) / 2

with floor = peak * min_lr_ratio; the last step runs at just above the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """The schedule of one phase; a pure function of the step index (nothing to checkpoint)."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.1

    @classmethod
    def from_ratio(cls, peak_lr: float, total_steps: int, warmup_ratio: float,
                   min_lr_ratio: float) -> "WarmupCosine":
        """Warmup of `round(warmup_ratio * total_steps)` steps (HF rounds up; we round)."""
        warmup = min(total_steps - 1, round(warmup_ratio * total_steps)) if total_steps > 1 else 0
        return cls(peak_lr, total_steps, max(0, warmup), min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        floor = self.peak_lr * self.min_lr_ratio
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return {"peak_lr": self.peak_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio}
