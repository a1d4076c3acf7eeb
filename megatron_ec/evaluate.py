"""Zero-shot accuracy of an exported model on the paper's benchmarks, from local data files.

    python -m megatron_ec.evaluate --hf EXPORTED_DIR --tasks math commonsense aime25
        --data-dir DIR [--out results.json] [--limit N] [--batch-size 16] [--max-new-tokens N]

``--tasks`` takes task names or groups (``math``, ``s1k``, ``commonsense``), space- or
comma-separated; ``docs/EVALUATION.md`` lists each task's data file, record layout and answer rule.
The model is loaded with its ExpertCondenser routing restored and prompted with the chat template
it was trained with; decoding is greedy (fp32 on CPU, bf16 on CUDA). The accuracy table is printed;
with ``--out FILE`` the per-task results go to FILE (JSON) and every question's prompt, output,
parsed answer and gold to ``FILE`` with the suffix ``.samples.jsonl``, each written under a
temporary name and renamed when complete. Bad input fails before the model is loaded, with one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROG = "megatron_ec.evaluate"
EXIT_USER_ERROR = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="directory written by checkpoint_convert export")
    parser.add_argument("--tasks", required=True, nargs="+", help="task or group names")
    parser.add_argument("--data-dir", required=True, help="folder holding the tasks' data files")
    parser.add_argument("--out", default=None, help="results JSON (samples go beside it)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="override every task's generation budget")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> list:
    """The tasks to run; raises ValueError for anything wrong with the command line."""
    from megatron_ec.eval.tasks import resolve_tasks

    # Checked here: transformers would take a missing directory for a hub repo id.
    if not Path(args.hf, "config.json").is_file():
        raise ValueError(f"--hf {args.hf}: not an HF model directory (no config.json); pass the "
                         "directory checkpoint_convert export wrote")
    if not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir}: no such directory; pass the folder "
                         "holding the task data (the LLM-Adapters dataset/ layout)")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if args.out is not None and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory; pass a file name such as results.json")
    names = [name for value in args.tasks for name in value.split(",") if name]
    return resolve_tasks(names)


def samples_path(out: str) -> Path:
    return Path(out).with_suffix(".samples.jsonl")


def run_task(task, items, loaded, args) -> tuple[dict, list[dict]]:
    """Generate, parse and score one task; returns (summary, per-sample records)."""
    from megatron_ec.eval.generate import ProgressBar, generate, render_prompts

    budget = args.max_new_tokens or task.max_new_tokens
    prompts = render_prompts(loaded, [item.prompt for item in items])
    bar = ProgressBar(len(items), task.name, enabled=not args.no_progress)
    began = time.monotonic()
    try:
        outputs = generate(loaded, prompts, budget, args.batch_size, progress=bar.update)
    finally:
        bar.close()
    samples = []
    for index, (item, prompt, output) in enumerate(zip(items, prompts, outputs, strict=True)):
        parsed = task.parse(output)
        samples.append({"task": task.name, "index": index, "location": item.location,
                        "prompt": prompt, "output": output, "parsed": parsed, "gold": item.gold,
                        "correct": bool(task.correct(parsed, item.gold))})
    num_correct = sum(sample["correct"] for sample in samples)
    summary = {"accuracy": num_correct / len(samples), "correct": num_correct,
               "total": len(samples), "unparsed": sum(s["parsed"] is None for s in samples),
               "max_new_tokens": budget, "seconds": round(time.monotonic() - began, 3)}
    return summary, samples


def format_table(results: dict, groups: dict[str, str]) -> str:
    """The printed summary: one row per task, then each group's mean accuracy."""
    lines = [f"{'task':<12}{'group':<13}{'correct':>8}{'total':>7}{'accuracy':>10}"]
    lines.append("-" * len(lines[0]))
    for name, result in results.items():
        lines.append(f"{name:<12}{groups[name]:<13}{result['correct']:>8}{result['total']:>7}"
                     f"{100 * result['accuracy']:>9.2f}%")
    for group, mean in group_means(results, groups).items():
        lines.append(f"{'average':<12}{group:<13}{'':>15}{100 * mean:>9.2f}%")
    return "\n".join(lines)


def group_means(results: dict, groups: dict[str, str]) -> dict[str, float]:
    """Unweighted mean accuracy per group over the tasks run (the paper's "Avg." column)."""
    by_group: dict[str, list[float]] = {}
    for name, result in results.items():
        by_group.setdefault(groups[name], []).append(result["accuracy"])
    return {group: sum(values) / len(values) for group, values in by_group.items()}


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_outputs(out: str, report: dict, samples: list[dict]) -> None:
    lines = "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    write_atomically(samples_path(out), lines)
    write_atomically(Path(out), json.dumps(report, indent=2) + "\n")


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    from megatron_ec.eval.generate import load_exported
    from megatron_ec.eval.tasks import load_items

    try:
        tasks = check_args(args)
        items = {task.name: load_items(task, args.data_dir, args.limit) for task in tasks}
        loaded = load_exported(args.hf, args.device)
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{PROG}: {args.hf}: {loaded.restored_layers} MoE layers with restored routing; "
          f"template {loaded.template_source}", file=sys.stderr)
    results, samples = {}, []
    for task in tasks:
        results[task.name], task_samples = run_task(task, items[task.name], loaded, args)
        samples += task_samples
    groups = {task.name: task.group for task in tasks}
    print(format_table(results, groups))
    if args.out is not None:
        model = loaded.model
        report = {"model": str(args.hf), "template": loaded.template_source,
                  "restored_layers": loaded.restored_layers, "device": str(model.device),
                  "dtype": str(model.dtype).removeprefix("torch."), "decoding": "greedy",
                  "tasks": results, "averages": group_means(results, groups)}
        write_outputs(args.out, report, samples)
        print(f"{PROG}: wrote {args.out} and {samples_path(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
