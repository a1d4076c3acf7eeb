"""Fine-tune one phase: `python -m megatron_ec.finetune --config FILE.yaml [dotted.key=value ...]`.

Run it under torchrun for several ranks (`torchrun --nproc_per_node 8 -m megatron_ec.finetune ...`).
One invocation runs one phase (the method of `method.name`); a recipe file with a `phases:` list
needs `--phase NAME` here, or `python -m megatron_ec.recipe` to run them all.

`--check` validates the config, the starting checkpoint and the data on one process and exits
without writing anything (but `data.cache_dir`, when set, which the run then reuses): the launcher
runs it before torchrun so that user errors surface as one line. `--list-keys` prints every key.

A user error (config, data, checkpoint, layout) prints one line to stderr on rank 0, exits with
status 2 and leaves nothing behind (an output.dir the failed run created is removed). The phase
logic is `megatron_ec.training.phase`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_ec.training import launch
from megatron_ec.training.phase import check_phase, load_phase_config, run_phase, setup_phase

logger = logging.getLogger("megatron_ec.finetune")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron_ec.finetune",
                                     description=__doc__.split("\n\n")[0])
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


def main(argv: list[str] | None = None) -> int:
    prog = "megatron_ec.finetune"
    args = parse_args(argv)
    launch.quiet_libraries()
    if args.list_keys:
        print(launch.list_keys())
        return 0
    try:
        try:
            cfg = load_phase_config(args.config, args.overrides, args.phase)
            if args.check:
                print(check_phase(cfg, args.world_size), file=sys.stderr)
                return 0
            phase = setup_phase(cfg)
        except launch.USER_ERRORS as err:
            return launch.user_error(prog, err)
        result = run_phase(phase)  # errors from here on are bugs: full traceback
    finally:
        launch.shutdown()
    if launch.is_rank0():
        logger.info("done: %s (%d steps this run, loss %s -> %s)", result.checkpoint, result.steps,
                    _fmt(result.first_loss), _fmt(result.last_loss))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
