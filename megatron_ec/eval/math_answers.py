r"""Scoring math answers the way LLM-Adapters (and the ExpertCondenser evaluation) does.

- Numeric sets (GSM8K, SVAMP, MultiArith, AddSub, SingleEq, MAWPS): remove commas, take the last
  match of ``-?\d+\.?\d*`` in the generated text, and count it correct when it is within
  ``1e-3`` of the gold answer.
- AQuA (options A-E): see ``extract_option_letter``.

Generation lives in ``megatron_ec.eval.generate`` (greedy; the paper's own evaluation uses 4-beam
search, greedy is the cheaper, deterministic default here).
"""

from __future__ import annotations

import re


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
