"""Input and output directories: inputs must exist; outputs: refuse to clobber, write under a temporary name, publish only when complete.

On any error the partial output is deleted, and a directory the converter created is removed, so a
failed run leaves nothing behind (with `--overwrite`, the previous output survives a failure).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from checkpoint_convert.errors import ConversionError

TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "*.tiktoken", "chat_template*", "spiece.model")
"""Tokenizer files of an HF directory (copied at import, restored at export)."""


def check_input_dir(path: Path, flag: str, what: str) -> None:
    """Raise unless `path` (the value of `flag`) is an existing directory.

    Checked before anything is loaded, so that a typo fails in a second with the flag named
    (transformers would take a missing directory for a hub repo id).
    """
    if not path.exists():
        raise ConversionError(str(path), "no such directory", f"pass {what} as {flag}")
    if not path.is_dir():
        raise ConversionError(str(path), "not a directory", f"pass {what} as {flag}")


def check_output(out: Path, overwrite: bool) -> None:
    """Raise unless `out` is absent (under a directory), empty, or `overwrite` is set."""
    ancestor = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if ancestor != out and not ancestor.is_dir():
        raise ConversionError(str(out), f"cannot be created: {ancestor} is not a directory",
                              "choose another output path")
    if out.exists() and not out.is_dir():
        raise ConversionError(str(out), "exists and is not a directory",
                              "choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(str(out), "exists and is not empty",
                              "pass --overwrite to replace it, or choose another output directory")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of `src` into `dst` (created); returns their names."""
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted({p.name for pattern in TOKENIZER_GLOBS for p in src.glob(pattern)
                    if p.is_file()})
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


@contextmanager
def staged_directory(out: Path):
    """Yield a sibling staging directory that replaces `out` when the block succeeds."""
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, out)


def replace_directory(src: Path, out: Path) -> None:
    """Move `src` to `out`, replacing whatever `out` was (the old one is deleted afterwards)."""
    if not out.exists():
        os.replace(src, out)
        return
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(src, out)
    shutil.rmtree(old)


def remove_all_but(root: Path, keep: set[str]) -> None:
    """Delete every entry of `root` whose name is not in `keep` (stale output after overwrite)."""
    for path in root.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
