"""Data and scoring of the local example tasks (imported by the harness through `!function`)."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_mc(**_config):
    """The multiple-choice samples of mc.jsonl: question, choices, answer (index of the gold)."""
    from datasets import Dataset

    lines = (HERE / "mc.jsonl").read_text(encoding="utf-8").splitlines()
    return {"test": Dataset.from_list([json.loads(line) for line in lines if line.strip()])}


def load_gsm8k(**_config):
    """gsm8k/test.* beside this file, read by megatron_ec.evaluate's own GSM8K reader."""
    from datasets import Dataset

    from megatron_ec.eval.tasks import TASKS, load_items

    items = load_items(TASKS["gsm8k"], str(HERE))
    return {"test": Dataset.from_list([{"question": item.prompt, "answer": item.gold,
                                        "location": item.location} for item in items])}


def score_gsm8k(doc, results):
    """megatron_ec.evaluate's GSM8K rule: the last number of the output equals the gold."""
    from megatron_ec.eval.tasks import TASKS

    task = TASKS["gsm8k"]
    return {"acc": float(bool(task.correct(task.parse(results[0]), doc["answer"])))}
