"""HF directory -> megatron_ec checkpoint (torch_dist weights at any TP/EP layout + metadata).

Stages, cheapest first so that user mistakes fail in seconds and before anything is written:
output directory, config and family, layout divisibility, weight files and tensor names (headers
only), then Megatron-Core: build this rank's model, check shapes, read this rank's slices, and
write through the staging/publish protocol of `megatron_ec.models.ckpt_dir`.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint_convert.errors import ConversionError
from checkpoint_convert.hf_checkpoint import HFCheckpoint
from checkpoint_convert.load import check_names, load_hf
from checkpoint_convert.mapping import expand
from checkpoint_convert.memory import map_large_buffers
from checkpoint_convert.model import build_model, precision_for, set_routing_state
from checkpoint_convert.outputs import (
    check_input_dir,
    check_output,
    copy_tokenizer,
    remove_all_but,
)
from megatron_ec.models.ckpt_dir import (
    LATEST,
    TOKENIZER,
    WEIGHTS,
    iteration_name,
    publish,
    staging_dir,
    write_model_meta,
)
from megatron_ec.models.config import MoEModelConfig
from megatron_ec.models.family import Family, get_family
from megatron_ec.moe.methods import Method, make_method
from megatron_ec.moe.methods.saved import read_routing_file, save_method
from megatron_ec.parallel import ParallelConfig
from megatron_ec.textfile import TextFileError, read_json


@dataclass(frozen=True)
class ImportReport:
    """What `import_hf` did on this rank."""

    iteration: Path
    """The published iteration directory."""
    bytes_read: int
    """HF tensor bytes this rank read (its slices only)."""
    bytes_total: int
    """HF tensor bytes of the whole checkpoint."""


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def family_for(model_type: str | None, where: str) -> Family:
    try:
        return get_family(str(model_type))
    except ValueError as err:
        raise ConversionError.wrap(where, err) from None


def read_hf_config(hf_dir: Path):
    """(family, transformers config) of an HF directory; the family is checked before transformers
    parses the config, so an unknown model_type lists the supported ones."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(str(path), "missing", "pass a directory written by save_pretrained")
    config = read_json_file(path, "repair the file or re-save the model with save_pretrained")
    if not isinstance(config, dict):
        raise ConversionError(str(path), f"not a JSON object but a {type(config).__name__}",
                              "repair the file or re-save the model with save_pretrained")
    family = family_for(config.get("model_type"), str(path))
    from transformers import AutoConfig

    return family, AutoConfig.from_pretrained(hf_dir)


def read_json_file(path: Path, fix: str):
    """The JSON of a file; a ConversionError at `file:line` if it is not UTF-8 JSON."""
    try:
        return read_json(path, fix)
    except TextFileError as err:
        raise ConversionError(err.location, err.problem, err.fix) from None


def model_config(family: Family, hf_config, where: str) -> MoEModelConfig:
    try:
        return family.to_model_config(hf_config)
    except ValueError as err:
        raise ConversionError.wrap(where, err) from None


def check_layout(cfg: MoEModelConfig, parallel: ParallelConfig) -> None:
    """The model splits evenly over the requested TP/EP layout."""
    tp, ep = parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size
    checks = [
        ("--ep", ep, cfg.num_experts, f"{cfg.num_experts} experts"),
        ("--etp", etp, cfg.moe_ffn_hidden_size, f"expert size {cfg.moe_ffn_hidden_size}"),
        ("--tp", tp, cfg.kv_heads, f"{cfg.kv_heads} KV heads (query groups)"),
        ("--tp", tp, cfg.num_attention_heads, f"{cfg.num_attention_heads} attention heads"),
        ("--tp", tp, cfg.ffn_hidden_size or 0, f"dense MLP size {cfg.ffn_hidden_size}"),
        ("--tp", tp, cfg.shared_expert_size, f"shared expert size {cfg.shared_expert_size}"),
    ]
    for flag, size, count, what in checks:
        if count % size:
            raise ConversionError(f"{flag} {size}", f"{what} do not split over {size} ranks",
                                  f"choose a {flag} that divides it")


def checkpoint_dtype(ckpt: HFCheckpoint, names: list[str]) -> torch.dtype:
    """The most common dtype of the mapped tensors (the dtype export writes by default)."""
    return Counter(ckpt.dtype(name) for name in names).most_common(1)[0][0]


def _agree(error: ConversionError | None) -> None:
    """Every rank raises the first rank's error, or none does (no rank left in a collective)."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        mine = None if error is None else (error.where, error.what, error.fix)
        dist.all_gather_object(errors, mine)
        errors = [e if e is None or isinstance(e, ConversionError) else ConversionError(*e)
                  for e in errors]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def hf_config_dict(hf_config) -> dict:
    """What `save_pretrained` writes as config.json (defaults left out), without local paths."""
    data = json.loads(hf_config.to_json_string(use_diff=True))
    data.pop("_name_or_path", None)
    return data


def read_generation_config(hf_dir: Path) -> dict | None:
    generation = hf_dir / "generation_config.json"
    if not generation.is_file():
        return None
    return read_json_file(generation, "repair or delete the file")


def _meta(family: Family, cfg: MoEModelConfig, hf_config, generation: dict | None,
          dtype) -> dict:
    return {
        "family": family.model_type,
        "model_config": cfg.to_dict(),
        "hf_config": hf_config_dict(hf_config),
        "padded_vocab_size": cfg.padded_vocab_size,
        "hf_dtype": DTYPE_NAMES.get(dtype, "float32"),
        "generation_config": generation,
    }


def _write(model, root: Path, meta: dict, method: Method, hf_dir: Path,
           overwrite: bool) -> Path:
    """Save through a staging directory; rank 0 writes the metadata and publishes."""
    from megatron_ec.models.dist_ckpt import save_model_weights

    rank0 = dist.get_rank() == 0
    created = not root.exists()
    staging = staging_dir(root, 0)
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    try:
        save_model_weights(model, staging / WEIGHTS)
        if rank0:
            write_model_meta(staging, meta)
            save_method(staging, method)
            copy_tokenizer(hf_dir, staging / TOKENIZER)
        dist.barrier()
        if rank0:
            publish(root, 0)
            if overwrite:
                remove_all_but(root, {iteration_name(0), LATEST})
    except BaseException:
        if rank0:
            shutil.rmtree(root if created else staging, ignore_errors=True)
        raise
    dist.barrier()
    return root / iteration_name(0)


def _checked_inputs(hf_dir: Path, out: Path, parallel: ParallelConfig, overwrite: bool):
    check_input_dir(hf_dir, "--hf", "the HF model directory (save_pretrained layout)")
    check_output(out, overwrite)
    family, hf_config = read_hf_config(hf_dir)
    cfg = model_config(family, hf_config, str(hf_dir / "config.json"))
    check_layout(cfg, parallel)
    ckpt = HFCheckpoint(hf_dir, family)
    entries = expand(family, cfg)
    check_names(ckpt, entries, family)
    return family, hf_config, cfg, ckpt, entries


def check_import(hf_dir: str | Path, out: str | Path,
                 parallel: ParallelConfig = ParallelConfig()) -> MoEModelConfig:
    """What `import_hf` checks before it starts the process group (output path, config.json and
    family, layout, weight files and tensor names from the headers), on one process, writing
    nothing; returns the model config. ConversionError (a ValueError) on a problem."""
    return _checked_inputs(Path(hf_dir), Path(out), parallel, overwrite=False)[2]


def import_hf(hf_dir: str | Path, out: str | Path, parallel: ParallelConfig = ParallelConfig(),
              overwrite: bool = False) -> ImportReport:
    """Convert an HF directory into a megatron_ec checkpoint at `out`.

    Runs in one process or on every rank of a torchrun launch (each rank reads only its slices).
    """
    hf_dir, out = Path(hf_dir), Path(out)
    family, hf_config, cfg, ckpt, entries = _checked_inputs(hf_dir, out, parallel, overwrite)
    generation = read_generation_config(hf_dir)
    method, biases = read_routing_file(hf_dir) or (make_method("sft"), None)
    dtype = checkpoint_dtype(ckpt, [name for entry in entries for name in entry.hf])

    from megatron_ec.parallel import init_parallel

    map_large_buffers()
    init_parallel(parallel, seed=0)
    model = build_model(family, cfg, method, parallel, precision_for(dtype))
    error = None
    try:
        load_hf(model, family, cfg, ckpt)
    except ConversionError as err:
        error = err
    _agree(error)
    set_routing_state(model, method, biases)
    meta = _meta(family, cfg, hf_config, generation, dtype)
    iteration = _write(model, out, meta, method, hf_dir, overwrite)
    return ImportReport(iteration, ckpt.bytes_read, ckpt.total_bytes())
