"""Run every phase of a recipe with one command: `python -m megatron_ec.recipe --config R.yaml`.

The recipe format is `megatron_ec.training.recipe` (sections, `phases:`, `pipeline:`); all phases
run in one process group (one torchrun launch, re-initialising Megatron's parallel state per
phase). A phase whose output.dir already holds its final checkpoint is skipped, and an
interrupted phase resumes, so re-running the same command continues where it stopped. Phase 2
alone, from a phase-1 checkpoint: `python -m megatron_ec.finetune --config R.yaml --phase condenser`.

`--print-paths` prints the launcher's paths as shell assignments; `--check` validates every phase
(phase 2 from a phase-1 checkpoint that does not exist yet is checked against phase 1's start;
with `--hf DIR`, a first phase whose checkpoint is not imported yet is checked against the HF
directory that will be imported: config.json, family, TP/EP split, weight names, tokenizer and
data). `--list-keys` prints every key an override may set (`pipeline.*` and `phases.<name>.*`
included).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_ec.training import launch
from megatron_ec.training.phase import run_phase, setup_phase
from megatron_ec.training.recipe import Recipe, check_all, print_paths, recipe_keys

logger = logging.getLogger("megatron_ec.recipe")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron_ec.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--check", action="store_true", help="validate every phase and exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: the number of ranks the run will have")
    parser.add_argument("--hf", default=None,
                        help="with --check: the HF directory the first phase's checkpoint will be "
                             "imported from, if it is not there yet")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every overridable key with its default and meaning, then exit")
    parser.add_argument("--print-paths", action="store_true", help="shell assignments for launchers")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_args(argv)
    if not args.config and not args.list_keys:
        parser.error("--config is required")
    return args


def run_all(recipe: Recipe, configs: list, prog: str) -> int:
    """Set up and run every phase in order; a user error stops at its phase."""
    for phase, cfg in zip(recipe.phases, configs):
        try:
            state = setup_phase(cfg)
        except launch.USER_ERRORS as err:
            return launch.user_error(f"{prog} (phase {phase.name})", err)
        result = run_phase(state)
        del state
        if launch.is_rank0():
            logger.info("phase %s done: %s (%d steps this run)", phase.name, result.checkpoint,
                        result.steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launch.quiet_libraries()
    prog = "megatron_ec.recipe"
    try:
        try:
            if args.list_keys:
                names = [p.name for p in Recipe.load(args.config).phases] if args.config else None
                print(recipe_keys(names))
                return 0
            recipe = Recipe.load(args.config, args.overrides)
            if args.print_paths:
                sys.stdout.write(print_paths(recipe))
                return 0
            if args.check:
                for line in check_all(recipe, args.world_size, hf_dir=args.hf or None):
                    print(line, file=sys.stderr)
                return 0
            configs = recipe.configs()
        except launch.USER_ERRORS as err:
            return launch.user_error(prog, err)
        return run_all(recipe, configs, prog)
    finally:
        launch.shutdown()


if __name__ == "__main__":
    sys.exit(main())
