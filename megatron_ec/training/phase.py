"""One phase, as both CLIs run it: check, set up (collective), run; and loading its config.

`check_phase` validates a phase on one process and writes nothing (but `data.cache_dir`, when
set). `setup_phase` raises every user error before anything is written to `output.dir` (an
`output.dir` the failed setup created is removed). `run_phase` trains to completion; errors
from there on are bugs and keep their traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from megatron_ec.training.launch import USER_ERRORS, is_rank0, world_size


def validate_for_world(cfg, num_ranks: int) -> None:
    """Checks that need the number of ranks; raise ValueError with a fix-it message."""
    import torch

    from megatron_ec.parallel import check_layout

    check_layout(num_ranks, cfg.parallel)
    cfg.train.accumulation_steps(num_ranks // cfg.parallel.tensor_model_parallel_size)
    if cfg.train.precision != "fp32" and not torch.cuda.is_available():
        raise ValueError(f"train.precision={cfg.train.precision} needs a GPU (Megatron's optimizer "
                         "keeps fp32 master weights; it does not run on CPU); use train.precision=fp32")


def build_datasets(cfg, start, write_cache: bool, tokenizer_dir: Path | None = None):
    """(training split, validation split or None), tokenised with the starting checkpoint's
    tokenizer (or the one in `tokenizer_dir`) through the same pipeline (templates, masks,
    packing, cache)."""
    from megatron_ec.data import build_sft_dataset, load_tokenizer
    from megatron_ec.models import ckpt_dir

    tokenizer_dir = tokenizer_dir or start.source / ckpt_dir.TOKENIZER
    if not tokenizer_dir.is_dir():
        raise ValueError(f"{start.source}: no {ckpt_dir.TOKENIZER}/ directory; import the model "
                         "with checkpoint_convert import, which copies its tokenizer")
    tokenizer = load_tokenizer(str(tokenizer_dir))

    def split(name: str):
        return build_sft_dataset(cfg.data, tokenizer, start.model_cfg.vocab_size, split=name,
                                 output_dir=cfg.output.dir if write_cache else None)

    return split("train"), split("valid") if cfg.data.valid is not None else None


def check_phase(cfg, num_ranks: int | None = None, hf_import=None) -> str:
    """Everything `setup_phase` validates before training, on one process, writing nothing.

    Args:
        cfg: the phase.
        num_ranks: ranks of the real run (default: this launch's WORLD_SIZE).
        hf_import: (HF directory, its MoEModelConfig) when `model.checkpoint` is not imported
            yet: the data is checked with the HF directory's tokenizer and vocabulary instead.
    """
    from types import SimpleNamespace

    from megatron_ec.training.loop import _check_output_dir, find_start

    validate_for_world(cfg, num_ranks or world_size())
    if hf_import is None:
        start = find_start(cfg)
        dataset, valid = build_datasets(cfg, start, write_cache=False)
    else:
        _check_output_dir(Path(cfg.output.dir))
        hf_dir, model_cfg = hf_import
        start = SimpleNamespace(source=Path(hf_dir), model_cfg=model_cfg, resume=None)
        dataset, valid = build_datasets(cfg, start, write_cache=False, tokenizer_dir=Path(hf_dir))
    steps = cfg.train.total_steps(len(dataset))
    where = f"resume at {start.resume.name}" if start.resume else f"start from {start.source}"
    validation = f", {len(valid)} validation sequences" if valid is not None else ""
    return f"ok: {len(dataset)} training sequences{validation}, {steps} steps, {where}"


def _datasets_rank0_first(cfg, start):
    """Rank 0 tokenises (and caches), the others then read the cache; errors reach every rank."""
    import torch.distributed as dist

    error = None
    datasets = None
    if dist.get_rank() == 0:
        try:
            datasets = build_datasets(cfg, start, write_cache=True)
        except ValueError as err:
            error = str(err)
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise ValueError(shared[0])
    return datasets if datasets is not None else build_datasets(cfg, start, write_cache=True)


def setup_phase(cfg):
    """Validate, start the process groups, read the data, build model and optimizer (collective).

    Every user error surfaces here, before anything is written to `output.dir`.
    """
    from megatron_ec.parallel import init_parallel
    from megatron_ec.training.loop import Phase, find_start

    validate_for_world(cfg, world_size())
    start = find_start(cfg)
    out = Path(cfg.output.dir)
    existed = out.exists()
    try:
        init_parallel(cfg.parallel, seed=cfg.train.seed)
        dataset, valid = _datasets_rank0_first(cfg, start)
        return Phase(cfg, start, dataset, valid)
    except USER_ERRORS:
        if not existed and is_rank0():
            shutil.rmtree(out, ignore_errors=True)  # e.g. the data cache of a run that never ran
        raise


def run_phase(phase):
    """Train a set-up phase to completion (collective); return its `PhaseResult`."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        _write_config(phase.cfg)
    return phase.run()


def _write_config(cfg) -> None:
    from megatron_ec.training.config_tree import to_dict

    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_phase_config(path: str, overrides: list[str], phase: str | None):
    """The `FinetuneConfig` of a plain config file, or of one phase of a recipe file."""
    from megatron_ec.training.recipe import Recipe

    recipe = Recipe.load(path, overrides)
    if phase is None and len(recipe.phases) > 1:
        names = ", ".join(p.name for p in recipe.phases)
        raise ValueError(f"{path} is a recipe with phases {names}; pick one with --phase NAME or "
                         "run them all with python -m megatron_ec.recipe")
    return recipe.phase_config(phase or recipe.phases[0].name)
