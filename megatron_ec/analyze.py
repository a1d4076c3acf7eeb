"""The paper's analyses as JSON and PNG, from exported checkpoints, data and training logs.

    python -m megatron_ec.analyze SUBCOMMAND [options] --out DIR

Subcommands (``docs/EVALUATION.md``, "Analyses", names the paper figure of each):

- ``activation``: expert activation counts and probabilities per layer, sorted, Lorenz curves
  and Gini (Fig. 3 / 9, App. P), one model or several side by side;
- ``router_kl``: router KL divergence and weighted MoE output divergence against the base
  model (section 6.1, Fig. 4 / 5);
- ``grad_norms``: mean FFN gradient norm per expert over training, condensers against routed
  experts, from the trainer's ``expert_grad_norms.jsonl`` (section 6.2, Fig. 6);
- ``pearson``: Pearson correlation change of down-projection weights, condensers against
  regular experts (App. M);
- ``pruning``: the expert-pruning study (section 2, App. D / E / O);
- ``ablation``: the persistent-path ablation (section 6.3, Fig. 7);
- ``demo``: all of the above but pruning over the demo's base, ExpertCondenser and baseline
  exports, with the paper's mechanistic directions as measured (`make demo`, step 8).

Each subcommand is a module ``megatron_ec.analysis.<name>`` with ``add_arguments(parser)`` and
``run(args) -> dict``; the dict is written to ``DIR/<name>.json`` and the module writes its PNGs
into ``DIR``. Modules are imported only when their subcommand runs. Bad input (a missing file, a
model that does not fit) fails with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from megatron_ec.analysis.report import write_json

PROG = "megatron_ec.analyze"
EXIT_USER_ERROR = 2
SUBCOMMANDS = ("activation", "router_kl", "grad_norms", "pearson", "pruning", "ablation", "demo")
PACKAGE = "megatron_ec.analysis"


class UserError(Exception):
    """A problem with the command line or its inputs: printed as one line, exit status 2."""


def load_subcommand(name: str):
    """The module of one subcommand; UserError when it is not installed (yet)."""
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{PACKAGE}.{name}":
            raise  # a missing dependency inside the module is a real error, not "not built"
        raise UserError(f"subcommand {name!r} is not available in this installation "
                        f"({PACKAGE}.{name} is missing)") from None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, object]:
    """Parse the subcommand name first, then its own options (only its module is imported)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                  add_help=False)
    top.add_argument("subcommand", nargs="?", choices=SUBCOMMANDS)
    known, _ = top.parse_known_args(argv[:1])
    if known.subcommand is None:
        full = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        full.add_argument("subcommand", choices=SUBCOMMANDS)
        full.parse_args(argv)  # prints the usage (and exits) for -h or a missing name
    module = load_subcommand(known.subcommand)
    parser = argparse.ArgumentParser(prog=f"{PROG} {known.subcommand}",
                                     description=(module.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder for the JSON and PNGs")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.subcommand = known.subcommand
    return args, module


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model between the lines


def main(argv: list[str] | None = None) -> int:
    _quiet()
    try:
        args, module = parse_args(argv)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; pass a folder for the JSON and PNGs")
        out.mkdir(parents=True, exist_ok=True)
        report = module.run(args)
    except (UserError, ValueError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    path = out / f"{args.subcommand}.json"
    write_json(path, report)
    pngs = sorted(str(p) for p in report.get("figures", []))
    print(f"{PROG}: wrote {path}" + (f" and {', '.join(pngs)}" if pngs else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
