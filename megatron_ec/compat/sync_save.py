"""Synchronous `dist_checkpointing.save` without a multiprocessing manager process.

Megatron-Core 0.19 routes every torch_dist save, synchronous ones included, through its async
writer, which collects the write results in `filesystem_async.get_write_results_queue()`: a queue
of a `multiprocessing` Manager, i.e. a spawned server process, started on the first save and kept
for the life of the trainer. Nothing ties that server to its parent: when the trainer is SIGKILLed
(OOM killer, a scheduler's preemption) the manager survives as an orphan, holding the trainer's
stdout/stderr open. MCore offers no option to avoid it (`TorchDistSaveShardedStrategy.save` always
takes the async path with `async_strategy="mcore"`).

A synchronous save writes and reads those results in the calling process (`AsyncRequest.
execute_sync`), so a plain in-process `queue.Queue` does the same job. `patch_sync_save_queue`
hands one to the writer for the duration of each synchronous `save` only; asynchronous saves,
whose writer runs in another process, still get MCore's manager queue. It also saves the seconds
the manager's spawn costs on every fresh process.

Applied on every machine (the orphan is not a CPU matter) by `megatron_ec.parallel.init_parallel`.
"""

from __future__ import annotations

import contextvars
import functools
import queue

from megatron_ec.compat.cpu_gloo import _require

_FILESYSTEM_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_TORCH_STRATEGY = "megatron.core.dist_checkpointing.strategies.torch"

_SYNC_SAVE_QUEUE: contextvars.ContextVar[queue.Queue | None] = contextvars.ContextVar(
    "megatron_ec_sync_save_queue", default=None)


def patch_sync_save_queue() -> None:
    """Give synchronous torch_dist saves an in-process results queue (idempotent).

    Raises:
        CompatError: MCore moved `get_write_results_queue` or `TorchDistSaveShardedStrategy.save`.
    """
    writer = _require(_FILESYSTEM_ASYNC, "get_write_results_queue")
    strategy = _require(_TORCH_STRATEGY, "TorchDistSaveShardedStrategy").TorchDistSaveShardedStrategy
    if getattr(writer.get_write_results_queue, "_megatron_ec_patched", False):
        return
    manager_queue = writer.get_write_results_queue
    sync_save = strategy.save

    @functools.wraps(manager_queue)
    def get_write_results_queue(mp_mode: str = "spawn"):
        local = _SYNC_SAVE_QUEUE.get()
        return local if local is not None else manager_queue(mp_mode)

    @functools.wraps(sync_save)
    def save(self, sharded_state_dict, checkpoint_dir):
        token = _SYNC_SAVE_QUEUE.set(queue.Queue())
        try:
            return sync_save(self, sharded_state_dict, checkpoint_dir)
        finally:
            _SYNC_SAVE_QUEUE.reset(token)

    get_write_results_queue._megatron_ec_patched = True
    writer.get_write_results_queue = get_write_results_queue
    strategy.save = save
