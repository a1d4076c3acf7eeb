"""Method state: everything needed to rebuild a run's routing exactly, saved with every checkpoint.

The per-layer selection bias itself is a persistent fp32 buffer of each router (it is a tensor and
lives in the torch_dist checkpoint with the weights); this dataclass holds the rest. It is written
as `method_state.json` next to the weights in every Megatron checkpoint and carried into exported
HF directories (see `checkpoint_convert`), so evaluation can restore the routing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ec.textfile import read_json

METHODS = ("sft", "bias", "condenser")
METHOD_STATE_FILE = "method_state.json"


@dataclass
class MethodState:
    """The routing method of a run (recipe section `method`), plus the condensers once chosen."""

    name: str = "sft"
    """"sft" (the family's routing), "bias" (aux-free bias routing, phase 1) or "condenser"
    (bias routing + condenser experts, phase 2). ESFT and DenseMixer will join this list."""
    aux_loss: bool = False
    """SFT only: add the family's load-balancing loss (paper ablation "with-aux")."""
    condenser_mode: str = "paper"
    """"paper" (Eq. 2-3: k experts, r of them condensers, unbiased gate weights) or "reference"
    (public code: top-k plus r appended condensers, gate weights from the biased softmax)."""
    gamma: float = 1e-4
    """Bias update rate per optimizer step (paper: 1e-4 DeepSeek-V2-Lite/OLMoE, 5e-5 Qwen1.5)."""
    direction: str = "sparsify"
    """"sparsify" (ExpertCondenser: popular experts up, rare ones down) or "balance"
    (DeepSeek-V3 / Megatron-Core aux-free balancing)."""
    usage_signal: str = "soft"
    """"soft" (sum of softmax(s + b) over tokens, reference code) or "hard" (selection counts)."""
    num_condensers: int | list[int] = 2
    """r per MoE layer: one int for all, or a list with one entry per MoE layer (0 disables)."""
    condensers: dict[int, list[int]] = field(default_factory=dict)
    """Chosen condensers: {layer index (0-based, all decoder layers): expert ids}. Empty until the
    condenser phase starts; then fixed for the rest of training, export and evaluation."""
    force_condensers: bool = True
    """False drops the forcing at evaluation (paper Sec. 6.3 persistent-path ablation). An
    evaluation switch only: a training config with false is refused (it would train bias-only)."""

    def __post_init__(self) -> None:
        choices = {"name": METHODS, "condenser_mode": ("paper", "reference"),
                   "direction": ("sparsify", "balance"), "usage_signal": ("soft", "hard")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"method.{key}={getattr(self, key)!r}: use one of {', '.join(allowed)}")
        if self.gamma < 0:
            raise ValueError(f"method.gamma={self.gamma} must be >= 0")
        self.condensers = {int(k): [int(e) for e in v] for k, v in self.condensers.items()}

    @property
    def uses_bias(self) -> bool:
        return self.name in ("bias", "condenser")

    def condensers_for(self, moe_layers: list[int] | tuple[int, ...]) -> dict[int, int]:
        """r per MoE layer index, validated against the model's MoE layers."""
        if isinstance(self.num_condensers, int):
            return {layer: self.num_condensers for layer in moe_layers}
        if len(self.num_condensers) != len(moe_layers):
            raise ValueError(
                f"method.num_condensers has {len(self.num_condensers)} entries but the model has "
                f"{len(moe_layers)} MoE layers; give one r per MoE layer or a single int"
            )
        return dict(zip(moe_layers, self.num_condensers))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["condensers"] = {str(k): v for k, v in sorted(self.condensers.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MethodState":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"method state: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / METHOD_STATE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "MethodState":
        path = Path(directory) / METHOD_STATE_FILE
        try:
            return cls.from_dict(read_json(path, "restore the file from the checkpoint"))
        except FileNotFoundError:
            raise ValueError(f"{path}: missing; is {directory} a megatron_ec checkpoint?") from None
