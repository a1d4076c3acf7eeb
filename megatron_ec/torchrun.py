"""torchrun for the launcher: `python -m megatron_ec.torchrun [torchrun args] -m MODULE ...`.

The same arguments and behaviour as `torchrun` (`torch.distributed.run`), except how a failed
launch ends:

- a worker exited with status 2 (`megatron_ec.training.launch.EXIT_USER_ERROR`: a user error,
  whose one line rank 0 already printed) and every other failed worker did too or was stopped by
  the agent (SIGTERM/SIGKILL): exit with status 2 and print nothing more (no elastic-agent
  traceback, no `ChildFailedError` report);
- any other worker failure (a bug, a signal, a lost peer): torchrun's own failure report (which
  rank, exit code or signal, the time), without the agent's Python traceback, then (several
  nodes) one line saying how to resume, and exit status 1;
- the rendezvous did not complete (another node never came, e.g. node 0 stopped at a failed
  check): one line naming MASTER_ADDR:MASTER_PORT and the timeout, exit status 3.

`torchrun` itself prints a traceback of its own agent for all three.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

EXIT_USER_ERROR = 2
EXIT_WORKER_FAILED = 1
EXIT_NO_RENDEZVOUS = 3


def main(argv: list[str] | None = None) -> int:
    # The agent's own c10d messages (a store that cannot be reached is logged from C++ with a
    # stack dump) are replaced by the line below; read when torch loads, so set only for this
    # process, not for the workers it starts.
    user_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = user_level or "FATAL"
    import torch  # noqa: F401

    if user_level is None:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    # The agent logs each failure (and the SIGTERMs it sends to the other workers) at WARNING /
    # ERROR; the summary below replaces them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    node = f"node {args.node_rank}" if str(args.nnodes) not in ("1", "1:1") else "torchrun"
    try:
        run(args)
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        # the workers that had not exited yet when the first one did are stopped by the agent
        # (SIGTERM, then SIGKILL after its grace period)
        if EXIT_USER_ERROR in codes and codes <= {EXIT_USER_ERROR, -signal.SIGTERM, -signal.SIGKILL}:
            return EXIT_USER_ERROR
        print(f"megatron_ec.torchrun ({node}): worker failure\n{err.format_msg()}",
              file=sys.stderr)
        if node != "torchrun":
            print(f"megatron_ec.torchrun ({node}): a worker failed (its output is above); if a "
                  "node was lost (e.g. 'Connection reset by peer', a SIGKILL), launch every node "
                  "again: each phase resumes from its last checkpoint", file=sys.stderr)
        return EXIT_WORKER_FAILED
    except (DistError, RendezvousError, TimeoutError) as err:  # e.g. DistNetworkError: no store
        name = type(err).__name__
        timeout = os.environ.get("MEGATRON_EC_RDZV_TIMEOUT", "the rendezvous timeout")
        where = f"{args.master_addr}:{args.master_port}"
        print(f"megatron_ec.torchrun ({node}): error: no rendezvous of {args.nnodes} node(s) at "
              f"{where} (timeout {timeout} s, {name}); another node stopped (node 0 prints why) or "
              "never started", file=sys.stderr)
        return EXIT_NO_RENDEZVOUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
