"""Assistant-only masks, checked token by token against independent constructions."""

import numpy as np
import pytest
from tests.data_testing import char_tokenizer, sentencepiece_tokenizer

from megatron_ec.data import ChatEncoder, DataError, resolve_chat_template
from megatron_ec.data.templates import ALPACA_PREAMBLE, BUILTIN_TEMPLATES

QUESTION, ANSWER = "Tom has 4 apples. How many?", "He has 4. The answer is 4"
CONVERSATION = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]

# The chatml layout with HF generation markers, so that transformers' own
# `return_assistant_tokens_mask` gives an independent mask; the turn ends with </s>.
CHATML_WITH_GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '</s>\\n' }}"
    "{% endgeneration %}{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'</s>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    return sentencepiece_tokenizer(str(tmp_path_factory.mktemp("sp")))


def _expected(tokenizer, pieces):
    """Token ids and mask from (text or special-token id, trained) pieces, one id per char."""
    ids, mask = [], []
    for piece, trained in pieces:
        is_id = isinstance(piece, int)
        piece_ids = [piece] if is_id else tokenizer.convert_tokens_to_ids(list(piece))
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    return np.array(ids), np.array(mask)


def test_alpaca_mask_matches_hand_built_sequence(chars):
    encoder = ChatEncoder(chars, resolve_chat_template(chars, "auto", "alpaca"))
    sample = encoder.encode(CONVERSATION)
    ids, mask = _expected(chars, [
        (chars.bos_token_id, False),
        (f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{QUESTION}\n\n### Response:\n", False),
        (ANSWER, True), (chars.eos_token_id, True),
    ])
    np.testing.assert_array_equal(sample.token_ids, ids)
    np.testing.assert_array_equal(sample.assistant_mask, mask)


def test_chatml_multi_turn_gets_eos_after_each_answer(chars):
    conversation = [{"role": "system", "content": "Be brief."}, CONVERSATION[0],
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 5?"},
                    {"role": "assistant", "content": "5"}]
    encoder = ChatEncoder(chars, BUILTIN_TEMPLATES["chatml"])
    sample = encoder.encode(conversation)
    eos = chars.eos_token_id
    ids, mask = _expected(chars, [
        (chars.bos_token_id, False),
        ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        (f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>\n", True), (eos, True),
        ("<|im_start|>user\nAnd 5?<|im_end|>\n<|im_start|>assistant\n", False),
        ("5<|im_end|>\n", True), (eos, True),
    ])
    np.testing.assert_array_equal(sample.token_ids, ids)
    np.testing.assert_array_equal(sample.assistant_mask, mask)


def test_tokenizer_template_mask_matches_transformers_generation_mask(sentencepiece):
    sentencepiece.chat_template = CHATML_WITH_GENERATION
    try:
        conversation = CONVERSATION + [{"role": "user", "content": "And 7?"},
                                       {"role": "assistant", "content": "It is 7"}]
        template = resolve_chat_template(sentencepiece, "auto", "alpaca")
        assert template == CHATML_WITH_GENERATION
        sample = ChatEncoder(sentencepiece, template).encode(conversation)
        reference = sentencepiece.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    finally:
        sentencepiece.chat_template = None
    np.testing.assert_array_equal(sample.token_ids, reference["input_ids"])
    expected_mask = np.array(reference["assistant_masks"], dtype=bool)
    np.testing.assert_array_equal(sample.assistant_mask, expected_mask)


def test_sentencepiece_answer_tokens_decode_to_the_answer(sentencepiece):
    encoder = ChatEncoder(sentencepiece, BUILTIN_TEMPLATES["alpaca"])
    sample = encoder.encode(CONVERSATION)
    assert sentencepiece.decode(sample.token_ids[sample.assistant_mask]) == ANSWER + "</s>"
    prompt = sentencepiece.decode(sample.token_ids[~sample.assistant_mask])
    assert prompt == encoder.render_prompt(CONVERSATION[:1])


def test_template_without_a_chat_template_choice_is_rejected(chars):
    with pytest.raises(ValueError, match="has no chat template"):
        resolve_chat_template(chars, "tokenizer", "alpaca")
    assert resolve_chat_template(chars, "chatml", "alpaca") == BUILTIN_TEMPLATES["chatml"]


def test_template_that_rewrites_earlier_turns_is_rejected(chars):
    rewriting = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}"
                 "{% endfor %}")
    with pytest.raises(DataError, match=r"x.jsonl:4: the chat template renders earlier turns"):
        ChatEncoder(chars, rewriting).encode(CONVERSATION, "x.jsonl:4")


def test_template_errors_become_data_errors(chars):
    strict = "{{ raise_exception('no system role') if messages[0]['role'] == 'system' }}"
    conversation = [{"role": "system", "content": "S"}] + CONVERSATION
    with pytest.raises(DataError, match="x.jsonl:2: the chat template failed .*no system role"):
        ChatEncoder(chars, strict).encode(conversation, "x.jsonl:2")
