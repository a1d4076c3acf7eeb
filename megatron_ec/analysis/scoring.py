"""Benchmark accuracy of a loaded model, as ``megatron_ec.evaluate`` scores it, for the analyses
that evaluate model variants (expert pruning, the persistent-path ablation).

The tasks, their local data files, the prompts (the training template), greedy generation and
the answer rules are ``megatron_ec.eval``'s (``docs/EVALUATION.md``); only the per-sample files
and the printed table of the CLI are left out. Items are read once and scored per variant.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation options (the names and meanings of ``megatron_ec.evaluate``'s)."""
    parser.add_argument("--hf", required=True, help="directory written by checkpoint_convert export")
    parser.add_argument("--tasks", required=True, nargs="+", help="task or group names")
    parser.add_argument("--data-dir", required=True, help="folder holding the tasks' data files")
    parser.add_argument("--limit", type=int, default=None, help="first N questions per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="override every task's generation budget")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def read_items(args: argparse.Namespace) -> dict:
    """{task name: (task, items)}; ValueError (one line) for a bad flag or data file."""
    from megatron_ec.eval.tasks import load_items, resolve_tasks

    if not Path(args.hf, "config.json").is_file():
        raise ValueError(f"--hf {args.hf}: not an HF model directory (no config.json); pass the "
                         "directory checkpoint_convert export wrote")
    if not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir}: no such directory")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    tasks = resolve_tasks([name for value in args.tasks for name in value.split(",") if name])
    return {task.name: (task, load_items(task, args.data_dir, args.limit)) for task in tasks}


def score(loaded, items: dict, args: argparse.Namespace) -> dict:
    """``{"tasks": {name: {"accuracy", "correct", "total"}}, "average"}`` of one model variant.

    ``average`` is the unweighted mean over the tasks (the paper's "Avg." column).
    """
    from megatron_ec.eval.generate import generate, render_prompts

    results = {}
    for name, (task, task_items) in items.items():
        prompts = render_prompts(loaded, [item.prompt for item in task_items])
        outputs = generate(loaded, prompts, args.max_new_tokens or task.max_new_tokens,
                           args.batch_size)
        correct = sum(bool(task.correct(task.parse(output), item.gold))
                      for output, item in zip(outputs, task_items, strict=True))
        results[name] = {"accuracy": correct / len(task_items), "correct": correct,
                         "total": len(task_items)}
    average = sum(r["accuracy"] for r in results.values()) / len(results)
    return {"tasks": results, "average": average}
