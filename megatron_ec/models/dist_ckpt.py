"""Model weights to and from Megatron-Core torch_dist checkpoints (resharded on load).

A torch_dist checkpoint stores every tensor with its global shape and each rank's slice, so a
checkpoint written at one TP/EP layout loads at any other. Saving and loading are collective: every
rank calls them.
"""

from __future__ import annotations

from pathlib import Path

import torch

SAVE_THREADS = 2
"""Writer threads (and files) per rank: one writes while the other waits on the disk."""


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a zero-copy alias of it whose storage holds exactly its bytes.

    Megatron-Core's torch_dist writer clones every CPU tensor whose storage is larger than the
    tensor (`FileSystemWriterAsync._clone_or_dequantize_if_needed`), because `torch.save` of a view
    writes the whole storage. Its own factories hand it such views (the gate and up halves of
    every gated `linear_fc1`, i.e. most of an MoE model), so a save briefly held a second copy of
    the model. A contiguous view aliased through numpy has a storage of its own size: nothing is
    cloned and `torch.save` writes the same bytes.
    """
    if (tensor.device.type != "cpu" or not tensor.is_contiguous()
            or tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()):
        return tensor
    raw = tensor.detach().reshape(-1).view(torch.uint8).numpy()
    return torch.from_numpy(raw).view(tensor.dtype).view(tensor.shape)


def _without_views(sharded_state_dict: dict) -> None:
    """Build the factories now and give every sharded tensor an exact storage (in place)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)

    def alias(value):
        if isinstance(value, ShardedTensor) and isinstance(value.data, torch.Tensor):
            value.data = exact_storage(value.data)
        return value

    dict_list_map_inplace(alias, sharded_state_dict)


def save_model_weights(model: torch.nn.Module, ckpt_dir: str | Path,
                       sharded_state_dict: dict | None = None) -> None:
    """Write the model's sharded state dict (weights and persistent buffers) to `ckpt_dir`.

    Args:
        model: this rank's model.
        ckpt_dir: the torch_dist directory (created).
        sharded_state_dict: `model.sharded_state_dict()` if the caller already built it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    state = model.sharded_state_dict() if sharded_state_dict is None else sharded_state_dict
    _without_views(state)
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=SAVE_THREADS)
    dist_checkpointing.save(state, str(ckpt_dir), sharded_strategy=strategy)


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
