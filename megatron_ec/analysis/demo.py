"""The demo's comparison: every analysis over the base, the ExpertCondenser export and the baselines.

    python -m megatron_ec.analyze demo --out runs/demo/analysis --main runs/demo/hf
        --base runs/demo/hf_base --compare sft=runs/demo/baselines/sft/hf
        --data runs/demo/data/heldout.jsonl --metrics-dirs runs/demo/phase1_bias runs/demo/phase2_condenser

Runs `activation` (Gini, Lorenz), `router_kl` (against the base), `grad_norms` (ExpertCondenser's
last phase and each baseline's run: the folder above its `hf`), `pearson` (condensers of the EC
export) and `ablation` (the EC export with its forcing dropped, on the held-out split as the `demo`
task), each writing its own JSON and PNGs into `--out`, exactly as its own subcommand would. The
returned summary holds the three mechanistic directions of the paper (section 6) as measured:
condenser gradient norm above routed, EC router KL to the base below SFT's, the ablation's drop.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EC_LABEL = "ExpertCondenser"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--main", required=True, help="the ExpertCondenser export")
    parser.add_argument("--base", required=True, help="the model before fine-tuning")
    parser.add_argument("--compare", nargs="*", default=[], metavar="LABEL=DIR",
                        help="baseline exports, each inside its training output dir")
    parser.add_argument("--data", required=True, help="SFT-format records (the held-out split)")
    parser.add_argument("--metrics-dirs", nargs="+", required=True,
                        help="the main chain's output dirs; the last one's grad norms are used")
    parser.add_argument("--limit", type=int, default=200, help="records per analysis")


def _labelled(items: list[str]) -> list[tuple[str, str]]:
    from megatron_ec.eval.demo_eval import labelled_dir

    return [labelled_dir(item) for item in items]


def _run(name: str, out: str, argv: list[str]) -> dict:
    """One analysis through its own parser and `run`, its JSON written like the subcommand's."""
    import importlib

    from megatron_ec.analysis.report import write_json

    module = importlib.import_module(f"megatron_ec.analysis.{name}")
    parser = argparse.ArgumentParser(prog=f"megatron_ec.analyze {name}")
    parser.add_argument("--out", required=True)
    module.add_arguments(parser)
    report = module.run(parser.parse_args(["--out", out, *argv]))
    write_json(Path(out) / f"{name}.json", report)
    return report


def _by_label(report: dict, key: str, field: str) -> dict:
    return {entry["label"]: entry[field] for entry in report[key]}


def run(args: argparse.Namespace) -> dict:
    baselines = _labelled(args.compare)
    labels = [EC_LABEL] + [label for label, _ in baselines]
    tuned = [args.main] + [hf_dir for _, hf_dir in baselines]
    data = ["--data", args.data, "--limit", str(args.limit)]
    out = args.out
    activation = _run("activation", out, ["--models", args.base, *tuned,
                                          "--labels", "base", *labels, *data])
    router_kl = _run("router_kl", out, ["--base", args.base, "--models", *tuned,
                                        "--labels", *labels, *data])
    runs = [args.metrics_dirs[-1]] + [str(Path(hf_dir).parent) for _, hf_dir in baselines]
    grad_norms = _run("grad_norms", out, ["--runs", *runs, "--labels", *labels])
    pearson = _run("pearson", out, ["--base", args.base, "--models", *tuned, "--labels", *labels,
                                    "--condensers-from", args.main])
    ablation = _run("ablation", out, ["--hf", args.main, "--tasks", "demo", "--data-dir",
                                      str(Path(args.data).parent), "--limit", str(args.limit)])
    kl = _by_label(router_kl, "models", "mean_router_kl")
    norms = _by_label(grad_norms, "runs", "overall")[EC_LABEL]
    figures = [f for r in (activation, router_kl, grad_norms, pearson, ablation)
               for f in r.get("figures", [])]
    return {
        "mean_gini": _by_label(activation, "models", "mean_gini"),
        "mean_router_kl_to_base": kl,
        "mean_output_divergence_relative": _by_label(router_kl, "models", "mean_output_relative"),
        "ec_grad_norm": norms,
        "pearson_mean_gain": _by_label(pearson, "models", "mean_gain"),
        "ablation": {"with": ablation["with"]["average"], "without": ablation["without"]["average"],
                     "drop": ablation["drop"]},
        "directions": directions(kl, norms, ablation["drop"]),
        "figures": figures,
    }


def directions(kl: dict, norms: dict, drop: float) -> dict:
    """The paper's mechanistic claims (section 6) as measured here: True, False or None (not
    measurable, e.g. no SFT baseline or no routed gradient)."""
    sft_kl = kl.get("sft")
    routed = norms.get("routed")
    return {
        "condenser_grad_norm_above_routed": (None if routed is None or norms.get("condenser")
                                             is None else norms["condenser"] > routed),
        "ec_router_kl_below_sft": None if sft_kl is None else kl[EC_LABEL] < sft_kl,
        "ablation_lowers_accuracy": drop > 0,
    }
