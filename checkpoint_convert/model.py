"""The Megatron model the converter fills (import) or reads (export, verify).

Always assembled with the checkpoint's method (`megatron_ec.models.assembly`), as the trainer
builds it, so every MoE layer has its `selection_bias` buffer and routes as the method says.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch

from checkpoint_convert.errors import ConversionError
from megatron_ec.models.ckpt_dir import WEIGHTS, read_model_meta, resolve
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family, get_family
from megatron_ec.moe.methods import Method
from megatron_ec.moe.methods.saved import load_method
from megatron_ec.parallel import ParallelConfig
from megatron_ec.textfile import TextFileError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def precision_for(dtype: torch.dtype) -> str:
    """Megatron parameter dtype for HF weights: bf16 stays bf16, anything else is held in fp32
    (fp16 -> fp32 is exact, and export casts back)."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def build_model(family: Family, cfg: MoEModelConfig, method: Method,
                parallel: ParallelConfig, precision: str = "fp32") -> torch.nn.Module:
    """This rank's `GPTModel`, uninitialised (every tensor is then loaded).

    Args:
        family: the family adapter (its attention hook edits the spec).
        cfg: the model.
        method: the checkpoint's method; sets the router slots (k + r in reference mode).
        parallel: the TP/EP layout; `init_parallel` must have run with it.
        precision: "fp32" or "bf16" parameters.
    """
    from megatron_ec.models.assembly import assemble_model
    from megatron_ec.models.builder import RuntimeOptions

    model, _ = assemble_model(cfg, method, parallel, RuntimeOptions(precision=precision),
                              family=family, initialize=False)
    return model


def set_routing_state(model: torch.nn.Module, method: Method,
                      biases: dict[int, torch.Tensor] | None = None) -> None:
    """Install the method's state (condensers) and, if given, the per-layer selection biases."""
    from megatron_ec.moe.state import load_selection_biases

    if biases is not None:
        load_selection_biases(model, biases)
    method.apply(model)


def open_checkpoint(ckpt: str | Path) -> tuple[Path, dict, MoEModelConfig, Method]:
    """(iteration dir, model.json, model config, method) of a megatron_ec checkpoint."""
    try:
        iteration = resolve(ckpt)
        meta = read_model_meta(iteration)
        cfg = MoEModelConfig.from_dict(meta["model_config"])
        return iteration, meta, cfg, load_method(iteration)
    except TextFileError as err:  # already `file:line: what; fix`
        raise ConversionError(err.location, err.problem, err.fix) from None
    except ValueError as err:
        raise ConversionError.wrap(str(ckpt), err) from None
    except (KeyError, TypeError) as err:
        raise ConversionError(str(ckpt), f"model.json lacks {err}", "re-import the checkpoint"
                              ) from None


LOAD_PARTS = 8
"""Decoder-layer chunks a checkpoint is loaded in (plus one for the embedding, final norm and
output layer). Each `dist_checkpointing.load` call re-reads the checkpoint's metadata, whose size
grows with the model, so the number of calls is fixed rather than one per layer; memory is about
1/8 of the model above what stays loaded."""


def layer_groups(model: torch.nn.Module, parts: int = LOAD_PARTS
                 ) -> list[tuple[frozenset[str], dict]]:
    """The model's sharded state dict in load order: `parts` chunks of consecutive decoder
    layers, then "other". Each chunk: (its `group_key`s, its sharded state dict). Chunks depend
    on layer indices only, so every rank makes the same number of (collective) loads."""
    by_key: dict[str, dict] = defaultdict(dict)
    for key, value in model.sharded_state_dict().items():
        by_key[group_key(key)][key] = value
    layers = sorted((k for k in by_key if k != "other"), key=int)
    size = max(1, -(-len(layers) // parts))
    chunks = [layers[i: i + size] for i in range(0, len(layers), size)]
    chunks += [["other"]] * ("other" in by_key)
    return [(frozenset(chunk), {k: v for key in chunk for k, v in by_key[key].items()})
            for chunk in chunks]


def load_groups(model: torch.nn.Module, weights_dir: Path,
                groups: list[tuple[frozenset[str], dict]] | None = None
                ) -> Iterator[frozenset[str]]:
    """Load torch_dist weights one chunk of `layer_groups` at a time, yielding each chunk's keys
    once it is in the model (a caller may write it out and release it before the next).

    Megatron-Core materialises merged copies of expert and gated-MLP tensors while loading, so a
    whole-model load briefly needs about twice the model; per chunk, only one chunk's copies.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    groups = layer_groups(model) if groups is None else groups
    expected = [k for k in model.state_dict() if not k.endswith("_extra_state")]
    loaded: set[str] = set()
    strategy = TorchDistLoadShardedStrategy(cache_metadata=True)  # metadata read once per load
    try:
        while groups:
            # Popped: dist_checkpointing.load fills the chunk's sharded objects with loaded copies.
            keys, group = groups.pop(0)
            state = dist_checkpointing.load(group, str(weights_dir), sharded_strategy=strategy)
            del group
            model.load_state_dict(state, strict=False)
            loaded |= state.keys()
            del state
            yield keys
    finally:
        CachedMetadataFileSystemReader.clear_metadata_cache()  # a later save may replace it
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise ConversionError(str(weights_dir), f"no tensor for {missing[0]}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}",
                              "was the checkpoint written for another model config?")


def load_by_layer(model: torch.nn.Module, weights_dir: Path) -> None:
    """Load torch_dist weights into the whole model, a chunk of decoder layers at a time."""
    for _ in load_groups(model, weights_dir):
        pass


def group_key(name: str) -> str:
    """The `layer_groups` key of a (TP1/EP1 or rank) parameter name."""
    match = _LAYER.match(name.removeprefix("module."))
    return match.group(1) if match else "other"


def load_megatron(ckpt: str | Path, parallel: ParallelConfig = ParallelConfig(),
                  precision: str = "fp32") -> tuple[torch.nn.Module, dict, MoEModelConfig]:
    """This rank's model of a checkpoint at `parallel` (init_parallel must have run with it)."""
    iteration, meta, cfg, method = open_checkpoint(ckpt)
    model = build_model(get_family(meta["family"]), cfg, method, parallel, precision)
    load_by_layer(model, iteration / WEIGHTS)
    set_routing_state(model, method)
    return model, meta, cfg
