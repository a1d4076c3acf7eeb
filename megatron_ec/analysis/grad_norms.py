"""Average FFN gradient norm per expert over training, condensers against routed experts.

    python -m megatron_ec.analyze grad_norms --runs RUN_DIR [RUN_DIR ...] [--labels ...] --out OUT

Paper section 6.2, Fig. 6. Reads each run's ``expert_grad_norms.jsonl`` (written by the trainer
every ``output.log_interval`` steps, ``megatron_ec.training.expert_grad_norms``: the L2 norm of
each routed expert's full FFN gradient before clipping) and reports, per logged step, the mean
norm over the condenser experts (every layer's J pooled) and over the other routed experts,
overall and per layer. Experts without a trainable tensor (``null``) are left out of the means;
a run without condensers (SFT, the bias phase) has only the routed curve. ``RUN_DIR`` may also
be the JSONL file itself. Writes ``grad_norms.json`` and ``grad_norms.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_ec.analysis import inputs, plots
from megatron_ec.training.expert_grad_norms import EXPERT_GRAD_NORMS_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", required=True, nargs="+",
                        help=f"training output dirs (or their {EXPERT_GRAD_NORMS_FILE})")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per run")


def read_records(run: str) -> tuple[Path, list[dict]]:
    """(file, records sorted by step) of one run; ValueError naming the file otherwise."""
    path = Path(run)
    if path.is_dir():
        path = path / EXPERT_GRAD_NORMS_FILE
    if not path.is_file():
        raise ValueError(f"--runs {run}: no {EXPERT_GRAD_NORMS_FILE}; train with "
                         "output.expert_grad_norms=true (the default)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not {"step", "norms"} <= set(record):
            raise ValueError(f"{path}:{number}: not an expert gradient-norm record; pass a "
                             "file the trainer wrote")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records; train for at least one logged step")
    return path, sorted(records, key=lambda r: r["step"])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def split_means(record: dict, layers: list[str] | None = None) -> tuple[float | None,
                                                                       float | None]:
    """(mean condenser norm, mean routed norm) of one record, over ``layers`` (default all)."""
    condenser, routed = [], []
    for layer, norms in record["norms"].items():
        if layers is not None and layer not in layers:
            continue
        chosen = set(record.get("condensers", {}).get(layer, []))
        for expert, norm in enumerate(norms):
            if norm is not None:
                (condenser if expert in chosen else routed).append(norm)
    return _mean(condenser), _mean(routed)


def summarize(records: list[dict]) -> dict:
    """Per-step and per-layer condenser / routed means, and their averages over the steps."""
    steps = [r["step"] for r in records]
    both = [split_means(r) for r in records]
    layers = sorted({layer for r in records for layer in r["norms"]}, key=int)
    per_layer = {}
    for layer in layers:
        pairs = [split_means(r, [layer]) for r in records]
        per_layer[layer] = {"condenser": [p[0] for p in pairs], "routed": [p[1] for p in pairs]}
    condenser = [c for c, _ in both]
    routed = [r for _, r in both]
    overall_c = _mean([c for c in condenser if c is not None])
    overall_r = _mean([r for r in routed if r is not None])
    return {"steps": steps, "condenser_mean": condenser, "routed_mean": routed,
            "per_layer": per_layer, "overall": {
                "condenser": overall_c, "routed": overall_r,
                "ratio": overall_c / overall_r if overall_c is not None and overall_r else None}}


def run(args: argparse.Namespace) -> dict:
    labels = inputs.labels_for(args.runs, args.labels)
    report = {"runs": [], "figures": []}
    series, all_steps = {}, []
    for label, run_dir in zip(labels, args.runs):
        path, records = read_records(run_dir)
        summary = summarize(records)
        report["runs"].append({"label": label, "file": str(path), **summary})
        all_steps.append(summary["steps"])
        series[f"{label}: condensers"] = (summary["steps"], summary["condenser_mean"])
        series[f"{label}: routed experts"] = (summary["steps"], summary["routed_mean"])
    steps = sorted({s for run_steps in all_steps for s in run_steps})
    aligned = {name: [dict(zip(xs, ys)).get(s) for s in steps] for name, (xs, ys) in series.items()}
    report["figures"].append(plots.step_lines(
        steps, aligned, "mean FFN gradient norm per expert",
        "Average FFN gradient norm per expert", Path(args.out) / "grad_norms.png"))
    return report
