"""Shared helpers for the data-pipeline tests: tiny tokenizers and data files."""

from __future__ import annotations

import json
import os
import string

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TEXT = (
    "What is 2 plus 3?\nIt is 5. The answer is 5\n"
    "Tom has 4 apples and buys 7 more. How many apples does Tom have?\n"
    "Tom has 4 + 7 = 11 apples. The answer is 11\n"
)


def write_jsonl(path: str, records: list[dict]) -> str:
    """Writes records as JSON Lines and returns the path."""
    with open(path, "w", encoding="utf-8") as stream:
        stream.writelines(json.dumps(record) + "\n" for record in records)
    return path


def alpaca_records(count: int, answer_words: int = 3) -> list[dict]:
    """Simple, distinct alpaca records; answers have about ``answer_words`` words."""
    return [
        {"instruction": f"Add {i} and {i + 1}.", "input": "",
         "output": " ".join(["so"] * (answer_words - 1) + [str(2 * i + 1)])}
        for i in range(count)
    ]


def char_tokenizer():
    """A fast tokenizer with one token per printable ASCII character (plus specials).

    Token ``t`` of a text is character ``t`` (special tokens aside), which makes expected masks
    easy to build independently of the pipeline.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(string.printable) - {"\x0b", "\x0c", "\r"})
    vocab = {token: index for index, token in enumerate(list(SPECIALS) + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )


def sentencepiece_tokenizer(folder: str):
    """A small SentencePiece BPE tokenizer trained on ``CHAT_TEXT``, saved in ``folder``."""
    from tools.make_tiny_model import make_tokenizer

    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as stream:
        stream.write(CHAT_TEXT * 3)
    return make_tokenizer(os.path.join(folder, "tokenizer"), [corpus], vocab_size=400)
