"""The family-adapter contract: what one HF `model_type` must provide, and the registry.

A family file (`megatron_ec/models/<model_type>.py`) is data first:
- `to_model_config(hf_config)`: HF config -> `MoEModelConfig` (every field the family sets, and an
  error for HF settings we do not support);
- `to_hf_config(model_cfg, original)`: back to an HF config dict (MoE fields unchanged);
- `rules(model_cfg)`: a table of `Rule`s mapping TP1/EP1 Megatron parameter names (global expert
  ids, as `megatron_ec.models.layout.full_tensors` names them) to HF tensor names, each with a pair
  of transforms; sharding over TP/EP is NOT the family's business (layout.py does it);
- `ignored_hf_keys`: regexes of HF tensors that are deliberately not mapped (e.g. rotary caches);
- `attention_hook(model_cfg)`: an optional quirk that edits the Megatron block spec (OLMoE's
  full-width QK-norm), or None.

Names in rules use `{layer}` and `{expert}` placeholders; `layers` says which layers a rule covers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from megatron_ec.models.config import MoEModelConfig

ToMegatron = Callable[[Sequence[torch.Tensor], MoEModelConfig], torch.Tensor]
ToHF = Callable[[torch.Tensor, MoEModelConfig], Sequence[torch.Tensor]]


def _single(tensors: Sequence[torch.Tensor], cfg: MoEModelConfig) -> torch.Tensor:
    (tensor,) = tensors
    return tensor


def _as_list(tensor: torch.Tensor, cfg: MoEModelConfig) -> Sequence[torch.Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor <-> one or more HF tensors."""

    megatron: str
    """TP1/EP1 Megatron name pattern, e.g. "decoder.layers.{layer}.mlp.router.weight"."""
    hf: tuple[str, ...]
    """HF name patterns, in the order the transforms take/return them."""
    to_megatron: ToMegatron = _single
    to_hf: ToHF = _as_list
    layers: str = "all"
    """Which layers the rule covers: "all", "moe" (MoE layers) or "dense" (dense-MLP layers);
    patterns without {layer} are global."""


class Family(ABC):
    """Base class of family adapters; subclasses set `model_type` and implement the methods."""

    model_type: ClassVar[str] = ""
    ignored_hf_keys: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def to_model_config(self, hf_config) -> MoEModelConfig:
        ...

    @abstractmethod
    def to_hf_config(self, model_cfg: MoEModelConfig, original: dict) -> dict:
        ...

    @abstractmethod
    def rules(self, model_cfg: MoEModelConfig) -> list[Rule]:
        ...

    def attention_hook(self, model_cfg: MoEModelConfig):
        return None


FAMILIES: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: register a family adapter under its HF `model_type`."""
    if not cls.model_type or cls.model_type in FAMILIES:
        raise ValueError(f"family {cls.__name__}: missing or duplicate model_type {cls.model_type!r}")
    FAMILIES[cls.model_type] = cls()
    return cls


def get_family(model_type: str) -> Family:
    """The adapter for an HF `model_type`, or a ValueError listing the supported ones."""
    import megatron_ec.models.families  # noqa: F401  (registers every family)

    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
