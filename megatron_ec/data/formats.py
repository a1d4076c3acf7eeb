r"""Record formats: turning a raw record into a conversation (a list of chat messages).

Three formats are understood, told apart by their keys when ``DataConfig.format == "auto"``:

- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.
  A system message may only come first; at least one assistant message is required.
- ``alpaca`` (Stanford Alpaca; LLM-Adapters Math7K/Math14K/commonsense_15k):
  ``instruction``, ``output``, optional ``input`` and ``answer``. The user turn is the instruction,
  followed by a blank line and the input when the input is non-empty. The assistant turn is the
  output. When ``answer`` is given and the output does not already end with it (as a number when
  the answer is a number, else as a whole word, ignoring a final period),
  ``"\nThe answer is {answer}."`` is appended: the math scorer reads the last number, so the
  target must end with the gold answer, and outputs that already do are left untouched.
- ``prompt_completion``: ``prompt`` (user turn) and ``completion`` (assistant turn).

Any key outside the format (and outside ``DataConfig.ignore_keys``) is an error, so that a typo
such as ``outputs`` does not silently train on nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

from megatron_ec.data.errors import DataError
from megatron_ec.data.readers import Record

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

_TRAILING_NUMBER = re.compile(r"(-?[\d,]*\.?\d+)$")
_FIX_KEYS = "rename the keys, or list extra keys in DataConfig.ignore_keys"


def to_conversation(record: Record, data_format: str,
                    ignore_keys: Collection[str]) -> list[Message]:
    """Converts one record to chat messages.

    Args:
        record: the raw record.
        data_format: ``"auto"`` or one of the format names above.
        ignore_keys: keys to ignore in every record.

    Returns:
        The messages, each ``{"role": ..., "content": ...}``.

    Raises:
        DataError: the record does not fit the format, or its format cannot be detected.
    """
    keys = set(record.fields) - set(ignore_keys)
    name = detect_format(keys, record.location) if data_format == "auto" else data_format
    required, optional, convert = FORMAT_SPECS[name]
    missing = sorted(required - keys)
    if missing:
        raise DataError(record.location, f"{name} record lacks {missing}", _FIX_KEYS)
    unknown = sorted(keys - required - optional)
    if unknown:
        raise DataError(record.location, f"unknown key(s) {unknown} for format {name}", _FIX_KEYS)
    return convert(record)


def detect_format(keys: Collection[str], location: str) -> str:
    """Names the format a record's keys belong to.

    Raises:
        DataError: no format matches.
    """
    for name, marker in (("messages", "messages"), ("prompt_completion", "prompt"),
                         ("alpaca", "instruction")):
        if marker in keys:
            return name
    raise DataError(
        location,
        f"cannot tell the format from keys {sorted(keys)}",
        "use 'messages', 'instruction'/'output' or 'prompt'/'completion' keys",
    )


def _messages(record: Record) -> list[Message]:
    messages = record.fields["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(record.location, "'messages' must be a non-empty list", "fix the record")
    conversation = [_message(item, index, record.location) for index, item in enumerate(messages)]
    roles = [message["role"] for message in conversation]
    if "system" in roles[1:]:
        raise DataError(record.location, "a system message after the first", "move it first")
    if "assistant" not in roles:
        raise DataError(record.location, "no assistant message to train on", "add one or drop it")
    return conversation


def _message(item: Any, index: int, location: str) -> Message:
    if not isinstance(item, dict) or set(item) != {"role", "content"}:
        raise DataError(
            location, f"message {index} is not {{'role', 'content'}}", "fix the message"
        )
    role, content = item["role"], item["content"]
    if role not in ROLES or not isinstance(content, str):
        raise DataError(
            location,
            f"message {index} has role {role!r} / content of type {type(content).__name__}",
            f"use a role in {ROLES} and string content",
        )
    return {"role": role, "content": content}


def _alpaca(record: Record) -> list[Message]:
    fields = record.fields
    instruction = _text(fields, "instruction", record.location)
    extra_input = _text(fields, "input", record.location) if "input" in fields else ""
    prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    output = _text(fields, "output", record.location)
    if "answer" in fields:
        output = with_answer(output, str(fields["answer"]))
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _prompt_completion(record: Record) -> list[Message]:
    prompt = _text(record.fields, "prompt", record.location)
    completion = _text(record.fields, "completion", record.location)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _text(fields: dict[str, Any], key: str, location: str) -> str:
    value = fields[key]
    if not isinstance(value, str):
        raise DataError(location, f"'{key}' is a {type(value).__name__}, not a string", "fix it")
    return value


def with_answer(output: str, answer: str) -> str:
    r"""Returns ``output``, with ``"\nThe answer is {answer}."`` appended unless it ends with it.

    "Ends with" ignores trailing whitespace and one final period. A numeric answer is compared
    with the output's trailing number as numbers (``"= 18.0"`` ends with ``18``, ``"= 118"`` does
    not); any other answer must end the output as a whole word (``"... is true"`` ends with
    ``true``).
    """
    answer = answer.strip()
    tail = output.rstrip().removesuffix(".").rstrip()
    if not answer or _ends_with(tail, answer):
        return output
    return f"{output.rstrip()}\nThe answer is {answer}."


def _ends_with(tail: str, answer: str) -> bool:
    gold = _as_number(answer)
    if gold is not None:
        match = _TRAILING_NUMBER.search(tail)
        return match is not None and _as_number(match.group(1)) == gold
    head = tail[: len(tail) - len(answer)]
    return tail.endswith(answer) and not (head and head[-1].isalnum())


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


FormatSpec = tuple[frozenset[str], frozenset[str], Callable[[Record], list[Message]]]
FORMAT_SPECS: dict[str, FormatSpec] = {
    "messages": (frozenset({"messages"}), frozenset(), _messages),
    "alpaca": (frozenset({"instruction", "output"}), frozenset({"input", "answer"}), _alpaca),
    "prompt_completion": (frozenset({"prompt", "completion"}), frozenset(), _prompt_completion),
}
"""Per format: required keys, optional keys, converter."""
