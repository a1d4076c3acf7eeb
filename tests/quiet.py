"""Silence the known third-party warnings of test subprocesses; ours stay visible.

Rank workers (`tests.harness`) call `silence_third_party()` first thing; CLI subprocesses get it
through `tests/quiet_site/sitecustomize.py` on their PYTHONPATH (`tests.test_finetune_support`).
A warning is dropped only when the module it is attributed to is a third-party package below, so
a deprecated library call made from `megatron_ec` (attributed to our module) still prints, and so
does every `megatron_ec` logger.
"""

from __future__ import annotations

import logging
import re
import warnings

THIRD_PARTY_MODULES = r"(megatron\.core|torch|transformers|datasets|huggingface_hub|safetensors|" \
    r"tokenizers|accelerate|pyarrow|numpy)(\..*)?$"
"""`warnings` attributes a warning to the module at its `stacklevel`: these are the packages whose
CPU/gloo fallbacks and deprecations fill a rank's stderr (Apex/TE missing, ShardedTensor,
`reduce_scatter_tensor`, single-process dist-ckpt loads, sequence parallel at TP1, ...)."""

KNOWN_LOG_RECORDS = {
    "megatron.core.models.gpt.gpt_model": r"GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": r"MCore's async save is deprecated",
}
"""Megatron-Core logger name -> the message it logs at WARNING on every model build / save."""


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_third_party() -> None:
    """Install the filters in this process (idempotent enough: filters are cheap)."""
    warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)
    for name, pattern in KNOWN_LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_DropMatching(pattern))
