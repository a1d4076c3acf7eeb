"""Math answer extraction, scoring and greedy generation with a stock HF model."""

import pytest

from megatron_ec.eval import math_answers
from megatron_ec.eval.math_answers import (
    extract_last_number,
    extract_option_letter,
    generate_answers,
    is_correct,
    math_accuracy,
)


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


def test_math_accuracy_scores_the_last_number(monkeypatch):
    completions = ["5 + 3 = 8. The answer is 8", "It is 1,000", "no idea"]
    monkeypatch.setattr(math_answers, "generate_answers", lambda *args: completions)
    score = math_accuracy(None, None, ["p1", "p2", "p3"], ["8", 1000, "4"])
    assert (score.num_correct, score.accuracy) == (2, pytest.approx(2 / 3))
    assert score.predictions == [8.0, 1000.0, None]
    with pytest.raises(ValueError, match="equal, non-zero counts"):
        math_accuracy(None, None, ["p1"], [])


def test_left_padded_batches_generate_what_single_prompts_do(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools.make_demo_data import write_demo_data
    from tools.make_tiny_model import make_tiny_qwen2_moe

    train, _ = write_demo_data(str(tmp_path / "demo"), num_train=100, num_heldout=5)
    model_dir = make_tiny_qwen2_moe(str(tmp_path / "tiny"), [train], seed=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    prompts = ["<s>Tom has 4 apples.", "<s>How many", "<s>Ava shares 12 cookies equally among 3"]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(text, str) and text for text in batched)
