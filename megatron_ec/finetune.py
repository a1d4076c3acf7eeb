"""Fine-tune one phase: `python -m megatron_ec.finetune --config FILE.yaml [dotted.key=value ...]`.

Run it under torchrun for several ranks (`torchrun --nproc_per_node 8 -m megatron_ec.finetune ...`).
One invocation runs one phase (sft, bias or condenser, from `method.name`); a recipe file with a
`phases:` list needs `--phase NAME` here, or `python -m megatron_ec.recipe` to run them all.

`--check` validates the config, the starting checkpoint and the data on one process and exits
without writing anything (but `data.cache_dir`, when set, which the run then reuses): the launcher
runs it before torchrun so that user errors surface as one line. `--list-keys` prints every key.

A user error (config, data, checkpoint, layout) prints one line to stderr on rank 0, exits with
status 2 and leaves nothing behind (an output.dir the failed run created is removed).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import yaml

EXIT_USER_ERROR = 2
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
"""Raised for the user's config, data, checkpoint or layout during setup (MEGATRON_EC_DEBUG=1 shows
the traceback)."""
logger = logging.getLogger("megatron_ec.finetune")


def parse_args(argv: list[str] | None, prog: str, doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config or recipe file")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every config key with its default and meaning, then exit")
    parser.add_argument("--phase", default=None, help="run this phase of a recipe file")
    parser.add_argument("--check", action="store_true",
                        help="validate config, checkpoint and data, write nothing, exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: the number of ranks the run will have")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                        help="config overrides, e.g. train.max_steps=100 output.dir=runs/x")
    args = parser.parse_args(argv)
    if not args.config and not args.list_keys:
        parser.error("--config is required")
    return args


def list_keys() -> str:
    """Every config key with its default and docstring (from the section dataclasses)."""
    from megatron_ec.training.config import FinetuneConfig
    from megatron_ec.training.config_tree import describe_keys

    lines = []
    for key, default, doc in describe_keys(FinetuneConfig):
        lines.append(f"{key} = {default}")
        if doc:
            lines.append(f"    {doc}")
    return "\n".join(lines)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def quiet_libraries() -> None:
    """Megatron-Core and torch warn a lot on CPU (no TE/apex, deprecations): keep stderr readable."""
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.basicConfig(level=logging.INFO if is_rank0() else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    for name in ("megatron", "megatron.core", "torch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def validate_for_world(cfg, num_ranks: int) -> None:
    """Checks that need the number of ranks; raise ValueError with a fix-it message."""
    import torch

    from megatron_ec.parallel import check_layout

    check_layout(num_ranks, cfg.parallel)
    cfg.train.accumulation_steps(num_ranks // cfg.parallel.tensor_model_parallel_size)
    if cfg.train.precision != "fp32" and not torch.cuda.is_available():
        raise ValueError(f"train.precision={cfg.train.precision} needs a GPU (Megatron's optimizer "
                         "keeps fp32 master weights; it does not run on CPU); use train.precision=fp32")


def build_datasets(cfg, start, write_cache: bool):
    """(training split, validation split or None), tokenised with the starting checkpoint's
    tokenizer through the same pipeline (templates, masks, packing, cache)."""
    from megatron_ec.data import build_sft_dataset, load_tokenizer
    from megatron_ec.models import ckpt_dir

    tokenizer_dir = start.source / ckpt_dir.TOKENIZER
    if not tokenizer_dir.is_dir():
        raise ValueError(f"{start.source}: no {ckpt_dir.TOKENIZER}/ directory; import the model "
                         "with checkpoint_convert import, which copies its tokenizer")
    tokenizer = load_tokenizer(str(tokenizer_dir))

    def split(name: str):
        return build_sft_dataset(cfg.data, tokenizer, start.model_cfg.vocab_size, split=name,
                                 output_dir=cfg.output.dir if write_cache else None)

    return split("train"), split("valid") if cfg.data.valid is not None else None


def check_phase(cfg, num_ranks: int | None = None) -> str:
    """Everything `setup_phase` validates before training, on one process, writing nothing.

    Args:
        cfg: the phase.
        num_ranks: ranks of the real run (default: this launch's WORLD_SIZE).
    """
    from megatron_ec.training.loop import find_start

    validate_for_world(cfg, num_ranks or world_size())
    start = find_start(cfg)
    dataset, valid = build_datasets(cfg, start, write_cache=False)
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
    from megatron_ec.recipe import Recipe

    recipe = Recipe.load(path, overrides)
    if phase is None and len(recipe.phases) > 1:
        names = ", ".join(p.name for p in recipe.phases)
        raise ValueError(f"{path} is a recipe with phases {names}; pick one with --phase NAME or "
                         "run them all with python -m megatron_ec.recipe")
    return recipe.phase_config(phase or recipe.phases[0].name)


def user_error(prog: str, err: BaseException) -> int:
    """Report a user error as one line on rank 0 (MEGATRON_EC_DEBUG=1: re-raise with traceback)."""
    if os.environ.get("MEGATRON_EC_DEBUG"):
        raise err
    if is_rank0():
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    prog = "megatron_ec.finetune"
    args = parse_args(argv, prog, __doc__)
    quiet_libraries()
    if args.list_keys:
        print(list_keys())
        return 0
    try:
        try:
            cfg = load_phase_config(args.config, args.overrides, args.phase)
            if args.check:
                print(check_phase(cfg, args.world_size), file=sys.stderr)
                return 0
            phase = setup_phase(cfg)
        except USER_ERRORS as err:
            return user_error(prog, err)
        result = run_phase(phase)  # errors from here on are bugs: full traceback
    finally:
        _shutdown()
    if is_rank0():
        logger.info("done: %s (%d steps this run, loss %s -> %s)", result.checkpoint, result.steps,
                    _fmt(result.first_loss), _fmt(result.last_loss))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _shutdown() -> None:
    if "megatron_ec.parallel" in sys.modules:
        from megatron_ec.parallel import shutdown_parallel

        shutdown_parallel()


if __name__ == "__main__":
    sys.exit(main())
