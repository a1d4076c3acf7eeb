"""The persistent-path ablation (paper section 6.3, Fig. 7): accuracy with and without the
condenser forcing.

    python -m megatron_ec.analyze ablation --out DIR --hf EXPORTED_DIR --tasks math --data-dir DIR

The exported ExpertCondenser model is scored as trained (its condensers forced into every
token's selection), then with the method's ``force_condensers`` switched off: the condensers
become ordinary routed experts, selected only when the biased top-k picks them, with the same
parameters, bias and gate weights. In paper mode the activation budget stays k slots; in
reference mode (k + r slots when forced) it drops to k, as the method defines it (the report
gives both slot counts). Both are scored with ``megatron_ec.eval`` (the tasks, prompts, greedy
decoding and answer rules of ``megatron_ec.evaluate``). Writes ``ablation.png``: per-task
accuracy with and without the persistent path.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from megatron_ec.analysis.scoring import add_eval_arguments, read_items, score


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_eval_arguments(parser)


def without_forcing(hf_dir: str):
    """(method with ``force_condensers=False``, its biases, {layer: condensers}) of an export.

    Raises:
        ValueError: no routing file, or a method without forced condensers.
    """
    from megatron_ec.eval.hf_routing import ROUTING_FILE, read_routing_file

    saved = read_routing_file(hf_dir)
    if saved is None:
        raise ValueError(f"--hf {hf_dir}: no {ROUTING_FILE}; the ablation needs a model exported "
                         "with condenser routing")
    method, biases = saved
    condensers = {layer: method.forced_condensers(layer) for layer in sorted(biases)}
    if not hasattr(method.config, "force_condensers") or not any(condensers.values()):
        raise ValueError(f"--hf {hf_dir}: method {method.name!r} forces no condensers; the "
                         "ablation needs an ExpertCondenser (phase 2) export")
    ablated = type(method)(dataclasses.replace(method.config, force_condensers=False),
                           method.decisions)
    return ablated, biases, {layer: ids for layer, ids in condensers.items() if ids}


def slot_counts(model) -> dict[int, int]:
    """{MoE layer: experts each token is dispatched to} of the installed gates."""
    from megatron_ec.models.family import get_family

    adapter = get_family(model.config.model_type).hf_gate
    return {layer: getattr(block, adapter.gate_attr).slots
            for layer, block in adapter.blocks(model).items()}


def run(args: argparse.Namespace) -> dict:
    from megatron_ec.eval.generate import load_exported
    from megatron_ec.eval.hf_routing import restore_routing

    items = read_items(args)
    ablated, biases, condensers = without_forcing(args.hf)
    loaded = load_exported(args.hf, args.device)
    forced_slots = slot_counts(loaded.model)
    with_path = score(loaded, items, args)
    restore_routing(loaded.model, ablated, biases)  # replaces the forced gates in place
    without_path = score(loaded, items, args)
    report = {"model": str(args.hf), "condensers": {str(k): v for k, v in condensers.items()},
              "slots": {"with": forced_slots, "without": slot_counts(loaded.model)},
              "with": with_path, "without": without_path,
              "drop": with_path["average"] - without_path["average"]}
    report["figures"] = [figure(report, Path(args.out) / "ablation.png")]
    return report


def figure(report: dict, path: Path) -> str:
    """Grouped bars: accuracy per task and on average, with and without the persistent path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*report["with"]["tasks"], "average"]

    def accuracies(side: str) -> list[float]:
        tasks = report[side]["tasks"]
        return [100 * tasks[n]["accuracy"] for n in names[:-1]] + [100 * report[side]["average"]]

    fig, axis = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 4))
    width = 0.38
    for offset, side, label in ((-width / 2, "with", "with (condensers forced)"),
                                (width / 2, "without", "w.o. (condensers routed)")):
        axis.bar([i + offset for i in range(len(names))], accuracies(side), width, label=label)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 105)
    axis.set_title("Persistent-path ablation (paper section 6.3)")
    axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)
