r"""Scoring math answers the way LLM-Adapters (and the ExpertCondenser evaluation) does.

- Numeric sets (GSM8K, SVAMP, MultiArith, AddSub, SingleEq, MAWPS): remove commas, take the last
  match of ``-?\d+\.?\d*`` in the generated text, and count it correct when it is within
  ``1e-3`` of the gold answer.
- AQuA (options A-E): see ``extract_option_letter``.

Generation is greedy decoding with a stock Hugging Face model, prompts left-padded in batches.
The paper's own evaluation uses 4-beam search; greedy is the cheaper, deterministic default here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch

_NUMBER = re.compile(r"-?\d+\.?\d*")
# Only "answer"/"option" ignore case: a lower-case "a" ("the answer is a number") is no option.
_STATED_OPTION = re.compile(r"(?i:answer)(?: is|:)?\s*(?i:option\s*)?\(?([A-Z])\)?(?![A-Za-z])")


def extract_last_number(text: str) -> float | None:
    """The last number in ``text`` (commas removed), or None if there is none.

    >>> extract_last_number("3 + 4 = 7. The answer is 1,234.")
    1234.0
    """
    matches = _NUMBER.findall(text.replace(",", ""))
    return float(matches[-1]) if matches else None


def is_correct(pred: float | None, gold: float | str, tol: float = 1e-3) -> bool:
    """Whether a predicted number matches the gold answer within ``tol``.

    Args:
        pred: the extracted prediction; None (nothing extracted) is wrong.
        gold: the gold answer, a number or a numeric string (commas allowed).
        tol: absolute tolerance (LLM-Adapters uses 1e-3).
    """
    if pred is None:
        return False
    gold_value = float(gold.replace(",", "")) if isinstance(gold, str) else float(gold)
    return abs(pred - gold_value) <= tol


def extract_option_letter(text: str, options: str = "ABCDE",
                          llm_adapters_rule: bool = False) -> str | None:
    """The multiple-choice option a generated text picks (AQuA style), or None.

    Default rule: the last explicit statement such as ``answer is (C)`` / ``Answer: C``; failing
    that, the last stand-alone option letter (``C``, ``(C)``, ``C)``). With
    ``llm_adapters_rule=True``: the *first* character of the text that is an option letter, as in
    LLM-Adapters' evaluation (crude: the ``A`` of ``After`` counts), for comparable numbers.
    """
    if llm_adapters_rule:
        return next((char for char in text if char in options), None)
    stated = [letter for letter in _STATED_OPTION.findall(text) if letter in options]
    if stated:
        return stated[-1]
    standalone = re.findall(rf"(?<![A-Za-z])([{options}])(?![A-Za-z])", text)
    return standalone[-1] if standalone else None


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str],
                     max_new_tokens: int = 256, batch_size: int = 8) -> list[str]:
    """Greedy completions of fully rendered prompts (chat template applied, BOS included).

    Prompts are tokenised without adding special tokens and left-padded, so every row's last
    prompt token sits at the same position. Returns only the generated text, special tokens
    removed.
    """
    from megatron_ec.eval.generate import left_pad

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    device = next(model.parameters()).device
    completions = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = left_pad(
                tokenizer(list(prompts[start:start + batch_size]), add_special_tokens=False)
                ["input_ids"], pad_id,
            )
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, input_ids.shape[1]:]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return completions


@dataclasses.dataclass(frozen=True)
class MathScore:
    """Result of ``math_accuracy``."""

    accuracy: float
    """Fraction correct, in [0, 1]."""

    num_correct: int
    completions: list[str]
    """The generated texts, in prompt order."""

    predictions: list[float | None]
    """The number extracted from each completion."""


def math_accuracy(model: Any, tokenizer: Any, prompts: Sequence[str],
                  golds: Sequence[float | str], max_new_tokens: int = 256,
                  batch_size: int = 8, tol: float = 1e-3) -> MathScore:
    """Generates an answer per prompt and scores its last number against the gold answer."""
    if len(prompts) != len(golds) or not prompts:
        raise ValueError(
            f"got {len(prompts)} prompts and {len(golds)} gold answers; pass equal, non-zero counts"
        )
    completions = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    predictions = [extract_last_number(text) for text in completions]
    pairs = zip(predictions, golds, strict=True)
    num_correct = sum(is_correct(pred, gold, tol) for pred, gold in pairs)
    return MathScore(num_correct / len(prompts), num_correct, completions, predictions)
