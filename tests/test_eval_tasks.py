"""Task readers of megatron_ec.eval.tasks on tiny samples in the LLM-Adapters / original layouts."""

import json

import pytest

from megatron_ec.data.errors import DataError
from megatron_ec.eval.tasks import GROUPS, TASKS, load_items, resolve_tasks


def write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_parquet(path, records):
    import pyarrow
    import pyarrow.parquet

    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), str(path))


def test_llm_adapters_math_record(tmp_path):
    write_json(tmp_path / "SVAMP/test.json", [
        {"instruction": "Jack had 8 pens and gave 3 away. How many are left?", "input": "",
         "output": "", "answer": "5"},
        {"instruction": "Split 1,200 apples", "input": "among 4 boxes.", "answer": 300.0},
    ])
    first, second = load_items(TASKS["svamp"], str(tmp_path))
    assert (first.prompt, first.gold) == ("Jack had 8 pens and gave 3 away. How many are left?", "5")
    assert second.prompt == "Split 1,200 apples\n\namong 4 boxes."  # the trainer's alpaca rule
    assert second.gold == "300.0" and second.location.endswith("test.json record 1")


def test_gsm8k_reads_both_layouts(tmp_path):
    write_json(tmp_path / "a/gsm8k/test.json", [{"instruction": "q", "answer": "1,234"}])
    write_jsonl(tmp_path / "b/gsm8k/test.jsonl",
                [{"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,004"}])
    assert load_items(TASKS["gsm8k"], str(tmp_path / "a"))[0].gold == "1234"
    item = load_items(TASKS["gsm8k"], str(tmp_path / "b"))[0]
    assert (item.prompt, item.gold) == ("How many?", "1004")


def test_aqua_gold_is_the_option_letter(tmp_path):
    write_json(tmp_path / "AQuA/test.json", [
        {"instruction": "2+2? Answer Choices: (A) 1 (B) 4", "answer": "B"}])
    assert load_items(TASKS["aqua"], str(tmp_path))[0].gold == "B"
    write_json(tmp_path / "AQuA/test.json", [{"instruction": "2+2?", "answer": "F"}])
    with pytest.raises(DataError, match=r"test.json record 0: answer 'F' is not one of A, B"):
        load_items(TASKS["aqua"], str(tmp_path))


@pytest.mark.parametrize("task, answer", [
    ("boolq", "true"), ("piqa", "solution2"), ("siqa", "answer3"), ("hellaswag", "ending4"),
    ("winogrande", "option1"), ("arc_e", "answer5"), ("arc_c", "answer1"), ("obqa", "answer4"),
])
def test_commonsense_records(tmp_path, task, answer):
    path = tmp_path / TASKS[task].data
    write_json(path.with_suffix(".json"), [{"instruction": "Pick one.", "input": "",
                                           "output": f"the correct answer is {answer}",
                                           "answer": answer}])
    item = load_items(TASKS[task], str(tmp_path))[0]
    assert (item.prompt, item.gold) == ("Pick one.", answer)


def test_commonsense_rejects_a_label_of_another_dataset(tmp_path):
    write_json(tmp_path / "piqa/test.json", [{"instruction": "x", "answer": "answer1"}])
    with pytest.raises(DataError, match="not one of solution1, solution2"):
        load_items(TASKS["piqa"], str(tmp_path))


def test_math500_jsonl_answer_or_boxed_solution(tmp_path):
    write_jsonl(tmp_path / "MATH-500/test.jsonl", [
        {"problem": "Compute $1/2+0$.", "solution": "...", "answer": "\\frac{1}{2}",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "Area?", "solution": "It is $\\boxed{\\dfrac{\\pi}{4}}$."},
    ])
    first, second = load_items(TASKS["math500"], str(tmp_path))
    assert (first.prompt, first.gold) == ("Compute $1/2+0$.", "\\frac{1}{2}")
    assert second.gold == "\\dfrac{\\pi}{4}" and second.location.endswith("test.jsonl:2")


def test_aime25_parquet_with_integer_answers(tmp_path):
    write_parquet(tmp_path / "AIME25/test.parquet", [
        {"id": 0, "problem": "Find n.", "answer": "070"},
        {"id": 1, "problem": "Find m.", "answer": "588"},
    ])
    items = load_items(TASKS["aime25"], str(tmp_path))
    assert [(i.prompt, i.gold) for i in items] == [("Find n.", "70"), ("Find m.", "588")]
    assert items[1].location.endswith("test.parquet record 1")


def test_gpqa_shuffles_options_deterministically(tmp_path):
    record = {"Question": "Which is a noble gas?", "Correct Answer": "Argon",
              "Incorrect Answer 1": "Nitrogen", "Incorrect Answer 2": "Oxygen",
              "Incorrect Answer 3": "Chlorine", "Subdomain": "Chemistry"}
    write_parquet(tmp_path / "gpqa/gpqa_diamond.parquet", [record])
    item = load_items(TASKS["gpqa"], str(tmp_path))[0]
    lines = item.prompt.splitlines()
    assert lines[0] == "Which is a noble gas?" and len(lines) == 6
    assert f"({item.gold}) Argon" in lines
    assert sorted(line[4:] for line in lines[2:]) == ["Argon", "Chlorine", "Nitrogen", "Oxygen"]
    write_jsonl(tmp_path / "other/gpqa/gpqa_diamond.jsonl", [record])  # same order in any file
    assert load_items(TASKS["gpqa"], str(tmp_path / "other"))[0].prompt == item.prompt


def test_limit_takes_the_first_records(tmp_path):
    write_json(tmp_path / "AddSub/test.json",
               [{"instruction": f"q{i}", "answer": str(i)} for i in range(5)])
    assert [i.gold for i in load_items(TASKS["addsub"], str(tmp_path), limit=2)] == ["0", "1"]


def test_missing_file_names_the_path_and_layout(tmp_path):
    with pytest.raises(DataError) as error:
        load_items(TASKS["mawps"], str(tmp_path))
    message = str(error.value)
    assert f"{tmp_path}/mawps/test.json: no data file for task mawps" in message
    assert "{.json,.jsonl,.parquet}" in message and "instruction" in message


def test_malformed_jsonl_line_is_located(tmp_path):
    path = tmp_path / "MATH-500/test.jsonl"
    path.parent.mkdir()
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(DataError, match=r"test.jsonl:2: invalid JSON"):
        load_items(TASKS["math500"], str(tmp_path))


def test_record_without_a_field_is_located(tmp_path):
    write_jsonl(tmp_path / "AIME25/test.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    with pytest.raises(DataError, match=r"test.jsonl:2: record lacks 'answer'"):
        load_items(TASKS["aime25"], str(tmp_path))


def test_groups_and_unknown_names():
    assert GROUPS["math"] == ["gsm8k", "singleeq", "svamp", "multiarith", "addsub", "mawps",
                              "aqua"]
    assert len(GROUPS["commonsense"]) == 8 and GROUPS["s1k"] == ["math500", "aime25", "gpqa"]
    assert [t.name for t in resolve_tasks(["aqua", "math", "boolq"])][:2] == ["aqua", "gsm8k"]
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'; valid tasks: gsm8k, singleeq"):
        resolve_tasks(["gsm9k"])
