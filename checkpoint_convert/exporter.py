"""megatron_ec checkpoint -> HF directory that stock transformers loads.

One process: the checkpoint (any layout) is loaded at TP1/EP1 in the dtype it was stored in, a chunk
of decoder layers at a time (`model.layer_groups`); each chunk's HF tensors are streamed into
safetensors shards whose headers are planned from the rule table, and the chunk is released before
the next is loaded (peak memory: about a chunk plus Python, not the model).
Tensors get the hub's per-expert names, vocab padding is trimmed, and the dtype is the original
HF dtype unless `--dtype` says otherwise. The routing state goes to `megatron_ec_routing.json`
(see `megatron_ec.moe.methods.saved`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from checkpoint_convert.errors import ConversionError
from checkpoint_convert.importer import DTYPE_NAMES, family_for
from checkpoint_convert.mapping import Entry, expand, group_to_hf, hf_groups, megatron_name
from checkpoint_convert.model import (
    build_model,
    group_key,
    layer_groups,
    load_groups,
    open_checkpoint,
    set_routing_state,
)
from checkpoint_convert.outputs import check_output, copy_tokenizer, staged_directory
from checkpoint_convert.load import expected_hf_shapes
from checkpoint_convert.memory import map_large_buffers
from checkpoint_convert.shards import Planned, plan_shards, write_shards
from megatron_ec.data.templates import record_training_template
from megatron_ec.models.ckpt_dir import TOKENIZER, WEIGHTS
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family
from megatron_ec.moe.methods.saved import write_routing_file
from megatron_ec.parallel import ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def stored_precision(weights_dir: Path) -> str:
    """The parameter dtype the checkpoint was written with, read off its embedding table (norms
    and routing buffers are fp32 even in bf16 models)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(weights_dir))
    embedding = metadata.get("embedding.word_embeddings.weight")
    return "bf16" if getattr(embedding, "dtype", None) == torch.bfloat16 else "fp32"


def ordered_groups(entries: list[Entry], load_order: list[frozenset[str]]
                   ) -> list[list[list[Entry]]]:
    """`hf_groups(entries)` per chunk of `layer_groups`, in load order, so that each chunk is
    written out as soon as it is loaded."""
    index = {key: i for i, keys in enumerate(load_order) for key in keys}
    chunks: list[list[list[Entry]]] = [[] for _ in load_order]
    for group in hf_groups(entries):
        chunks[index[group_key(group[0].megatron)]].append(group)
    return chunks


def hf_plan(groups: list[list[Entry]], cfg: MoEModelConfig, params: dict[str, torch.Tensor],
            dtype: torch.dtype) -> list[Planned]:
    """Name, shape and dtype of every HF tensor, in the order `hf_tensors` produces them."""
    unmapped = sorted(set(params) - {entry.megatron for group in groups for entry in group})
    if unmapped:
        raise RuntimeError(f"the family has no rule for Megatron parameters {unmapped[:3]}")
    return [Planned(name, shape, dtype) for group in groups
            for name, shape in zip(group[0].hf, expected_hf_shapes(
                group[0], tuple(params[group[0].megatron].shape), cfg))]


def hf_tensors(groups: list[list[Entry]], cfg: MoEModelConfig, params: dict[str, torch.Tensor],
               dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every group, from TP1/EP1 Megatron tensors, one at a time
    (a stacked-experts rule: one layer's E experts at a time). A tensor already in `dtype` and
    contiguous is the parameter's own memory (the writer only reads it)."""
    for group in groups:
        entry = group[0]
        for name, tensor in zip(entry.hf, group_to_hf(group, cfg, params), strict=True):
            if entry.rule.pads_vocab:
                tensor = tensor[: cfg.vocab_size]
            yield name, tensor.detach().to(dtype).contiguous()


def _streamed(model: torch.nn.Module, weights_dir: Path, groups: list,
              tensors: list[Iterator]) -> Iterator[tuple[str, torch.Tensor]]:
    """Load one chunk of layers, yield its HF tensors, release its parameters; then the next.
    Peak memory: about one chunk, not the model (parameters not yet loaded are never touched)."""
    for keys, chunk_tensors in zip(load_groups(model, weights_dir, groups), tensors):
        yield from chunk_tensors
        for name, param in model.named_parameters():
            if group_key(name) in keys:
                param.data = param.data.new_empty(0)


def exported_config(family: Family, cfg: MoEModelConfig, meta: dict, dtype: torch.dtype) -> dict:
    config = family.to_hf_config(cfg, meta["hf_config"])
    config.pop("torch_dtype", None)
    config["dtype"] = DTYPE_NAMES[dtype]
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_hf(ckpt: str | Path, out: str | Path, dtype: str | None = None,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the HF directory of a megatron_ec checkpoint to `out`; returns `out`.

    Args:
        ckpt: checkpoint root (uses `latest`) or an iteration directory.
        out: the HF output directory (absent or empty unless `overwrite`).
        dtype: "fp32", "bf16" or "fp16"; None = the dtype of the imported HF weights.
        overwrite: replace a non-empty `out` (only once the new one is complete).
        max_shard_bytes: start a new safetensors shard beyond this size.
    """
    from megatron_ec.moe.state import selection_biases
    from megatron_ec.parallel import init_parallel

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("export", "runs in one process",
                              "launch it with python, not torchrun")
    out = Path(out)
    check_output(out, overwrite)
    iteration, meta, cfg, method = open_checkpoint(ckpt)
    family = family_for(meta["family"], str(iteration / "model.json"))
    out_dtype = DTYPES[dtype] if dtype else getattr(torch, meta.get("hf_dtype", "float32"))
    map_large_buffers()
    init_parallel(ParallelConfig(), seed=0)
    weights = iteration / WEIGHTS
    model = build_model(family, cfg, method, ParallelConfig(), stored_precision(weights))
    set_routing_state(model, method)
    params = {megatron_name(name): p for name, p in model.named_parameters()}
    load = layer_groups(model)
    chunks = ordered_groups(expand(family, cfg), [keys for keys, _ in load])
    plan = hf_plan([group for chunk in chunks for group in chunk], cfg, params, out_dtype)
    shards = plan_shards(plan, max_shard_bytes)
    with staged_directory(out) as staging:
        write_shards(staging, shards, _streamed(
            model, weights, load, [hf_tensors(chunk, cfg, params, out_dtype) for chunk in chunks]))
        _write_json(staging / "config.json", exported_config(family, cfg, meta, out_dtype))
        if meta.get("generation_config") is not None:
            _write_json(staging / "generation_config.json", meta["generation_config"])
        copy_tokenizer(iteration / TOKENIZER, staging)
        write_routing_file(staging, method, selection_biases(model))
        record_training_template(iteration, staging)  # the prompt layout evaluation must use
    return out
