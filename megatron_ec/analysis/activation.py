"""Expert activation counts and probabilities per layer, sorted; Lorenz curves and Gini.

    python -m megatron_ec.analyze activation --models DIR [DIR ...] [--labels ...]
        --data FILE [--limit N] [--max-length 512] --out OUT

Paper Fig. 9 / App. P (one model) and Fig. 3 (several side by side: SFT, DenseMixer,
ExpertCondenser). Each model routes the data's conversations (rendered with its own training
template) with its exported routing restored; every real token counts, padding never
(``megatron_ec.analysis.stats`` has the definitions). Writes ``activation.json`` and, per
model, ``activation_<label>.png`` (sorted probabilities and Lorenz curves per layer), plus
``activation_compare.png`` (the per-layer, per-expert heatmaps of every model, condensers
outlined).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_ec.analysis import capture, inputs, plots, stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", required=True, nargs="+",
                        help="exported HF directories or megatron_ec checkpoints")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one name per model for the plots (default: directory names)")
    inputs.add_data_arguments(parser)


def layer_counts(loaded, rows: list[list[int]], batch_size: int) -> dict[int, dict]:
    """{layer: activation summary} of one model over the token rows."""
    model = loaded.model
    recorder = capture.MoERecorder(model)
    num_experts = {layer: getattr(block, recorder.gate_attr).weight.shape[0]  # router [E, H]
                   for layer, block in recorder.blocks.items()}
    # Host totals: one small copy per layer and batch, off any hot path.
    counts = {layer: torch.zeros(n, dtype=torch.int64, device="cpu")
              for layer, n in num_experts.items()}
    tokens = 0
    with recorder:
        for batch in inputs.batches(rows, batch_size, inputs.pad_id_of(loaded)):
            recorder.clear()
            capture.forward(model, batch)
            real = batch.real_T
            tokens += int(real.sum())
            for layer, record in recorder.records.items():
                mask = real.to(record.ids_TK.device)
                counts[layer] += stats.selection_counts(
                    record.ids_TK[mask], record.weights_TK[mask], num_experts[layer]).cpu()
    return {layer: stats.activation_summary(counts[layer], tokens) for layer in sorted(counts)}


def run(args: argparse.Namespace) -> dict:
    inputs.check_data_arguments(args)
    labels = inputs.labels_for(args.models, args.labels)
    args.models = [inputs.model_dir(path, "--models", args.out) for path in args.models]
    out = Path(args.out)
    report = {"data": str(args.data), "max_length": args.max_length, "models": [],
              "figures": []}
    heatmaps = []
    for label, hf_dir in zip(labels, args.models):
        loaded = inputs.load_model(hf_dir, args.device)
        rows = inputs.token_rows(loaded.encoder, args.data, args.limit, args.max_length)
        layers = layer_counts(loaded, rows, args.batch_size)
        del loaded
        condensers = inputs.condensers_of(hf_dir)
        report["models"].append({
            "label": label, "dir": str(hf_dir), "method": inputs.method_name(hf_dir),
            "condensers": {str(k): v for k, v in condensers.items()},
            "mean_gini": sum(s["gini"] for s in layers.values()) / len(layers),
            "layers": {str(layer): summary for layer, summary in layers.items()}})
        report["figures"].append(plots.activation_figure(
            layers, label, out / f"activation_{_file_safe(label)}.png"))
        heatmaps.append((label, {layer: s["share"] for layer, s in layers.items()}, condensers))
    report["figures"].append(plots.activation_heatmaps(heatmaps, out / "activation_compare.png"))
    return report


def _file_safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
