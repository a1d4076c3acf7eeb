"""The on-disk layout of a megatron_ec checkpoint, shared by the converter and the trainer.

    CKPT/
      latest                    text: the name of the newest complete iteration directory
      iter_0000120/
        weights/                torch_dist checkpoint of the model (any TP/EP layout)
        model.json              {"family", "model_config", "hf_config", "padded_vocab_size"}
        method_state.json       the method record (`megatron_ec.moe.methods.saved`)
        tokenizer/              the HF tokenizer files, copied at import
        train_state/            trainer only: optimizer, scheduler, RNG, data position

An iteration directory is written under a temporary name and renamed when complete, then `latest`
is replaced atomically, so a crash during a save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_ec.textfile import read_json, read_text

LATEST = "latest"
MODEL_META = "model.json"
WEIGHTS = "weights"
TOKENIZER = "tokenizer"
TRAIN_STATE = "train_state"


def iteration_name(step: int) -> str:
    return f"iter_{step:07d}"


def staging_dir(root: str | Path, step: int) -> Path:
    """Where an iteration is written before `publish()` makes it visible."""
    return Path(root) / f".{iteration_name(step)}.partial"


def publish(root: str | Path, step: int) -> Path:
    """Atomically turn a complete staging directory into `iter_N` and point `latest` at it."""
    root = Path(root)
    final = root / iteration_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging_dir(root, step), final)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, root / LATEST)
    return final


def latest_iteration(root: str | Path) -> Path | None:
    """The newest complete iteration directory, or None if `root` holds no checkpoint."""
    root = Path(root)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / read_text(marker).strip()
    if not path.is_dir():
        raise ValueError(f"{marker} points at {path.name}, which does not exist; the checkpoint "
                         "directory was edited by hand: fix or delete the 'latest' file")
    return path


def resolve(path: str | Path) -> Path:
    """Accept either a checkpoint root (uses `latest`) or an iteration directory."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such checkpoint directory; pass the directory written by "
                         "checkpoint_convert import or by megatron_ec.finetune")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory; pass a checkpoint directory (written by "
                         "checkpoint_convert import or by megatron_ec.finetune)")
    if (path / MODEL_META).is_file():
        return path
    found = latest_iteration(path)
    if found is None:
        raise ValueError(f"{path}: not a megatron_ec checkpoint (no '{LATEST}' file and no "
                         f"{MODEL_META}); pass the directory written by checkpoint_convert import "
                         "or by megatron_ec.finetune")
    return found


def write_model_meta(iteration_dir: str | Path, meta: dict) -> None:
    Path(iteration_dir, MODEL_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_model_meta(iteration_dir: str | Path) -> dict:
    path = Path(iteration_dir, MODEL_META)
    try:
        meta = read_json(path, "re-import the checkpoint or restore the file")
    except OSError as err:
        raise ValueError(f"{path}: unreadable model metadata ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object; re-import the checkpoint or restore the file")
    return meta
