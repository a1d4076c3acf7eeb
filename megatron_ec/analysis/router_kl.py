"""Router KL divergence and weighted MoE output divergence of fine-tuned models from their base.

    python -m megatron_ec.analyze router_kl --base BASE_DIR --models DIR [DIR ...]
        [--labels ...] --data FILE [--inputs base|own] --out OUT

Paper section 6.1, Fig. 5 (router KL) and Fig. 4 (weighted MoE output divergence). Per MoE
layer and real token: KL(P_base || P_ft) of the router distributions (softmax of the logits
over all routed experts), and the distance between the routed experts' gate-weighted outputs
of the two models, each under its own routing (restored condensers and bias included);
``megatron_ec.analysis.stats`` has the formulas. The paper does not say which hidden states
the two routers see: ``--inputs base`` (default) feeds every fine-tuned MoE block the BASE
model's input to that block, so each layer's number measures that layer's change alone;
``--inputs own`` lets each model run on its own hidden states (upstream changes included).
Tokens are rendered with the first fine-tuned model's training template. Writes
``router_kl.json``, ``router_kl.png`` and ``output_divergence.png``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ec.analysis import capture, inputs, plots, stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    inputs.add_comparison_arguments(parser)
    parser.add_argument("--inputs", choices=("base", "own"), default="base",
                        help="hidden states the fine-tuned MoE blocks see (see the docs)")
    inputs.add_data_arguments(parser)


@dataclass
class LayerSums:
    """Per-layer sums over real tokens, float64."""

    tokens: int = 0
    kl: float = 0.0
    diff_norm: float = 0.0
    base_norm: float = 0.0

    def add(self, base: capture.BlockRecord, tuned: capture.BlockRecord,
            real_T: torch.Tensor) -> None:
        mask = real_T.to(base.logits_TE.device)
        self.tokens += int(mask.sum())
        self.kl += float(stats.router_kl(base.logits_TE[mask],
                                         tuned.logits_TE.to(mask.device)[mask]).sum())
        diff, norm = stats.output_divergence_sums(base.routed_TH[mask],
                                                  tuned.routed_TH.to(mask.device)[mask])
        self.diff_norm, self.base_norm = self.diff_norm + diff, self.base_norm + norm

    def summary(self) -> dict:
        return {"tokens": self.tokens, "router_kl": self.kl / max(self.tokens, 1),
                "output_l2": self.diff_norm / max(self.tokens, 1),
                "output_relative": self.diff_norm / self.base_norm if self.base_norm else 0.0}


def tuned_records(tuned, base_rec: capture.MoERecorder, tuned_rec: capture.MoERecorder,
                  batch, mode: str) -> dict[int, capture.BlockRecord]:
    """The fine-tuned model's block records on this batch (after the base forward)."""
    tuned_rec.clear()
    if mode == "own":
        capture.forward(tuned, batch)
        return tuned_rec.records
    with torch.inference_mode():
        for layer, block in tuned_rec.blocks.items():
            block(base_rec.records[layer].block_input.to(next(block.parameters()).device))
    return tuned_rec.records


def divergence(base, tuned, rows: list[list[int]], args) -> dict[int, dict]:
    """{layer: summary} of one fine-tuned model against the base."""
    base_rec = capture.MoERecorder(base.model, keep_routed=True, keep_inputs=args.inputs == "base")
    tuned_rec = capture.MoERecorder(tuned.model, keep_routed=True)
    if sorted(base_rec.blocks) != sorted(tuned_rec.blocks):
        raise ValueError(f"--base has MoE layers {sorted(base_rec.blocks)} but a fine-tuned "
                         f"model has {sorted(tuned_rec.blocks)}; compare models of one base")
    sums = {layer: LayerSums() for layer in base_rec.blocks}
    with base_rec, tuned_rec:
        for batch in inputs.batches(rows, args.batch_size, inputs.pad_id_of(tuned)):
            base_rec.clear()
            capture.forward(base.model, batch)
            records = tuned_records(tuned.model, base_rec, tuned_rec, batch, args.inputs)
            for layer, layer_sums in sums.items():
                layer_sums.add(base_rec.records[layer], records[layer], batch.real_T)
    return {layer: sums[layer].summary() for layer in sorted(sums)}


def run(args: argparse.Namespace) -> dict:
    inputs.check_data_arguments(args)
    labels = inputs.labels_for(args.models, args.labels)
    args.base = inputs.model_dir(args.base, "--base", args.out)
    args.models = [inputs.model_dir(path, "--models", args.out) for path in args.models]
    base = inputs.load_model(args.base, args.device)
    rows = None
    report = {"base": str(args.base), "data": str(args.data), "inputs": args.inputs,
              "models": [], "figures": []}
    for label, hf_dir in zip(labels, args.models):
        tuned = inputs.load_model(hf_dir, args.device)
        if rows is None:
            rows = inputs.token_rows(tuned.encoder, args.data, args.limit, args.max_length)
            _check_vocab(rows, base.model.config.vocab_size)
        layers = divergence(base, tuned, rows, args)
        del tuned
        report["models"].append({
            "label": label, "dir": str(hf_dir), "method": inputs.method_name(hf_dir),
            "mean_router_kl": _mean(layers, "router_kl"),
            "mean_output_relative": _mean(layers, "output_relative"),
            "layers": {str(layer): summary for layer, summary in layers.items()}})
    out = Path(args.out)
    for key, name, ylabel in (("router_kl", "router_kl", "KL(base || fine-tuned), nats"),
                              ("output_relative", "output_divergence",
                               "sum |y_ft - y_base| / sum |y_base|")):
        series = {m["label"]: {int(k): v[key] for k, v in m["layers"].items()}
                  for m in report["models"]}
        title = "Router KL divergence" if key == "router_kl" else "Weighted MoE output divergence"
        report["figures"].append(plots.per_layer_lines(series, ylabel, title,
                                                       out / f"{name}.png"))
    return report


def _mean(layers: dict[int, dict], key: str) -> float:
    return sum(summary[key] for summary in layers.values()) / len(layers)


def _check_vocab(rows: list[list[int]], vocab_size: int) -> None:
    largest = max(max(row) for row in rows)
    if largest >= vocab_size:
        raise ValueError(f"--base: token id {largest} of the fine-tuned tokenizer is outside the "
                         f"base vocabulary ({vocab_size}); compare models of one base")
