"""Model weights to and from Megatron-Core torch_dist checkpoints (resharded on load).

A torch_dist checkpoint stores every tensor with its global shape and each rank's slice, so a
checkpoint written at one TP/EP layout loads at any other. Saving and loading are collective: every
rank calls them.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_model_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Write the model's sharded state dict (weights and persistent buffers) to `ckpt_dir`."""
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))


def load_model_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load `ckpt_dir` into `model`, whatever layout the checkpoint was saved at."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_dir}: checkpoint does not match the model (missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}); was it written for another model config?"
        )
