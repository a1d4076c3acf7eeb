"""`python -m megatron_ec.evaluate` on a tiny model with condenser routing, against a naive loop."""

import json

import pytest
import torch

from megatron_ec import evaluate
from megatron_ec.eval.tasks import TASKS
from megatron_ec.moe.methods import make_method

MAX_NEW_TOKENS = 8
QUESTIONS = {
    "gsm8k": ["Tom has 4 apples and buys 3 more. How many apples does he have?",
              "Ava shares 12 cookies equally among 3 friends. How many does each get?",
              "A box holds 5 pens. How many pens are in 4 boxes?"],
    "boolq": ["Please answer with true or false: is the sky green?",
              "Please answer with true or false: do fish swim?"],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2-MoE dir (no chat template: the alpaca fallback) with condenser routing."""
    from megatron_ec.eval.hf_routing import write_routing_file
    from tools.make_demo_data import write_demo_data
    from tools.make_tiny_model import make_tiny_qwen2_moe

    root = tmp_path_factory.mktemp("evaluate")
    train, _ = write_demo_data(str(root / "demo"), num_train=100, num_heldout=1)
    hf_dir = make_tiny_qwen2_moe(str(root / "tiny"), [train], seed=3)
    method = make_method("condenser", num_condensers=1,
                         decisions={"condensers": {0: [3], 1: [5]}})
    generator = torch.Generator().manual_seed(0)
    write_routing_file(hf_dir, method, {layer: torch.randn(8, generator=generator)
                                        for layer in (0, 1)})
    return hf_dir


def naive_outputs(hf_dir, questions):
    """One question at a time: stock transformers, the alpaca template, routing restored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_ec.data.templates import ALPACA_TEMPLATE
    from megatron_ec.eval.hf_routing import restore_condenser_routing

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert restore_condenser_routing(model, hf_dir) == 2
    outputs = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               chat_template=ALPACA_TEMPLATE, tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


def write_tasks(data_dir, golds):
    for task, questions in QUESTIONS.items():
        path = data_dir / TASKS[task].data
        path.parent.mkdir(parents=True, exist_ok=True)
        records = [{"instruction": q, "input": "", "output": "", "answer": gold}
                   for q, gold in zip(questions, golds[task])]
        path.with_suffix(".json").write_text(json.dumps(records))


def run(argv, capsys):
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_reproduces_a_naive_generation_loop(tiny_dir, tmp_path, capsys):
    expected = {task: naive_outputs(tiny_dir, questions) for task, questions in QUESTIONS.items()}
    parsed = {task: [TASKS[task].parse(text) for text in texts] for task, texts in expected.items()}
    # Gold = the naive loop's own answer for the first question (when it parsed one), so the
    # accuracy is not trivially 0; the other golds cannot match.
    golds = {"gsm8k": [str(parsed["gsm8k"][0] or 0), "-1", "-2"],
             "boolq": [parsed["boolq"][0] or "true", "false"]}
    golds["boolq"][1] = "true" if parsed["boolq"][1] == "false" else "false"
    write_tasks(tmp_path / "data", golds)
    out = tmp_path / "results" / "tiny.json"
    code, table, err = run(["--hf", tiny_dir, "--tasks", "gsm8k,boolq", "--data-dir",
                            str(tmp_path / "data"), "--out", str(out), "--batch-size", "2",
                            "--max-new-tokens", str(MAX_NEW_TOKENS), "--no-progress"], capsys)
    assert code == 0, err
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text()
               .splitlines()]
    for task in QUESTIONS:
        rows = [s for s in samples if s["task"] == task]
        assert [s["output"] for s in rows] == expected[task]
        assert [s["parsed"] for s in rows] == parsed[task]
        assert [s["gold"] for s in rows] == golds[task]
        assert all(s["prompt"].startswith("<s>Below is an instruction") for s in rows)
        naive_correct = sum(TASKS[task].correct(p, g) for p, g in zip(parsed[task], golds[task]))
        report = json.loads(out.read_text())["tasks"][task]
        assert (report["correct"], report["total"]) == (naive_correct, len(QUESTIONS[task]))
    assert "gsm8k" in table and "average" in table and "2 MoE layers" in err
    assert not list(out.parent.glob(".*.partial"))


def test_prompts_use_the_template_recorded_at_export(tiny_dir, tmp_path):
    import shutil

    import yaml

    from megatron_ec.data.encoding import load_tokenizer
    from megatron_ec.data.templates import CHATML_TEMPLATE, record_training_template
    from megatron_ec.eval.generate import training_encoder

    iteration = tmp_path / "run" / "iter_0000002"
    shutil.copytree(tiny_dir, iteration / "tokenizer")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"data": {
        "chat_template": "chatml"}}))
    export = tmp_path / "export"
    shutil.copytree(tiny_dir, export)
    record_training_template(iteration, export)
    encoder, source = training_encoder(load_tokenizer(str(export)), str(export))
    assert encoder.template == CHATML_TEMPLATE and "chat_template=chatml" in source
    prompt = encoder.render_prompt([{"role": "user", "content": "hi"}])
    assert prompt == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_an_imported_checkpoint_records_the_trainers_default(tiny_dir, tmp_path):
    import shutil

    from megatron_ec.data.templates import ALPACA_TEMPLATE, training_template

    shutil.copytree(tiny_dir, tmp_path / "iter_0000000" / "tokenizer")
    record = training_template(tmp_path / "iter_0000000")
    assert record == {"chat_template": "auto", "fallback_template": "alpaca",
                      "template": ALPACA_TEMPLATE}


@pytest.mark.parametrize("change, message", [
    ({"--hf": "/nonexistent/model"}, "--hf /nonexistent/model: not an HF model directory"),
    ({"--tasks": "gsm8k,nope"}, "unknown task 'nope'; valid tasks: gsm8k, singleeq"),
    ({"--tasks": "mawps"}, "mawps/test.json: no data file for task mawps; put a .json array"),
    ({"--limit": "0"}, "--limit 0: must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, change, message):
    write_tasks(tmp_path / "data", {"gsm8k": ["1", "2", "3"], "boolq": ["true", "false"]})
    args = {"--hf": tiny_dir, "--tasks": "gsm8k", "--data-dir": str(tmp_path / "data"), **change}
    code, out, err = run([item for pair in args.items() for item in pair], capsys)
    assert code == 2 and out == ""
    assert err.startswith("megatron_ec.evaluate: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_line_is_named_before_the_model_loads(tiny_dir, tmp_path, capsys):
    path = tmp_path / "data" / "MATH-500" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"problem": "p", "answer": "1"}\nnot json\n')
    out = tmp_path / "r.json"
    code, _, err = run(["--hf", tiny_dir, "--tasks", "math500", "--data-dir",
                        str(tmp_path / "data"), "--out", str(out)], capsys)
    assert code == 2 and f"{path}:2: invalid JSON" in err
    assert not out.exists()


def test_evaluate_an_export_of_a_converted_checkpoint(tiny_dir, tmp_path, capsys):
    """import -> export (which records the template) -> evaluate == the naive loop on the export."""
    from checkpoint_convert.__main__ import main as convert

    from megatron_ec.data.templates import TEMPLATE_RECORD, recorded_template

    ckpt, export = tmp_path / "ckpt", tmp_path / "export"
    for argv in (["import", "--hf", tiny_dir, "--out", ckpt],
                 ["export", "--ckpt", ckpt, "--out", export]):
        assert convert([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert (export / TEMPLATE_RECORD).is_file()
    assert recorded_template(export)["chat_template"] == "auto"  # imported: the default
    write_tasks(tmp_path / "data", {"gsm8k": ["1", "2", "3"], "boolq": ["true", "false"]})
    out = tmp_path / "r.json"
    code, _, err = run(["--hf", str(export), "--tasks", "gsm8k", "--data-dir",
                        str(tmp_path / "data"), "--out", str(out), "--limit", "2",
                        "--max-new-tokens", str(MAX_NEW_TOKENS)], capsys)
    assert code == 0, err
    assert "recorded at export" in err
    outputs = [json.loads(line)["output"] for line in out.with_suffix(".samples.jsonl")
               .read_text().splitlines()]
    assert "2 MoE layers with restored routing" in err  # the import kept the routing state
    assert outputs == naive_outputs(str(export), QUESTIONS["gsm8k"][:2])
