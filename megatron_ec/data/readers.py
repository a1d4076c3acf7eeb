"""Reading raw records from JSONL, JSON arrays, Parquet and ``save_to_disk`` folders.

Every record comes with a location string (``file:line`` for JSONL, ``file record N`` otherwise,
counting from 0) so later stages can name it in a ``DataError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

from megatron_ec.data.errors import DataError
from megatron_ec.textfile import TextFileError, decode_utf8


@dataclasses.dataclass(frozen=True)
class Record:
    """One raw record and where it came from."""

    location: str
    """``path:line`` (JSONL, 1-based line) or ``path record N`` (0-based index)."""

    fields: dict[str, Any]
    """The record's keys and values, as read."""


def read_records(path: str) -> Iterator[Record]:
    """Yields the records of one data file or folder.

    Args:
        path: a ``.jsonl`` file, a ``.json`` file with an array of objects, a ``.parquet`` file,
            or a folder written by ``datasets.Dataset.save_to_disk``.

    Raises:
        DataError: the path is missing, of an unknown kind, or holds something other than
            records (objects).
    """
    if os.path.isdir(path):
        return _read_saved_dataset(path)
    if not os.path.isfile(path):
        raise DataError(path, "no such file or folder", "fix the path in DataConfig")
    readers = {".jsonl": _read_jsonl, ".json": _read_json_array, ".parquet": _read_parquet}
    extension = os.path.splitext(path)[1].lower()
    if extension not in readers:
        raise DataError(
            path,
            f"unknown file type {extension!r}",
            "use .jsonl, .json (an array), .parquet or a datasets save_to_disk folder",
        )
    return readers[extension](path)


def _read_jsonl(path: str) -> Iterator[Record]:
    """Parses JSON Lines one line at a time, so a bad line is reported with its number."""
    with open(path, "rb") as stream:  # Decoded per line, so a non-UTF-8 byte is located too.
        for line_number, raw in enumerate(stream, start=1):
            location = f"{path}:{line_number}"
            line = _decoded(raw, path, line_number)
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    location, f"invalid JSON ({error.msg})", "fix or remove the line"
                ) from None
            yield Record(location, _require_object(fields, location, "fix or remove the line"))


def _decoded(raw: bytes, path: str, first_line: int = 1) -> str:
    """UTF-8 text (a byte-order mark tolerated), or a DataError naming the file and line."""
    try:
        return decode_utf8(raw, path, first_line)
    except TextFileError as error:
        raise DataError(error.location, error.problem, error.fix) from None


def _read_json_array(path: str) -> Iterator[Record]:
    with open(path, "rb") as stream:
        text = _decoded(stream.read(), path)
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}",
            f"invalid JSON ({error.msg})",
            "fix the file; if it holds one object per line, rename it to .jsonl",
        ) from None
    if not isinstance(content, list):
        raise DataError(
            path,
            f"expected a JSON array of records, found {type(content).__name__}",
            "store the records as [{...}, {...}] or as JSON Lines (.jsonl)",
        )
    for index, fields in enumerate(content):
        location = f"{path} record {index}"
        yield Record(location, _require_object(fields, location, "fix or remove the record"))


def _read_parquet(path: str) -> Iterator[Record]:
    import datasets  # Imported here: `datasets` is slow to import and only these formats need it.
    import pyarrow
    import pyarrow.parquet

    try:
        pyarrow.parquet.read_metadata(path)  # A corrupt footer fails here, before any logging.
        table = datasets.load_dataset("parquet", data_files=path, split="train")
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(path, f"unreadable Parquet file ({reason})",
                        "re-write it (e.g. Dataset.to_parquet) or convert it to .jsonl") from None
    yield from _rows_to_records(table, path)


def _read_saved_dataset(path: str) -> Iterator[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise DataError(
            path, f"not a datasets save_to_disk folder ({error})",
            "point at a data file or a folder written by save_to_disk",
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(
            path,
            f"holds several splits ({', '.join(loaded)})",
            f"point at one of them, e.g. {os.path.join(path, next(iter(loaded)))}",
        )
    yield from _rows_to_records(loaded, path)


def _rows_to_records(table: Any, path: str) -> Iterator[Record]:
    """Turns the rows of a ``datasets.Dataset`` into records, dropping null (absent) columns."""
    for index, row in enumerate(table):
        fields = {key: value for key, value in row.items() if value is not None}
        yield Record(f"{path} record {index}", fields)


def _require_object(fields: Any, location: str, fix: str) -> dict[str, Any]:
    if not isinstance(fields, dict):
        raise DataError(location, f"expected a JSON object, found {type(fields).__name__}", fix)
    return fields
