"""The expert-pruning study (paper section 2, App. D / E / O): accuracy of pruned variants.

    python -m megatron_ec.analyze pruning --out DIR --hf EXPORTED_DIR --calib TRAIN.jsonl
        --tasks math --data-dir DIR [--small-dense 8 12] [--small-moe 12 16:2]
        [--inference-reduce 1 2] [--rankings act mag]

Strategies (n routed experts, k active per token; Fig. 1, Tables 7-8):

- small-dense ``N'``: keep n' experts per layer, activate all of them (k = n');
- small-MoE ``N'`` or ``N':K'``: keep n', activate k' < n' (default k' = the model's k);
- inference-reduce ``K'``: keep all n, activate k' < k.

Pruning removes experts from the router: their logits are -inf, so the family's rule (softmax
over the kept experts, top-k', renormalisation where the family renormalises) runs over the kept
pool exactly as on a smaller model whose router and expert tensors hold only the kept rows
(``tests/test_analysis_pruning.py`` checks that against such a model). Shared experts stay. A
model exported with ExpertCondenser routing keeps its bias and condensers; the condensers are
always kept.

Experts are ranked per layer on calibration data D_s (``--calib``, an SFT file the trainer
reads, rendered with the training template, one unpadded forward per conversation) by (App. E)

- ES-Act ``r_i = 1/N_s sum_j 1/L_j sum_k 1[g_ijk > 0] / K`` (selection frequency, K slots);
- ES-Mag ``s_i = 1/N_s sum_j 1/L_j sum_k ||v_ijk||`` with ``v_ijk = g_ijk E_i(x_jk)`` the
  expert's gated contribution to the layer output (zero where it is not selected; the paper's
  scalar fallback ``||v|| ~ rho`` is the gate g). ES-Act is the paper's default.

Every variant is scored with ``megatron_ec.eval`` (the same tasks, prompts, greedy decoding and
answer rules as ``megatron_ec.evaluate``). Writes ``pruning.png``: accuracy against kept experts
(small-dense, small-MoE) and against active experts (inference-reduce), the base model dashed.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from megatron_ec.analysis.scoring import add_eval_arguments, read_items, score
from megatron_ec.models.family import get_family
from megatron_ec.models.hf_gate import RestoredGate

RANKINGS = ("act", "mag")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_eval_arguments(parser)
    parser.add_argument("--calib", help="calibration data D_s: an SFT file (JSONL, JSON, Parquet)")
    parser.add_argument("--calib-samples", type=int, default=64, help="N_s, first N records")
    parser.add_argument("--calib-max-length", type=int, default=512, help="tokens per record")
    parser.add_argument("--small-dense", nargs="*", default=[], metavar="N'",
                        help="kept experts, all active")
    parser.add_argument("--small-moe", nargs="*", default=[], metavar="N'[:K']",
                        help="kept experts (and active ones; default the model's k)")
    parser.add_argument("--inference-reduce", nargs="*", default=[], metavar="K'",
                        help="active experts, none removed")
    parser.add_argument("--rankings", nargs="+", default=["act"], choices=RANKINGS,
                        help="ES-Act (act, the paper's default) and/or ES-Mag (mag)")


class PrunedGate(RestoredGate):
    """A gate whose router sees only the kept experts (the others' logits are -inf)."""

    def __init__(self, gate: RestoredGate, keep_E: torch.Tensor, topk: int) -> None:
        routing_cfg = dataclasses.replace(gate.routing_cfg, topk=topk)
        condensers = gate.condenser_ids.tolist()
        super().__init__(gate.weight, routing_cfg, gate.selection_bias, condensers,
                         gate.fp32_weights, gate.bias)
        self.register_buffer("keep_E", keep_E, persistent=False)

    def router_logits(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        return super().router_logits(hidden_TH).masked_fill(~self.keep_E, float("-inf"))


def routing_gates(model) -> dict[int, RestoredGate]:
    """{MoE layer: its gate as a ``RestoredGate``}; the family's own gates are rebuilt as the
    equivalent ``RestoredGate`` (no bias, no condensers), installed in the model."""
    family = get_family(model.config.model_type)
    adapter = family.hf_gate
    if adapter is None:
        raise ValueError(f"--hf: the {family.model_type} family has no HF gate adapter")
    gates = {}
    for layer, block in adapter.blocks(model).items():
        gate = getattr(block, adapter.gate_attr)
        if not isinstance(gate, RestoredGate):
            routing = family.to_model_config(model.config).moe_facts().routing
            adapter.install(block, routing, None, None)
            gate = getattr(block, adapter.gate_attr)
        gates[layer] = gate
    return gates


def install_gates(model, gates: dict[int, torch.nn.Module]) -> None:
    """Put ``gates`` (one per MoE layer) into the model's MoE blocks."""
    adapter = get_family(model.config.model_type).hf_gate
    for layer, block in adapter.blocks(model).items():
        setattr(block, adapter.gate_attr, gates[layer])


def prune(model, base: dict[int, RestoredGate], keep: dict[int, list[int]], topk: int) -> None:
    """Route every MoE layer over its ``keep`` experts, ``topk`` of them per token.

    Raises:
        ValueError: topk above the kept experts, or a kept set without the layer's condensers.
    """
    pruned = {}
    for layer, gate in base.items():
        ids = keep[layer]
        if not 1 <= topk <= len(ids):
            raise ValueError(f"layer {layer}: {topk} active experts of {len(ids)} kept")
        if not set(gate.condenser_ids.tolist()) <= set(ids):
            raise ValueError(f"layer {layer}: kept experts {ids} lack a condenser")
        keep_E = torch.zeros(gate.routing_cfg.num_experts, dtype=torch.bool,
                             device=gate.weight.device)
        keep_E[ids] = True
        pruned[layer] = PrunedGate(gate, keep_E, topk)
    install_gates(model, pruned)


class ScoreRecorder:
    """Accumulates ES-Act and ES-Mag per layer over single-conversation forwards (App. E)."""

    def __init__(self, model, gates: dict[int, RestoredGate]) -> None:
        adapter = get_family(model.config.model_type).hf_gate
        blocks = adapter.blocks(model)
        # fp64 sums beside each router: no host copy per forward.
        self.act = {layer: torch.zeros(gate.routing_cfg.num_experts, dtype=torch.float64,
                                       device=gate.weight.device) for layer, gate in gates.items()}
        self.mag = {layer: torch.zeros_like(sums) for layer, sums in self.act.items()}
        self.num_samples = 0
        self._hooks = [gates[layer].register_forward_hook(self._hook(layer, blocks[layer]))
                       for layer in gates]

    def _hook(self, layer: int, block):
        def record(gate, inputs, outputs) -> None:
            hidden_TH = inputs[0].reshape(-1, gate.weight.shape[1])
            _, weights_TK, ids_TK = outputs
            self._accumulate(layer, block.experts, hidden_TH, weights_TK, ids_TK)
        return record

    def _accumulate(self, layer, experts, hidden_TH, weights_TK, ids_TK) -> None:
        num_tokens, num_slots = ids_TK.shape
        selected_TK = (weights_TK > 0).double()  # a zero-weight placeholder is not selected
        self.act[layer] += torch.zeros_like(self.act[layer]).scatter_add(
            0, ids_TK.reshape(-1), selected_TK.reshape(-1)) / (num_slots * num_tokens)
        for slot in range(num_slots):  # g E_i(x) of each slot's expert, one slot at a time
            out_TH = experts(hidden_TH, ids_TK[:, slot:slot + 1], weights_TK[:, slot:slot + 1])
            norms_T = out_TH.double().norm(dim=-1)
            self.mag[layer].scatter_add_(0, ids_TK[:, slot], norms_T / num_tokens)

    @torch.no_grad()
    def run(self, model, rows: list[list[int]]) -> dict[int, dict[str, torch.Tensor]]:
        """Forward each token row alone; returns {layer: {"act": r_E, "mag": s_E}} (means)."""
        device = next(model.parameters()).device
        try:
            for row in rows:
                model(input_ids=torch.tensor([row], device=device))
                self.num_samples += 1
        finally:
            for hook in self._hooks:
                hook.remove()
        return {layer: {"act": self.act[layer] / self.num_samples,
                        "mag": self.mag[layer] / self.num_samples} for layer in self.act}


def kept_experts(score_E: torch.Tensor, count: int, condensers: list[int]) -> list[int]:
    """The condensers, then the best-scored others (ties: the lower id), ``count`` in all."""
    order = torch.sort(score_E, descending=True, stable=True).indices.tolist()
    ranked = list(condensers) + [i for i in order if i not in condensers]
    return sorted(ranked[:count])


def calibration_rows(loaded, path: str, limit: int, max_length: int) -> list[list[int]]:
    """Token ids of the first ``limit`` conversations of an SFT file, rendered whole with the
    training template, cut to ``max_length``."""
    from megatron_ec.data.formats import to_conversation
    from megatron_ec.data.readers import read_records

    rows = []
    for record in read_records(path):
        if len(rows) == limit:
            break
        text = loaded.encoder.render(to_conversation(record, "auto", ()), location=record.location)
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        if ids:
            rows.append(ids)
    if not rows:
        raise ValueError(f"--calib {path}: no conversations")
    return rows


def parse_variants(args: argparse.Namespace, num_experts: int, topk: int) -> list[dict]:
    """The variants asked for: {"strategy", "experts", "active", "ranking"} (ranking None for
    inference-reduce, which removes nothing). ValueError for a count out of range."""
    def count(text: str, flag: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= num_experts:
            raise ValueError(f"{flag} {text}: expected an expert count in [1, {num_experts}]")
        return int(text)

    variants = []
    for ranking in args.rankings:
        for text in args.small_dense:
            n = count(text, "--small-dense")
            variants.append({"strategy": "small_dense", "experts": n, "active": n,
                             "ranking": ranking})
        for text in args.small_moe:
            kept, _, active = text.partition(":")
            n, k = count(kept, "--small-moe"), count(active or str(topk), "--small-moe")
            if k >= n:
                raise ValueError(f"--small-moe {text}: needs fewer active than kept experts")
            variants.append({"strategy": "small_moe", "experts": n, "active": k,
                             "ranking": ranking})
    for text in args.inference_reduce:
        variants.append({"strategy": "inference_reduce", "experts": num_experts,
                         "active": count(text, "--inference-reduce"), "ranking": None})
    if not variants:
        raise ValueError("no variant: give --small-dense, --small-moe or --inference-reduce")
    return variants


def check_arguments(args: argparse.Namespace) -> None:
    pruned = args.small_dense or args.small_moe
    if pruned and not args.calib:
        raise ValueError("--small-dense / --small-moe rank experts on calibration data: "
                         "pass --calib with an SFT data file")
    if args.calib and not Path(args.calib).is_file():
        raise ValueError(f"--calib {args.calib}: no such file")
    if args.calib_samples < 1 or args.calib_max_length < 1:
        raise ValueError("--calib-samples and --calib-max-length must be at least 1")


def run(args: argparse.Namespace) -> dict:
    from megatron_ec.eval.generate import load_exported

    check_arguments(args)
    items = read_items(args)
    loaded = load_exported(args.hf, args.device)
    base = routing_gates(loaded.model)
    cfg = next(iter(base.values())).routing_cfg
    variants = parse_variants(args, cfg.num_experts, cfg.topk)
    scores = {}
    if args.calib:
        rows = calibration_rows(loaded, args.calib, args.calib_samples, args.calib_max_length)
        scores = ScoreRecorder(loaded.model, base).run(loaded.model, rows)
    report = {"model": str(args.hf), "num_experts": cfg.num_experts, "topk": cfg.topk,
              "base": score(loaded, items, args), "variants": []}
    for variant in variants:
        ranking = variant["ranking"]
        keep = {layer: list(range(cfg.num_experts)) if ranking is None else kept_experts(
            scores[layer][ranking], variant["experts"], gate.condenser_ids.tolist())
            for layer, gate in base.items()}
        prune(loaded.model, base, keep, variant["active"])
        report["variants"].append({**variant, "kept": {str(k): v for k, v in keep.items()},
                                   **score(loaded, items, args)})
    install_gates(loaded.model, base)
    report["calibration"] = {"file": args.calib, "samples": len(rows) if args.calib else 0,
                             "scores": {str(layer): {name: values.tolist()
                                                     for name, values in layer_scores.items()}
                                        for layer, layer_scores in scores.items()}}
    report["figures"] = [figure(report, Path(args.out) / "pruning.png")]
    return report


def figure(report: dict, path: Path) -> str:
    """Average accuracy against kept experts (left) and active experts (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    lines: dict[tuple[str, str | None], list[tuple[int, float]]] = {}
    for variant in report["variants"]:
        x = variant["active" if variant["strategy"] == "inference_reduce" else "experts"]
        lines.setdefault((variant["strategy"], variant["ranking"]), []).append(
            (x, 100 * variant["average"]))
    for (strategy, ranking), points in sorted(lines.items(), key=str):
        axis = right if strategy == "inference_reduce" else left
        xs, ys = zip(*sorted(points))
        label = strategy.replace("_", "-") + (f" (ES-{ranking.capitalize()})" if ranking else "")
        axis.plot(xs, ys, marker="o", label=label)
    for axis, xlabel in ((left, "kept experts n'"), (right, "active experts k'")):
        axis.axhline(100 * report["base"]["average"], color="grey", linestyle="--",
                     label=f"base (n={report['num_experts']}, k={report['topk']})")
        axis.set_xlabel(xlabel)
        axis.set_ylim(0, 105)
        axis.legend(fontsize=8)
    left.set_ylabel("average accuracy (%)")
    fig.suptitle("Expert pruning (paper section 2, App. D)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)
