"""Answer parsers of megatron_ec.eval.answers on hand-written tricky outputs."""

import pytest

from megatron_ec.eval import answers


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.", 1234.0),                        # thousands separator, final period
    ("He pays $1,250,000 in total", 1250000.0),
    ("It is -7 degrees colder, so -12.", -12.0),             # negative
    ("3 + 4 = 7, then 7 * 2 = 14. The answer is 14", 14.0),  # several numbers: the last
    ("She ate 3/4 of the pie", 0.75),                        # a trailing fraction
    ("-1/2 of it", -0.5),
    ("3/4 of 20 is 15", 15.0),                               # a fraction earlier does not count
    ("The ratio is 5 / 0", 0.0),                             # no division by zero: the last number
    ("2.50 dollars", 2.5),
    ("no number here", None),
    ("", None),
])
def test_last_number(text, expected):
    assert answers.last_number(text) == expected


def test_numbers_equal_uses_the_papers_tolerance():
    assert answers.numbers_equal(18.0005, "18")
    assert answers.numbers_equal(1200.0, "1,200")
    assert not answers.numbers_equal(18.002, "18")
    assert not answers.numbers_equal(None, "0")


@pytest.mark.parametrize("text, expected", [
    ("Answer: (C) 12", "A"),                        # crude: the A of "Answer"
    ("(C) 12", "C"),
    ("After simplifying, the answer is (D)", "A"),  # LLM-Adapters: the first capital in A-E
    ("so the answer is (b) or (E)", "E"),           # lower case never counts
    ("the price is 12", None),
])
def test_aqua_takes_the_first_option_letter_like_llm_adapters(text, expected):
    assert answers.first_option_letter(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Therefore the answer is (B).", "B"),
    ("A first guess was wrong. Answer: D", "D"),
    ("The final answer is $\\boxed{C}$", "C"),
    ("\\boxed{\\text{(A)}}", "A"),
    ("Both (A) and (C) fit, but (C) is tighter", "C"),
    ("E is not an option, nor is the answer clear", None),
])
def test_gpqa_takes_the_stated_option(text, expected):
    assert answers.stated_option_letter(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),            # nested braces
    ("first \\boxed{3} then \\boxed{5}", "5"),                  # the last box
    ("\\boxed{x^{2}+\\sqrt{3}}", "x^{2}+\\sqrt{3}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 42.", "42"),
    ("\\boxed{\\frac{1}{2}", None),                             # unclosed
    ("no box", None),
])
def test_boxed_answer(text, expected):
    assert answers.boxed_answer(text) == expected


@pytest.mark.parametrize("raw, normal", [
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\text{Devon}", "Devon"),
    ("10\\%", "10"),
    ("5 \\text{ cm}", "5"),
    ("12 inches", "12"),
    ("x = 3", "3"),
    ("7.", "7"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\$5.00", "5"),
    ("2\\sqrt3", "2\\sqrt{3}"),
])
def test_normalize_math(raw, normal):
    assert answers.normalize_math(raw) == normal


@pytest.mark.parametrize("output, gold, correct", [
    ("The answer is $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac12", True),                          # numerically equal
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{(1, 2)}", "(1,2)", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("the answer is 1/2", "\\frac{1}{2}", False),                # no box: no answer
])
def test_math500_scoring(output, gold, correct):
    assert answers.math_equal(answers.math_answer(output), gold) is correct


@pytest.mark.parametrize("output, expected", [
    ("so the answer is \\boxed{073}", 73),
    ("\\boxed{204} and 5 more words 9", 204),                   # a box wins over later numbers
    ("the count is 1,024", 1024),
    ("we get 12.5", None),                                      # not an integer
    ("nothing", None),
])
def test_aime_integer(output, expected):
    assert answers.integer_answer(output) == expected


def test_aime_gold_with_leading_zeros():
    assert answers.integers_equal(73, "073")
    assert not answers.integers_equal(None, "0")


@pytest.mark.parametrize("labels, text, expected", [
    (("true", "false"), "the correct answer is false", "false"),
    (("true", "false"), "True, it is not false", "false"),       # case-sensitive: "True" no
    (("true", "false"), "It is untrue", "true"),                 # a substring counts
    (("solution1", "solution2"), "solution2 is better than solution1", "solution2"),
    (("answer1", "answer2", "answer3"), "the correct answer is answer3", "answer3"),
    (("answer1", "answer2", "answer3"), "Answer3", None),
    (("ending1", "ending2", "ending3", "ending4"), "ending4.", "ending4"),
    (("option1", "option2"), "option2 then option1", "option2"),
    (tuple(f"answer{i}" for i in range(1, 6)), "answer12", "answer1"),
])
def test_commonsense_first_label(labels, text, expected):
    assert answers.first_label(labels)(text) == expected
