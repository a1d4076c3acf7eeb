"""The user's text files (JSON, JSON Lines, YAML, markers) read with errors that name file and line.

Python's own messages (`'utf-8' codec can't decode byte 0xff in position 0`, `Expecting value:
line 1 column 1`) name neither the file nor, for a decode error, the line. Every reader of a file a
user can hand us goes through `decode_utf8`, `read_text` or `read_json`, which raise a one-line
`ValueError` subclass of the project's form `<file>:<line>: <what>; <how to fix>`. The callers'
own error types (`DataError`, `ConfigError`, `ConversionError`) take its parts as they are.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any


class TextFileError(ValueError):
    """A text file that cannot be decoded or parsed, located at a line.

    Attributes:
        location: ``path:line``.
        problem: what is wrong.
        fix: what to do about it.
    """

    def __init__(self, location: str, problem: str, fix: str) -> None:
        super().__init__(f"{location}: {problem}; {fix}")
        self.location, self.problem, self.fix = location, problem, fix


def decode_utf8(data: bytes, path: str | Path, first_line: int = 1) -> str:
    """`data` (a whole file, or one line of it) as text; a leading byte-order mark is dropped.

    Args:
        data: the bytes read.
        path: the file, for the message.
        first_line: the 1-based line number `data` starts at.

    Raises:
        TextFileError: the bytes are not UTF-8, located at the line and column of the first bad
            byte.
    """
    data = data.removeprefix(codecs.BOM_UTF8) if first_line == 1 else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise TextFileError(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[err.start]:02x} at "
                            f"column {column})", "save the file as UTF-8") from None


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file (OSError as raised; TextFileError for bytes that are not UTF-8)."""
    return decode_utf8(Path(path).read_bytes(), path)


def read_json(path: str | Path, fix: str = "repair or re-create the file") -> Any:
    """The parsed JSON of a file.

    Raises:
        OSError: the file cannot be read (missing, a directory, no permission).
        TextFileError: not UTF-8, or not JSON (located at the parser's line), with `fix`.
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TextFileError(f"{path}:{err.lineno}", f"invalid JSON ({err.msg})", fix) from None
