"""The demo-data generator and the tiny model maker."""

import json
import re

import pytest
import torch

from megatron_ec.data import DataConfig, build_sft_dataset, load_tokenizer
from tools.make_demo_data import write_demo_data
from tools.make_tiny_model import make_tiny_qwen2_moe

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPERATIONS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_data(str(tmp_path_factory.mktemp("demo")), num_train=300, num_heldout=40)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, demo):
    return make_tiny_qwen2_moe(str(tmp_path_factory.mktemp("tiny")), [demo[0]], seed=0)


def _records(path):
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def test_same_seed_gives_identical_files(demo, tmp_path):
    again = write_demo_data(str(tmp_path / "again"), num_train=300, num_heldout=40)
    for first, second in zip(demo, again, strict=True):
        assert open(first, "rb").read() == open(second, "rb").read()
    other = write_demo_data(str(tmp_path / "other"), num_train=300, num_heldout=40, seed=1)
    assert open(demo[0], "rb").read() != open(other[0], "rb").read()


def test_train_and_heldout_are_disjoint(demo):
    train, heldout = (_records(path) for path in demo)
    assert (len(train), len(heldout)) == (300, 40)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in heldout}


def test_worked_solutions_are_correct(demo):
    for record in _records(demo[0]) + _records(demo[1]):
        steps = EQUATION.findall(record["output"])
        assert steps, record
        known = set(re.findall(r"\d+", record["instruction"]))
        for left, operator, right, result in steps:
            assert {left, right} <= known, record  # Operands come from the question or a step.
            value = OPERATIONS[operator](int(left), int(right))
            assert value == int(result) and (operator != "/" or int(left) % int(right) == 0)
            known.add(result)
        assert record["answer"] == steps[-1][3]
        assert record["output"].endswith(f"The answer is {record['answer']}")
        assert set(record) == {"instruction", "input", "output", "answer"}


def test_tiny_model_and_tokenizer_load_offline_and_run(tiny_model_dir, demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    config = model.config
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob,
            config.tie_word_embeddings) == (8, 2, False, False)
    assert config.vocab_size == len(tokenizer) and tokenizer.chat_template is None
    text = _records(demo[1])[0]["output"]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()


def test_tiny_model_is_deterministic(tiny_model_dir, demo, tmp_path):
    again = make_tiny_qwen2_moe(str(tmp_path / "again"), [demo[0]], seed=0)
    for name in ("model.safetensors", "tokenizer.model", "tokenizer.json"):
        assert open(f"{tiny_model_dir}/{name}", "rb").read() == open(f"{again}/{name}", "rb").read()


def test_demo_data_flows_through_the_pipeline(tiny_model_dir, demo):
    tokenizer = load_tokenizer(tiny_model_dir)
    dataset = build_sft_dataset(DataConfig(train=demo[0], seq_length=512), tokenizer,
                                vocab_size=len(tokenizer))
    assert dataset.num_samples == 300
    row = dataset[0]
    restarts = (row["position_ids"][1:] == 0).nonzero()
    first_length = int(restarts[0]) + 1 if len(restarts) else dataset.seq_length
    targets = row["labels"][:first_length][row["loss_mask"][:first_length] > 0]
    output = _records(demo[0])[dataset.samples_in_row(0)[0]]["output"]
    assert tokenizer.decode(targets) == output + "</s>"


def test_load_tokenizer_reads_a_bare_sentencepiece_model(tiny_model_dir, tmp_path):
    import shutil

    import sentencepiece

    shutil.copy(f"{tiny_model_dir}/tokenizer.model", tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(str(tmp_path))
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "Ava has 12 apples.\nThe answer is 12"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    assert tokenizer.eos_token == "</s>"
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path / "missing"))


def test_tokenizer_corpus_errors_name_file_and_line(tmp_path):
    from tools.make_tiny_model import corpus_lines

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{corpus}:2: not UTF-8 text \(byte 0xe9"):
        list(corpus_lines([str(corpus)]))
    corpus.write_bytes(b'{"a": "ok"}\n{"a": \n')
    with pytest.raises(ValueError, match=rf"{corpus}:2: invalid JSON"):
        list(corpus_lines([str(corpus)]))


def test_demo_eval_checks_its_paths_first(tmp_path, capsys):
    from megatron_ec.eval.demo_eval import main

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_bytes(b'{"instruction": "x", "answer": "1"}\n\xff\n')
    assert main(["--hf", str(tmp_path / "MISSING"), "--heldout", str(heldout)]) == 2
    assert "MISSING: not an HF model directory" in capsys.readouterr().err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert main(["--hf", str(tmp_path / "hf"), "--heldout", str(heldout)]) == 2
    assert f"{heldout}:2: not UTF-8 text" in capsys.readouterr().err
