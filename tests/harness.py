"""Run a function on N gloo ranks: spawn, a timeout, clean teardown, the failing rank's traceback.

Usage (the function must be importable, i.e. defined at module level of a test module):

    results = run_on_ranks(my_check, world_size=4, args=(tmp_path,), timeout=300)

`results[r]` is what rank r returned (anything `torch.save` accepts). If a rank raises, every rank is
stopped and `RankFailure` carries that rank's traceback; if the ranks do not finish within `timeout`
seconds (typically a rank stuck in a collective after another failed), all are killed.

Ranks run with one intra-op thread each (4 ranks share a small CPU). `MEC_WORKER_THREADS=N`
gives each rank N threads, `MEC_WORKER_THREADS=auto` leaves torch's default (the parent's
`OMP_NUM_THREADS` if set, else one per core): the margin runs of tests/README.md use both.
Known third-party warnings are silenced in the ranks (`tests.quiet`); ours stay visible.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

WORKER_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "TORCH_COMPILE_DISABLE": "1",
    "MASTER_ADDR": "127.0.0.1",
}


def worker_threads() -> int | None:
    """Intra-op threads per rank: `MEC_WORKER_THREADS` (default 1); None = torch's default."""
    value = os.environ.get("MEC_WORKER_THREADS", "1")
    return None if value == "auto" else int(value)


class RankFailure(AssertionError):
    """A rank raised, or the ranks timed out."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, payload: bytes) -> None:
    from tests.quiet import silence_third_party

    silence_third_party()
    # Unpickled only now: importing the test module imports Megatron-Core, which warns.
    fn, args, kwargs = pickle.loads(payload)
    os.environ.update(WORKER_ENV)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_PORT=str(port))
    threads = worker_threads()
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    out = Path(out_dir)
    try:
        result = fn(*args, **kwargs)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - the traceback is the report
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
    finally:
        _teardown()


def _teardown() -> None:
    try:
        from megatron_ec.parallel import shutdown_parallel

        shutdown_parallel()
    except Exception:  # noqa: BLE001 - best effort after a failure
        pass


def run_on_ranks(fn: Callable, world_size: int, args: tuple = (), kwargs: dict | None = None,
                 timeout: float = 300.0) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` spawned gloo ranks and return each rank's result."""
    ctx = mp.get_context("spawn")
    payload = pickle.dumps((fn, args, kwargs or {}))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mec_ranks_") as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, out_dir, payload), daemon=False)
            for r in range(world_size)
        ]
        for proc in procs:
            proc.start()
        failure = _wait(procs, Path(out_dir), timeout)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        if failure:
            raise RankFailure(failure)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)
                for r in range(world_size)]


def _wait(procs, out_dir: Path, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        errors = sorted(out_dir.glob("rank*.err"))
        if errors:
            time.sleep(0.5)  # let the other ranks report too; the first error is the cause
            first = errors[0]
            return f"{first.stem} failed:\n{first.read_text()}"
        if all(not p.is_alive() for p in procs):
            missing = [r for r in range(len(procs)) if not (out_dir / f"rank{r}.pt").exists()]
            if missing:
                codes = [p.exitcode for p in procs]
                return f"ranks {missing} exited without a result (exit codes {codes})"
            return None
        time.sleep(0.1)
    return f"timed out after {timeout:.0f} s (a rank is probably stuck in a collective)"
