"""What the fine-tuning CLIs share: rank helpers, quiet logging, one-line user errors, teardown.

A user error (config, data, checkpoint, layout) prints one line to stderr on rank 0 and exits
with status 2; `MEGATRON_EC_DEBUG=1` re-raises it with its traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

EXIT_USER_ERROR = 2
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
"""Raised for the user's config, data, checkpoint or layout during setup (MEGATRON_EC_DEBUG=1 shows
the traceback)."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def quiet_libraries() -> None:
    """Megatron-Core and torch warn a lot on CPU (no TE/apex, deprecations): keep stderr readable."""
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.basicConfig(level=logging.INFO if is_rank0() else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    for name in ("megatron", "megatron.core", "torch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def user_error(prog: str, err: BaseException) -> int:
    """Report a user error as one line on rank 0 (MEGATRON_EC_DEBUG=1: re-raise with traceback)."""
    if os.environ.get("MEGATRON_EC_DEBUG"):
        raise err
    if is_rank0():
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_USER_ERROR


def shutdown() -> None:
    """Tear down the process groups if this process started them."""
    if "megatron_ec.parallel" in sys.modules:
        from megatron_ec.parallel import shutdown_parallel

        shutdown_parallel()


def list_keys() -> str:
    """Every config key with its default and docstring (from the section dataclasses)."""
    from megatron_ec.training.config import FinetuneConfig
    from megatron_ec.training.config_tree import describe_keys

    lines = []
    for key, default, doc in describe_keys(FinetuneConfig):
        lines.append(f"{key} = {default}")
        if doc:
            lines.append(f"    {doc}")
    return "\n".join(lines)
