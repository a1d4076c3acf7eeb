"""Data-parallel wrapping and gradient finalisation through Megatron-Core's own DDP.

Megatron's DDP runs on CPU/gloo with the compat shim; it all-reduces gradients over the data-parallel
(and expert-data-parallel) groups and, in `finalize_model_grads`, the sequence-parallel gradients
(norms, router, shared-expert gate) over the tensor-parallel group. Gradients land in `main_grad`.
"""

from __future__ import annotations

import torch


def wrap_ddp(model: torch.nn.Module, tcfg, use_distributed_optimizer: bool = False):
    """Wrap a GPTModel in Megatron-Core's DistributedDataParallel (fp32 gradient buffers).

    Args:
        model: the GPTModel (or its Float16Module).
        tcfg: its TransformerConfig.
        use_distributed_optimizer: lay the gradient buffers out for Megatron's distributed
            optimizer (GPU; the CPU path uses torch AdamW and keeps this False).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=model)


def finalize_grads(ddp_model) -> None:
    """Reduce the gradients of one optimizer step across ranks (call once after the last backward)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([ddp_model])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def micro_batch_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """(per-token losses, loss mask) of one micro-batch, both on the model's device.

    The data pipeline yields CPU tensors; on a GPU they move to the current device first.
    """
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"], padding_mask=batch["padding_mask"])
    return losses, batch["loss_mask"].to(losses.device)
