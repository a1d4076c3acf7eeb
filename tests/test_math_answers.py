"""Math answer extraction and scoring (generation: tests/test_evaluate.py)."""

import pytest

from megatron_ec.eval.math_answers import extract_last_number, extract_option_letter, is_correct


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42", 42.0),
    ("3 + 4 = 7. The answer is 1,234.", 1234.0),
    ("It drops to -5 degrees", -5.0),
    ("about 2.50 dollars", 2.5),
    ("ends with 7.", 7.0),
    ("first 3 then 4.25 then 8", 8.0),
    ("no digits here", None),
    ("", None),
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_is_correct_uses_an_absolute_tolerance():
    assert is_correct(18.0, "18")
    assert is_correct(18.0005, 18)
    assert not is_correct(18.01, "18")
    assert is_correct(1200.0, "1,200")
    assert not is_correct(None, "3")


@pytest.mark.parametrize("text, expected", [
    ("So the answer is (C).", "C"),
    ("Answer: B", "B"),
    ("After checking, option D) fits best.", "D"),
    ("the answer is a number, (E) I think", "E"),
    ("I cannot tell.", None),
])
def test_extract_option_letter(text, expected):
    assert extract_option_letter(text) == expected


def test_llm_adapters_option_rule_takes_the_first_capital_option_letter():
    text = "After checking, option D) fits best."
    assert extract_option_letter(text, llm_adapters_rule=True) == "A"
