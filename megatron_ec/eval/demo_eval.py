"""Held-out math accuracy of exported models, and the demo's closing table.

    python -m megatron_ec.eval.demo_eval --hf runs/demo/hf [--base runs/demo/hf_base]
        --heldout runs/demo/data/heldout.jsonl [--max-samples 200] [--max-new-tokens 48]
        [--metrics runs/demo/phase1_bias/metrics.jsonl runs/demo/phase2_condenser/metrics.jsonl]
        [--compare sft=runs/demo/baselines/sft/hf ...] [--json runs/demo/eval.json]

Each model is a stock `transformers` model loaded from its exported directory, with the
ExpertCondenser routing restored from the directory's routing file (`restore_condenser_routing`:
learned bias, condensers, forcing); a directory without one (the base model) routes as the family
does. Prompts are rendered with the training chat template (the tokenizer's own, else `alpaca`);
the answer is the last number of the greedy completion, correct within 1e-3 (paper Sec. 8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def load_records(path: str, limit: int) -> list[dict]:
    from megatron_ec.textfile import decode_utf8

    records = []
    with open(path, "rb") as stream:  # decoded per line: a non-UTF-8 byte is located too
        for number, raw in enumerate(stream, start=1):
            line = decode_utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records.append({"prompt": _prompt(record), "answer": str(record["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not an instruction/answer record ({err}); "
                                 "fix or remove the line") from None
            if len(records) == limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _prompt(record: dict) -> str:
    extra = record.get("input") or ""
    return f"{record['instruction']}\n\n{extra}" if extra.strip() else record["instruction"]


def evaluate(hf_dir: str, records: list[dict], max_new_tokens: int) -> dict:
    """Accuracy of one exported model on `records`, with its condenser routing restored and its
    training template (`megatron_ec.eval.generate`, the generation of `megatron_ec.evaluate`)."""
    from megatron_ec.eval.answers import last_number, numbers_equal
    from megatron_ec.eval.generate import generate, load_exported, render_prompts

    loaded = load_exported(hf_dir)
    began = time.monotonic()
    completions = generate(loaded, render_prompts(loaded, [r["prompt"] for r in records]),
                           max_new_tokens, batch_size=32)
    correct = sum(numbers_equal(last_number(text), record["answer"])
                  for text, record in zip(completions, records, strict=True))
    return {"dir": hf_dir, "accuracy": correct / len(records), "correct": correct,
            "total": len(records), "restored_layers": loaded.restored_layers,
            "seconds": time.monotonic() - began, "example": completions[0].strip()}


def phase_summary(metrics_file: str) -> dict:
    from megatron_ec.training.metrics import read_metrics

    records = read_metrics(metrics_file)
    if not records:
        return {"file": metrics_file, "steps": 0}
    last = records[-1]
    condensers = {key.split("/")[1]: value for key, value in last.items()
                  if key.endswith("/condensers")}
    return {"file": metrics_file, "phase": last["phase"], "steps": last["step"],
            "first_loss": records[0]["loss"], "last_loss": last["loss"],
            "condensers": condensers}


def format_table(phases: list[dict], results: list[tuple[str, dict]], num_samples: int,
                 example: str = "") -> str:
    lines = ["", "ExpertCondenser demo summary", "-" * 64,
             f"{'phase':<12}{'steps':>6}  {'loss first':>10}  {'loss last':>10}  condensers"]
    for phase in phases:
        if phase["steps"]:
            condensers = " ".join(f"{k}={v}" for k, v in phase["condensers"].items()) or "-"
            lines.append(f"{phase['phase']:<12}{phase['steps']:>6}  {phase['first_loss']:>10.4f}"
                         f"  {phase['last_loss']:>10.4f}  {condensers}")
    lines += ["", f"held-out accuracy (last number within 1e-3, {num_samples} problems, greedy)"]
    for label, result in results:
        lines.append(f"  {label:<44}{100 * result['accuracy']:6.1f}%  "
                     f"({result['correct']}/{result['total']})")
    if example:
        lines.append(f"  e.g. {example[:90]!r}")
    return "\n".join(lines + ["-" * 64])


def _quiet() -> None:
    """No library warnings or progress bars between the table and the training log."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def labelled_dir(item: str) -> tuple[str, str]:
    """`LABEL=DIR` of a `--compare` argument (the demo evaluation and `analyze demo`)."""
    label, sep, hf_dir = item.partition("=")
    if not sep or not label or not hf_dir:
        raise ValueError(f"--compare {item!r}: expected LABEL=DIR, e.g. sft=runs/demo/sft/hf")
    return label, hf_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_ec.eval.demo_eval",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="exported (fine-tuned) HF directory")
    parser.add_argument("--base", default=None, help="HF directory of the model before training")
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--max-samples", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--metrics", nargs="*", default=[], help="metrics.jsonl of each phase")
    parser.add_argument("--compare", nargs="*", default=[], metavar="LABEL=DIR",
                        help="baselines scored beside --hf, e.g. sft=runs/demo/baselines/sft/hf")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    _quiet()
    try:
        compare = [labelled_dir(item) for item in args.compare]
        checked = [("--hf", args.hf), ("--base", args.base)] + [("--compare", d) for _, d in compare]
        for flag, value in checked:
            # Checked here: transformers would take a missing directory for a hub repo id.
            if value is not None and not Path(value, "config.json").is_file():
                raise ValueError(f"{value}: not an HF model directory (no config.json); pass "
                                 f"the directory checkpoint_convert export wrote as {flag}")
        records = load_records(args.heldout, args.max_samples)
        phases = [phase_summary(path) for path in args.metrics]
    except (ValueError, OSError) as err:
        print(f"megatron_ec.eval.demo_eval: error: {err}", file=sys.stderr)
        return 2
    results = []
    if args.base:
        results.append((f"before fine-tuning ({Path(args.base).name})",
                        evaluate(args.base, records, args.max_new_tokens)))
    tuned = evaluate(args.hf, records, args.max_new_tokens)
    label = f"fine-tuned, EC routing restored ({tuned['restored_layers']} layers)"
    results.append((label, tuned))
    for name, hf_dir in compare:
        scored = evaluate(hf_dir, records, args.max_new_tokens)
        results.append((f"baseline {name} ({scored['restored_layers']} layers restored)", scored))
    print(format_table(phases, results, len(records), example=tuned["example"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"phases": phases, "results": dict(results)},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
