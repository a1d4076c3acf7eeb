"""User-facing configuration of the SFT data pipeline."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

FORMATS = ("auto", "messages", "alpaca", "prompt_completion")
TRUNCATIONS = ("right", "drop")
BUILTIN_TEMPLATE_NAMES = ("alpaca", "chatml")
TEMPLATE_CHOICES = ("auto", "tokenizer") + BUILTIN_TEMPLATE_NAMES


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read, how to render it, and how to cut it into training sequences.

    See ``megatron_ec/data/README.md`` for the formats and the batch contract.
    """

    train: str | Sequence[str]
    """Training data: one path or a list of paths, read in order and concatenated. A path is a
    ``.jsonl`` file, a ``.json`` file holding an array of records, a ``.parquet`` file, or a folder
    written by ``datasets.Dataset.save_to_disk``. Stored as a tuple."""

    valid: str | Sequence[str] | None = None
    """Validation data, same forms as ``train``; None = no validation set."""

    format: str = "auto"
    """Record format: ``"messages"`` (``{"messages": [{"role", "content"}, ...]}``), ``"alpaca"``
    (``instruction`` / ``input`` / ``output`` / ``answer``, the LLM-Adapters Math7K/Math14K and
    commonsense_15k layout), ``"prompt_completion"`` (``prompt`` / ``completion``), or ``"auto"``
    to pick per record from its keys."""

    seq_length: int = 1024
    """Tokens per training sequence (Megatron's ``seq_length``). A sample longer than this is
    handled by ``truncation``."""

    packing: bool = True
    """True: several samples share one sequence, with no attention across them and positions
    restarting at 0 for each. False: one sample per sequence, padded to ``seq_length``."""

    truncation: str = "right"
    """What to do with a sample longer than ``seq_length``: ``"right"`` keeps its first
    ``seq_length`` tokens, ``"drop"`` drops it (counted and reported in one warning)."""

    chat_template: str = "auto"
    """How conversations become text. ``"auto"``: the tokenizer's own chat template if it has one,
    else ``fallback_template``. ``"tokenizer"``: the tokenizer's own (error if it has none).
    ``"alpaca"`` or ``"chatml"``: that built-in template, whatever the tokenizer has."""

    fallback_template: str = "alpaca"
    """Built-in template used by ``chat_template="auto"`` when the tokenizer has none.
    ``"alpaca"``: the LLM-Adapters / Stanford-Alpaca layout (``### Instruction:`` ...
    ``### Response:``), the prompt the paper's math evaluation uses; ``eos`` ends each answer.
    ``"chatml"``: ``<|im_start|>role\\n...<|im_end|>\\n`` turns (the Qwen layout); the markers
    are plain text unless the tokenizer has them as special tokens."""

    seed: int = 1234
    """Seed of the sampler's per-epoch shuffle (the paper's recipes use 1234)."""

    cache_dir: str | None = None
    """Where tokenised data is cached. None = ``<output_dir>/data_cache`` of the run; with no
    output dir either, nothing is cached."""

    shuffle: bool = True
    """Shuffle the order of sequences each epoch (deterministically from ``seed``)."""

    ignore_keys: Sequence[str] = ()
    """Record keys to ignore (e.g. ``("id", "source")``). Any other key the format does not know
    is an error, so typos such as ``outputs`` are caught. Stored as a tuple."""

    def __post_init__(self):
        object.__setattr__(self, "train", _as_paths(self.train, "train"))
        if self.valid is not None:
            object.__setattr__(self, "valid", _as_paths(self.valid, "valid"))
        object.__setattr__(self, "ignore_keys", tuple(self.ignore_keys))
        _check_choice("format", self.format, FORMATS)
        _check_choice("truncation", self.truncation, TRUNCATIONS)
        _check_choice("chat_template", self.chat_template, TEMPLATE_CHOICES)
        _check_choice("fallback_template", self.fallback_template, BUILTIN_TEMPLATE_NAMES)
        if not isinstance(self.seq_length, int) or self.seq_length < 2:
            raise ValueError(
                f"DataConfig.seq_length={self.seq_length!r}: must be an int >= 2; "
                "set it to the model's training sequence length, e.g. 1024"
            )


def _as_paths(value: str | Sequence[str], field: str) -> tuple[str, ...]:
    """Normalises one path or a list of paths (str or ``os.PathLike``) to a tuple of strings."""
    items = (value,) if isinstance(value, (str, os.PathLike)) else tuple(value)
    paths = tuple(os.fspath(p) if isinstance(p, (str, os.PathLike)) else p for p in items)
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(
            f"DataConfig.{field}={value!r}: expected a path or a non-empty list of paths; "
            "pass e.g. 'data/train.jsonl' or ['a.jsonl', 'b.parquet']"
        )
    return paths


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"DataConfig.{field}={value!r} is not supported; use one of {', '.join(choices)}"
        )
