"""Pearson correlation change of down-projection weights, condensers against regular experts.

    python -m megatron_ec.analyze pearson --base BASE_DIR --models DIR [DIR ...] [--labels ...]
        [--condensers-from EC_DIR] [--layer L] --out OUT

Paper App. M (Fig. 8, M.1). Per MoE layer, C_ij is the Pearson correlation of experts i and j's
flattened down-projection weights; for every condenser i (the paper's "shared" set) and regular
expert j, Delta_ij = 100 (C_ij,ft - C_ij,base) / |C_ij,base|; the layer gain is the mean over the
pairs, the model summary the mean and population std over layers
(``megatron_ec.analysis.stats``). The condensers are each model's own (its exported routing
record); a model without any (SFT, ESFT) uses those of ``--condensers-from``, so that ESFT and
ExpertCondenser are compared on the same experts, as in the paper. Only weights are read (no
data). Writes ``pearson.json``, ``pearson_gain.png`` (layer gains per model) and
``pearson_layer<L>.png`` (Delta per regular expert for each condenser of layer L, default the
first MoE layer: Fig. 8).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_ec.analysis import capture, inputs, plots, stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    inputs.add_comparison_arguments(parser)
    parser.add_argument("--condensers-from", default=None,
                        help="exported directory whose condensers models without their own use")
    parser.add_argument("--layer", type=int, default=None,
                        help="layer of the per-expert figure (default: the first MoE layer)")


def down_projections(hf_dir: str) -> dict[int, torch.Tensor]:
    """{layer: down-projection weights [E, F]} of an HF directory, as stored (no upcast)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto", local_files_only=True)
    blocks, _ = capture.moe_blocks(model)
    # Every family's fused experts tensor puts the expert first ([E, H, F] or [E, F, H]): a
    # Pearson correlation does not depend on the order the entries are flattened in.
    return {layer: block.experts.down_proj.detach().reshape(block.experts.down_proj.shape[0], -1)
            for layer, block in blocks.items()}


def layer_gains(base_EF: torch.Tensor, tuned_EF: torch.Tensor, condensers: list[int]) -> dict:
    """Delta_ij and its mean for one layer."""
    regular = [e for e in range(base_EF.shape[0]) if e not in set(condensers)]
    gain = stats.correlation_gain(stats.pearson_matrix(base_EF), stats.pearson_matrix(tuned_EF),
                                  condensers, regular)
    return {"condensers": condensers, "regular": regular, "mean_gain": float(gain.mean()),
            "gain": gain.tolist()}


def model_condensers(hf_dir: str, fallback: dict[int, list[int]], flag_given: bool) -> dict:
    own = inputs.condensers_of(hf_dir)
    if own:
        return own
    if not fallback:
        raise ValueError(f"--models {hf_dir}: no condensers recorded; pass --condensers-from "
                         "EC_DIR (an ExpertCondenser export)" if not flag_given else
                         "--condensers-from: that directory records no condensers either")
    return fallback


def run(args: argparse.Namespace) -> dict:
    labels = inputs.labels_for(args.models, args.labels)
    args.base = inputs.model_dir(args.base, "--base", args.out)
    args.models = [inputs.model_dir(path, "--models", args.out) for path in args.models]
    if args.condensers_from:
        args.condensers_from = inputs.model_dir(args.condensers_from, "--condensers-from",
                                                args.out)
    fallback = inputs.condensers_of(args.condensers_from) if args.condensers_from else {}
    given = args.condensers_from is not None
    condenser_sets = [model_condensers(hf_dir, fallback, given) for hf_dir in args.models]
    base = down_projections(args.base)
    report = {"base": str(args.base), "models": [], "figures": []}
    for label, hf_dir, condensers in zip(labels, args.models, condenser_sets):
        tuned = down_projections(hf_dir)
        if {k: v.shape for k, v in tuned.items()} != {k: v.shape for k, v in base.items()}:
            raise ValueError(f"--models {hf_dir}: its MoE layers or expert shapes differ from "
                             "--base; compare models of one base")
        layers = {layer: layer_gains(base[layer], tuned[layer], condensers[layer])
                  for layer in sorted(condensers) if layer in base}
        mean, std = stats.mean_and_std([g["mean_gain"] for g in layers.values()])
        report["models"].append({"label": label, "dir": str(hf_dir), "mean_gain": mean,
                                 "std_gain": std,
                                 "layers": {str(k): v for k, v in layers.items()}})
    report["figures"] = _figures(report, Path(args.out), args.layer)
    return report


def _figures(report: dict, out: Path, layer: int | None) -> list[str]:
    models = report["models"]
    layer_ids = sorted({int(k) for m in models for k in m["layers"]})
    series = {m["label"]: [m["layers"].get(str(k), {}).get("mean_gain", 0.0) for k in layer_ids]
              for m in models}
    figures = [plots.grouped_bars([str(k) for k in layer_ids], series,
                                  "mean correlation change (%)",
                                  "Condenser vs regular experts: down_proj correlation change",
                                  out / "pearson_gain.png")]
    layer = layer_ids[0] if layer is None else layer
    if layer not in layer_ids:
        raise ValueError(f"--layer {layer}: not a MoE layer with condensers ({layer_ids})")
    records = [(m["label"], m["layers"][str(layer)]) for m in models if str(layer) in m["layers"]]
    regular = records[0][1]["regular"]
    # One x axis: the models whose regular experts are those of the first (same condensers).
    per_expert = {f"{label}: condenser {condenser}": record["gain"][row]
                  for label, record in records if record["regular"] == regular
                  for row, condenser in enumerate(record["condensers"])}
    figures.append(plots.grouped_bars([str(e) for e in regular], per_expert,
                                      "correlation change (%)",
                                      f"Layer {layer}: condenser vs each regular expert",
                                      out / f"pearson_layer{layer}.png"))
    return figures
