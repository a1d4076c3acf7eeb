"""Per-step metrics: one JSON line per optimizer step in `metrics.jsonl`, and TensorBoard events.

Written by rank 0 only. A line holds at least `step` (1-based, steps completed), `phase` (the method
name), `loss` (token-weighted mean over the global batch), `lr`, `grad_norm`, `tokens` (loss
tokens of the step), `tokens_per_s` (real, non-padding tokens processed per second over all
ranks), `step_time` (s), and the routing metrics of `megatron_ec.moe.state.routing_metrics`
(`routing/layer{i}/bias_mean|bias_min|bias_max|usage_gini|condensers|condenser_gate`). Steps that
validate (every `train.eval_interval` and the last, when `data.valid` is set) add `valid_loss`
and `valid_tokens` (TensorBoard: `valid/loss`, `valid/tokens`).

On resume, lines after the resumed step (logged after the checkpoint, before the crash) are dropped
and TensorBoard purges its events after that step, so the files read like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
VALID_PREFIX = "valid_"


def truncate_after(path: Path, step: int) -> None:
    """Keep only the lines of steps <= `step` (a crashed run may have logged past its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tensorboard_tag(key: str) -> str:
    """`valid_loss` -> `valid/loss`, `loss` -> `train/loss`; keys with a `/` stay as they are."""
    if "/" in key:
        return key
    if key.startswith(VALID_PREFIX):
        return f"valid/{key[len(VALID_PREFIX):]}"
    return f"train/{key}"


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors the numeric ones to TensorBoard (rank 0)."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        truncate_after(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR),
                                    purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as stream:
            stream.write(json.dumps(record, sort_keys=False) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, numbers.Real) and math.isfinite(value):
                    self.tb.add_scalar(tensorboard_tag(key), value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
