r"""Tokenisation with exact assistant-token masks.

A conversation is rendered to text with a chat template, the spans of text produced by the
assistant turns are found by incremental rendering, and the text is tokenised once with character
offsets. A token is an assistant token when its characters overlap an assistant span, so a token
that merges the end of the prompt with the start of the answer (e.g. SentencePiece's ``▁Hello``
after ``[/INST] ``) is trained on. Special tokens in the rendered text stay special.

Incremental rendering: for assistant message ``i``, ``render(messages[:i], generation prompt)``
must be a prefix of ``render(messages[:i+1])``, which must be a prefix of the whole rendering. The
difference is the assistant span: the content and whatever the template closes the turn with
(e.g. ``<|im_end|>\n``). Templates that rewrite earlier turns (e.g. strip reasoning from old
turns) break this, and the sample is rejected with a ``DataError``.

If no token of an assistant span is the tokenizer's EOS, an EOS token is inserted right after the
span (and trained on), so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_ec.data.errors import DataError
from megatron_ec.data.formats import Message

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(hf_dir: str) -> Any:
    """Loads the tokenizer of a Hugging Face model folder, offline.

    Args:
        hf_dir: a folder with ``tokenizer.json`` (and usually ``tokenizer_config.json``) or a
            SentencePiece ``tokenizer.model``.

    Raises:
        ValueError: the folder has no tokenizer files.
    """
    from transformers import AutoTokenizer  # Imported here: slow, and only needed at build time.

    if not any(os.path.isfile(os.path.join(hf_dir, name)) for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{hf_dir}: no tokenizer.json or tokenizer.model; "
            "point at the model's Hugging Face folder, which holds its tokenizer"
        )
    return AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)


@dataclasses.dataclass(frozen=True)
class EncodedSample:
    """One tokenised conversation."""

    token_ids: np.ndarray
    """Token ids, int64 ``[n]``."""

    assistant_mask: np.ndarray
    """bool ``[n]``, True for tokens of an assistant turn (including its closing EOS)."""


class ChatEncoder:
    """Renders conversations with one chat template and tokenises them with assistant masks.

    Args:
        tokenizer: a Hugging Face tokenizer with offset mapping (a "fast" tokenizer).
        template: the Jinja chat template (see ``templates.resolve_chat_template``).
    """

    def __init__(self, tokenizer: Any, template: str):
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               location: str = "conversation") -> str:
        """Renders messages to text; template errors become a ``DataError`` at ``location``."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as error:
            raise DataError(
                location, f"the chat template failed ({error})",
                "fix the record or choose another DataConfig.chat_template",
            ) from error

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The text a model sees before answering: the messages plus the generation prompt."""
        return self.render(messages, add_generation_prompt=True)

    def assistant_spans(self, messages: Sequence[Message],
                        location: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
        """Renders a conversation and finds the character span of each assistant turn.

        Returns:
            The full text and ``[(start, end), ...]`` character spans, in order.

        Raises:
            DataError: the template is not prefix-stable on this conversation.
        """
        text = self.render(messages, location=location)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True, location=location)
            through = self.render(messages[: index + 1], location=location)
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(
                    location,
                    f"the chat template renders earlier turns differently once assistant turn "
                    f"{index} is added, so the answer tokens cannot be located",
                    "use DataConfig.chat_template='alpaca' or 'chatml'",
                )
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, messages: Sequence[Message], location: str = "conversation") -> EncodedSample:
        """Tokenises a conversation; see the module docstring for the masking rule."""
        text, spans = self.assistant_spans(messages, location)
        try:
            encoding = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True
            )
        except NotImplementedError as error:
            raise ValueError(
                f"{type(self.tokenizer).__name__} cannot report character offsets; "
                "load a fast tokenizer (a folder with tokenizer.json, or AutoTokenizer)"
            ) from error
        token_ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return self._close_turns(token_ids, _overlap_masks(offsets, spans))

    def _close_turns(self, token_ids: np.ndarray, span_masks: list[np.ndarray]) -> EncodedSample:
        """Merges per-span masks and inserts EOS after each span that lacks one."""
        eos_id = self.tokenizer.eos_token_id
        assistant = np.zeros(len(token_ids), dtype=bool)
        insert_after = []
        for span_mask in span_masks:
            assistant |= span_mask
            positions = np.flatnonzero(span_mask)
            if eos_id is not None and len(positions) and eos_id not in token_ids[positions]:
                insert_after.append(positions[-1] + 1)
        if insert_after:
            token_ids = np.insert(token_ids, insert_after, eos_id)
            assistant = np.insert(assistant, insert_after, True)
        return EncodedSample(token_ids, assistant)


def _overlap_masks(offsets: np.ndarray, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """For each span, a bool mask of the tokens whose characters overlap it."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    return [(starts < end) & (ends > start) for start, end in spans]
