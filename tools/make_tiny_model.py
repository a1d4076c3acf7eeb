"""A tiny random-init Qwen2-MoE model with its own SentencePiece tokenizer, built offline.

The tokenizer is a SentencePiece BPE model (byte fallback, digits split, identity normalisation
and no dummy prefix, so text round-trips exactly) trained single-threaded on the given corpus plus
the built-in ``alpaca`` template's fixed text. The model is a ``Qwen2MoeForCausalLM`` from config
only (hidden 64, 2 layers, 4 heads / 2 KV heads, 8 experts top-2 with ``moe_intermediate_size``
32, a gated shared expert of 64, ``norm_topk_prob=False``, untied embeddings), with random weights
from ``seed``. The folder loads with stock ``AutoTokenizer`` / ``AutoModelForCausalLM`` offline.

No chat template is saved: with ``DataConfig.chat_template="auto"`` the data pipeline falls back to
its ``alpaca`` template, the same prompt layout the LLM-Adapters math evaluation uses.

Usage::

    python tools/make_tiny_model.py --out DIR --corpus FILE... [--seed 0 --vocab-size 1000]

Corpus files are ``.jsonl`` (every string value of every record is used) or plain text.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
"""SentencePiece ids 0-3, in this order."""


def corpus_lines(corpus_files: Sequence[str]) -> Iterator[str]:
    """Non-empty lines of text from JSONL records (all string values) or plain text files.

    Each JSONL record also contributes the ``alpaca`` template's fixed lines, as its rendering
    will, so the template text gets pieces of its own.
    """
    from megatron_ec.data.templates import ALPACA_PREAMBLE
    from megatron_ec.textfile import read_text

    template_lines = [ALPACA_PREAMBLE, "### Instruction:", "### Response:"]
    for path in corpus_files:
        # Universal newlines, as reading the file in text mode would split it.
        for number, line in enumerate(io.StringIO(read_text(path), newline=None), start=1):
            is_record = path.endswith(".jsonl") and line.strip()
            texts = ([*_jsonl_strings(line, f"{path}:{number}"), *template_lines] if is_record
                     else [line])
            yield from (part for text in texts for part in text.splitlines() if part.strip())


def _jsonl_strings(line: str, location: str) -> list[str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{location}: invalid JSON ({err.msg}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{location}: expected a JSON object; fix or remove the line")
    return [value for value in record.values() if isinstance(value, str)]


def train_sentencepiece(corpus_files: Sequence[str], vocab_size: int) -> bytes:
    """Trains a SentencePiece BPE model deterministically and returns its serialised bytes.

    ``vocab_size`` is an upper bound: on a small corpus the model may have fewer pieces.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=corpus_lines(corpus_files), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=SPECIAL_TOKENS["unk"],
        bos_piece=SPECIAL_TOKENS["bos"], eos_piece=SPECIAL_TOKENS["eos"],
        pad_piece=SPECIAL_TOKENS["pad"], num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2,
    )
    return model.getvalue()


def tiny_qwen2_moe_config(vocab_size: int):
    """Returns the tiny Qwen2-MoE config (every layer sparse, one gated shared expert)."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, norm_topk_prob=False,
        tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=1,
        eos_token_id=2, pad_token_id=3,
    )


def make_tokenizer(out_dir: str, corpus_files: Sequence[str], vocab_size: int = 1000) -> Any:
    """Trains the SentencePiece model and saves it with its Hugging Face files into ``out_dir``.

    Returns:
        The Hugging Face tokenizer (pad token ``<pad>``, no chat template).
    """
    from transformers import LlamaTokenizer

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as stream:
        stream.write(train_sentencepiece(corpus_files, vocab_size))
    # add_prefix_space=False matches the model's add_dummy_prefix=False: ids equal SentencePiece's.
    tokenizer = LlamaTokenizer.from_pretrained(
        out_dir, add_prefix_space=False, local_files_only=True
    )
    tokenizer.pad_token = SPECIAL_TOKENS["pad"]
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_tiny_qwen2_moe(out_dir: str, corpus_files: Sequence[str], vocab_size: int = 1000,
                        seed: int = 0) -> str:
    """Trains the tokenizer, builds the random model and saves both into ``out_dir``.

    Args:
        out_dir: output folder (created).
        corpus_files: text for the tokenizer (e.g. the demo ``train.jsonl``).
        vocab_size: upper bound on the tokenizer's pieces; the model's vocabulary equals the
            tokenizer's size.
        seed: seeds the weights (the tokenizer training is deterministic by itself).

    Returns:
        ``out_dir``.
    """
    import torch
    from transformers import Qwen2MoeForCausalLM

    tokenizer = make_tokenizer(out_dir, corpus_files, vocab_size)
    with torch.random.fork_rng(devices=[]):  # Seed the weights without touching the caller's RNG.
        torch.manual_seed(seed)
        model = Qwen2MoeForCausalLM(tiny_qwen2_moe_config(len(tokenizer)))
    model.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    """Command-line entry point."""
    # Run as a script, the repository root is not on the path; the tool needs megatron_ec.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--corpus", required=True, nargs="+", help="tokenizer training text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args()
    for path in args.corpus:  # checked before the (slow) tokenizer training
        if not os.path.isfile(path):
            parser.error(f"--corpus {path}: no such file")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: exists and is not a directory")
    try:
        print(make_tiny_qwen2_moe(args.out, args.corpus, args.vocab_size, args.seed))
    except ValueError as err:  # a corpus file that is not UTF-8 text or not JSON Lines
        parser.error(str(err))


if __name__ == "__main__":
    main()
