r"""Answer parsers of the evaluation tasks: generated text -> prediction, prediction vs gold.

Every parser returns None when the text holds no answer of its kind; None is never correct.

- ``last_number``: the last number after removing commas (``-?\d+\.?\d*``, the LLM-Adapters rule),
  except that a trailing simple fraction ``a/b`` counts as ``a / b`` (LLM-Adapters reads ``b``).
  Correct when ``|pred - gold| <= 1e-3`` (``math_answers.is_correct``).
- ``first_option_letter`` (AQuA): the first character of the output in ``A-E``, the LLM-Adapters
  rule, kept for comparable numbers although crude (the ``A`` of "After" counts).
- ``stated_option_letter`` (GPQA): the last explicit "answer is (C)" / "Answer: C" /
  ``\boxed{C}``, else the last stand-alone option letter.
- ``boxed_answer`` + ``math_equal`` (MATH-500): the content of the last ``\boxed{...}`` (nested
  braces), normalised by ``normalize_math``; equal when the normal forms match or both are
  numbers within 1e-6 relative.
- ``integer_answer`` (AIME): the boxed answer if there is one, else the last number; an integer.
- ``first_label(labels)`` (commonsense, LLM-Adapters ``extract_answer``): the first occurrence,
  case-sensitive and anywhere in the text (``answer12`` contains ``answer1``), of one of the
  dataset's label words; correct when it equals the gold label exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from megatron_ec.eval.math_answers import extract_option_letter, is_correct

_NUMBER = re.compile(r"-?\d+\.?\d*")
_FRACTION_TAIL = re.compile(r"(-?\d+)\s*/\s*(\d+)\s*$")


def last_number(text: str) -> float | None:
    """The last number of ``text`` (commas removed); a trailing ``a/b`` reads as ``a / b``.

    >>> last_number("so 1,250 - 50 = 1,200.")
    1200.0
    >>> last_number("She ate 3/4 of it")
    0.75
    """
    text = text.replace(",", "")
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    fraction = _FRACTION_TAIL.search(text[: last.end()])
    if fraction and fraction.start() <= last.start() and int(fraction.group(2)) != 0:
        return int(fraction.group(1)) / int(fraction.group(2))
    return float(last.group())


def numbers_equal(pred: float | None, gold: str | float) -> bool:
    """The paper's numeric rule: ``|pred - gold| <= 1e-3`` (gold may hold commas)."""
    return is_correct(pred, gold, tol=1e-3)


def first_option_letter(text: str, options: str = "ABCDE") -> str | None:
    """AQuA, as LLM-Adapters scores it: the first character of ``text`` in ``options``."""
    return extract_option_letter(text.strip(), options, llm_adapters_rule=True)


def stated_option_letter(text: str, options: str = "ABCD") -> str | None:
    r"""The option a reasoning answer states: ``\boxed{C}``, "answer is (C)", else the last lone
    letter (GPQA)."""
    boxed = boxed_answer(text)
    if boxed is not None:
        letter = re.sub(r"\\text\{(.*?)\}|[()\s$]", r"\1", boxed)
        if len(letter) == 1 and letter in options:
            return letter
    return extract_option_letter(text, options)


def first_label(labels: Sequence[str]) -> Callable[[str], str | None]:
    """The LLM-Adapters commonsense rule for one dataset: the first of ``labels`` in the text."""
    pattern = re.compile("|".join(re.escape(label) for label in labels))

    def parse(text: str) -> str | None:
        match = pattern.search(text.strip())
        return match.group() if match else None

    return parse


def exact_equal(pred: str | None, gold: str) -> bool:
    return pred is not None and pred == gold


# ---------------------------------------------------------------------------------------------
# Boxed answers (MATH-500, AIME)
# ---------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def boxed_answer(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``, ``\boxed 5``) in ``text``.

    Braces nest: ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``. An unclosed box gives None.
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start:].split("{", 1)
    head = rest[0].removeprefix("\\boxed").removeprefix("\\fbox")
    if head.startswith(" ") and head.strip():  # "\boxed 5": the argument is one token
        return head.split()[0].rstrip("$.")
    if len(rest) < 2 or head.strip():
        return None
    depth = 1
    for index, char in enumerate(rest[1]):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1][:index]
    return None


def integer_answer(text: str) -> int | None:
    """AIME: the boxed answer if any, else the last number of the text, if it is an integer."""
    boxed = boxed_answer(text)
    source = normalize_math(boxed) if boxed is not None else text
    value = last_number(source)
    if value is None or value != int(value):
        return None
    return int(value)


def integers_equal(pred: int | None, gold: str | int) -> bool:
    return pred is not None and pred == int(str(gold).strip())


def math_answer(text: str) -> str | None:
    """MATH-500 prediction: the normalised last boxed answer."""
    boxed = boxed_answer(text)
    return None if boxed is None else normalize_math(boxed)


def math_equal(pred: str | None, gold: str) -> bool:
    """Normal forms equal, or both numbers (decimals, ``\\frac{a}{b}``, ``a/b``) that agree."""
    if pred is None:
        return False
    gold = normalize_math(gold)
    if pred == gold:
        return True
    pred_value, gold_value = _math_number(pred), _math_number(gold)
    if pred_value is None or gold_value is None:
        return False
    return abs(pred_value - gold_value) <= 1e-6 * max(1.0, abs(gold_value))


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(
    r"(?:\\text\{\s*|\\mbox\{\s*|\s)(?:units?|degrees?|cm|meters?|inches|inch|feet|foot|"
    r"dollars?|cents?|hours?|minutes?|seconds?|days?|square\s+units)\}?$"
)


def normalize_math(answer: str) -> str:
    r"""A canonical string for a MATH answer (after the Hendrycks et al. rules, written here).

    Drops ``$``, ``\left``/``\right``, ``\!``, thin spaces, degree marks (``^\circ``), ``\%``,
    trailing units written in words or ``\text{...}``, a trailing period, and all spaces; makes
    ``\dfrac``/``\tfrac`` ``\frac`` and ``\frac12`` ``\frac{1}{2}``; unwraps ``\text{...}``;
    strips a short ``x =`` in front; writes ``a/b`` of integers as ``\frac{a}{b}``; drops a
    leading ``+`` and trailing zeros of decimals (``5.0`` -> ``5``).
    """
    text = answer.strip().replace("\n", "")
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\$", "$", "\\%", "%"):
        text = text.replace(token, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\^\{?\\circ\}?", "", text).replace("°", "")
    text = _UNIT_WORDS.sub("", text).strip()
    text = _TEXT_WRAPPERS.sub(r"\1", text)
    text = text.rstrip(".").strip()
    if re.fullmatch(r"[A-Za-z]\w{0,2}\s*=\s*[^=]+", text):
        text = text.split("=", 1)[1]
    text = text.replace(" ", "")
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", text)
    text = re.sub(r"^(-?\d+)/(\d+)$", r"\\frac{\1}{\2}", text)
    text = text.removeprefix("+")
    if re.fullmatch(r"-?\d+\.\d*?0+", text):
        text = text.rstrip("0").rstrip(".")
    return text


def _math_number(text: str) -> float | None:
    fraction = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", text)
    if fraction and int(fraction.group(3)):
        sign = -1 if fraction.group(1) else 1
        return sign * int(fraction.group(2)) / int(fraction.group(3))
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", text):
        return float(text)
    return None
