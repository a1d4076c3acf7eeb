"""The family-adapter contract: what one HF `model_type` must provide, and the registry.

A family file (`megatron_ec/models/<model_type>.py`) is data first:
- `to_model_config(hf_config)`: HF config -> `MoEModelConfig` (every field the family sets, and an
  error for HF settings we do not support);
- `to_hf_config(model_cfg, original)`: back to an HF config dict (MoE fields unchanged);
- `rules(model_cfg)`: a table of `Rule`s mapping TP1/EP1 Megatron parameter names (global expert
  ids, as `megatron_ec.models.layout.full_tensors` names them) to HF tensor names, each with a pair
  of transforms; sharding over TP/EP is NOT the family's business (layout.py does it);
- `ignored_hf_keys`: regexes of HF tensors that are deliberately not mapped (e.g. rotary caches);
- `hf_aliases` and `fused_experts`: other on-disk spellings of the same tensors, accepted on import
  (e.g. transformers v5's fused `[E, ...]` expert tensors written by
  `save_pretrained(save_original_format=False)`); export always writes the canonical names of
  `rules`, i.e. the per-expert layout of the hub checkpoints;
- `attention_hook(model_cfg)`: an optional quirk that edits the Megatron block spec (OLMoE's
  full-width QK-norm), or None;
- `mxfp4_tensors`: HF name patterns that a checkpoint may store MXFP4-quantised as
  `<name>_blocks` + `<name>_scales` (GPT-OSS experts); import dequantises them, export writes
  the plain tensor;
- `hf_gate`: the `GateAdapter` that finds and swaps the router of the family's HF MoE blocks, so
  an exported model routes like the trained one (`megatron_ec.models.hf_restore`).

Names in rules use `{layer}` and `{expert}` placeholders; `layers` says which layers a rule covers.

Transforms see whole tensors on export. On import each rank may read only its tensor-parallel
slice: every HF tensor of a rule is cut into equal pieces along the Megatron parameter's partition
dim and `to_megatron` gets the pieces, so it must commute with that cut (identity, per-head QKV
fusion and [gate; up] do; derive head counts from tensor sizes, not from the config). A rule whose
transform does not commute sets `shardable=False` and gets whole tensors.

A rule with `stacked_experts=True` maps one expert's Megatron tensor to HF tensors that hold EVERY
expert of the layer on dim 0 (GPT-OSS's `mlp.experts.gate_up_proj [E, H, 2I]`): its HF patterns
have {layer} but no {expert}; the converter hands `to_megatron` expert e's slices `hf[e]` (whole,
never TP-cut) and stacks the E results of `to_hf` on export, so both transforms stay per expert.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.hf_gate import GateAdapter

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
    pads_vocab: bool = False
    """Dim 0 is the vocabulary: Megatron holds `padded_vocab_size` rows; the extra rows are zero on
    import and trimmed on export (embeddings, output layer)."""
    shardable: bool = True
    """`to_megatron` commutes with cutting the HF tensors along the TP partition dim (see above)."""
    stacked_experts: bool = False
    """The HF tensors hold all experts of the layer on dim 0 (see above); implies whole reads."""

    def __post_init__(self) -> None:
        if self.layers not in ("all", "moe", "dense"):
            raise ValueError(f"Rule {self.megatron}: layers={self.layers!r}; use all, moe or dense")
        if self.stacked_experts and ("{expert}" not in self.megatron
                                     or any("{expert}" in name for name in self.hf)):
            raise ValueError(f"Rule {self.megatron}: stacked_experts needs {{expert}} in the "
                             "Megatron pattern and not in the HF patterns")


@dataclass(frozen=True)
class FusedExperts:
    """One HF tensor holding a projection of every expert of a layer, `[E, rows, ...]`.

    transformers v5 keeps experts fused in memory (`mlp.experts.gate_up_proj [E, 2I, H]`) and
    writes them fused with `save_pretrained(save_original_format=False)`. On import the fused
    tensor is read as the per-expert tensors in `parts`, which split `rows` into equal blocks in
    order (gate_up_proj[e] = [gate_proj[e]; up_proj[e]]).
    """

    fused: str
    """HF name pattern of the fused tensor, with {layer}."""
    parts: tuple[str, ...]
    """Canonical per-expert HF name patterns (with {layer} and {expert}) it holds, in row order."""


class Family(ABC):
    """Base class of family adapters; subclasses set `model_type` and implement the methods."""

    model_type: ClassVar[str] = ""
    ignored_hf_keys: ClassVar[tuple[str, ...]] = ()
    hf_aliases: ClassVar[dict[str, str]] = {}
    """Other on-disk name pattern -> canonical HF name pattern (placeholders {layer}, {expert})."""
    fused_experts: ClassVar[tuple[FusedExperts, ...]] = ()
    mxfp4_tensors: ClassVar[tuple[str, ...]] = ()
    """HF name patterns (with {layer}) that may be stored as MXFP4 `_blocks`/`_scales` pairs."""
    hf_gate: ClassVar[GateAdapter | None] = None
    """The HF MoE block's router, swapped by `restore_condenser_routing`; None = not supported."""

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
