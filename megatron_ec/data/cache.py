"""On-disk cache of tokenised corpora.

The key hashes everything the tokenised result depends on: the bytes of the data files, the
tokenizer (its serialised model, special tokens), the chat template, the relevant config fields
and ``CACHE_VERSION``. Entries are ``<key>.npz`` files written atomically (a per-process
``.partial`` file, then ``os.replace``), so concurrent ranks and interrupted runs never leave a
half-written entry under a valid name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_ec.data.corpus import EncodedCorpus

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when the tokenised output of the same inputs changes (masking, EOS, formats)."""

_CHUNK_BYTES = 1 << 20


def corpus_key(paths: Sequence[str], tokenizer: Any, settings: dict[str, Any]) -> str:
    """Hex key of a tokenised corpus.

    Args:
        paths: the data files or folders, in order.
        tokenizer: the Hugging Face tokenizer.
        settings: JSON-serialisable config that affects tokenisation (format, template, ...).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True).encode())
    for path in paths:
        digest.update(path_fingerprint(path).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:32]


def path_fingerprint(path: str) -> str:
    """Hash of a file's bytes, or of every file (relative name and bytes) under a folder."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(_files_under(path))
    for file_path in files:
        digest.update(os.path.relpath(file_path, path).encode())
        with open(file_path, "rb") as stream:
            while chunk := stream.read(_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _files_under(folder: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what makes a tokenizer produce its ids: its serialised model and special tokens.

    Falls back to the vocabulary when the tokenizer has no serialisable backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.to_str()
    else:
        model = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(
        [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
         tokenizer.pad_token_id, tokenizer.all_special_tokens]
    )
    return hashlib.sha256((model + specials).encode()).hexdigest()


def load_corpus(cache_dir: str, key: str) -> EncodedCorpus | None:
    """The cached corpus under ``key``, or None if there is none."""
    path = os.path.join(cache_dir, f"{key}.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as arrays:
        corpus = EncodedCorpus(
            arrays["token_ids"], arrays["assistant_mask"], arrays["offsets"]
        )
    logger.info("Loaded tokenised data from cache %s (%d samples)", path, len(corpus))
    return corpus


def save_corpus(cache_dir: str, key: str, corpus: EncodedCorpus) -> None:
    """Writes the corpus under ``key`` atomically."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{key}.npz")
    partial_path = f"{path}.{os.getpid()}.partial"
    with open(partial_path, "wb") as stream:
        np.savez(
            stream, token_ids=corpus.token_ids, assistant_mask=corpus.assistant_mask,
            offsets=corpus.offsets,
        )
    os.replace(partial_path, path)
    logger.info("Cached tokenised data at %s", path)
