"""The evaluation tasks: where each one's local data lives, how a record becomes an item, how the
answer is parsed and scored.

Data layout under ``--data-dir DIR`` (the LLM-Adapters ``dataset/`` folder, plus the original
files of the S1K benchmarks): ``DIR/<data>.json`` (a JSON array), ``.jsonl`` or ``.parquet``,
``<data>`` per task in ``TASKS``. Records:

- LLM-Adapters math and commonsense: ``instruction`` (+ optional ``input``, ``output``) and
  ``answer`` (a number, an option letter, or a label such as ``answer2`` / ``true``). The user
  turn is built from ``instruction``/``input`` by the training pipeline's own alpaca conversion.
- GSM8K also in its original layout: ``question`` and ``answer`` ending in ``#### <number>``.
- MATH-500: ``problem`` and ``answer`` (else the boxed answer of ``solution``).
- AIME-25: ``problem`` (or ``question``) and an integer ``answer``.
- GPQA (original columns): ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``; the four
  options are shuffled per record with a fixed seed and lettered ``(A)``-``(D)``.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from typing import Any

from megatron_ec.data.errors import DataError
from megatron_ec.data.formats import to_conversation
from megatron_ec.data.readers import Record, read_records
from megatron_ec.eval import answers

EXTENSIONS = (".json", ".jsonl", ".parquet")


@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluation question."""

    location: str
    """``file:line`` or ``file record N`` of its record."""
    prompt: str
    """The user turn (the chat template is applied later)."""
    gold: str


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark: data file, record reader, answer parser and scorer."""

    name: str
    group: str
    """"math" (Table 1), "s1k" (Table 2), "commonsense" (Table 3) or "demo" (`make demo`'s split)."""
    data: str
    """Data file under ``--data-dir`` without its extension (see ``EXTENSIONS``)."""
    read: Callable[[Record], Item]
    parse: Callable[[str], Any]
    """Generated text -> prediction (None: no answer found)."""
    correct: Callable[[Any, str], bool]
    """(prediction, gold) -> right or wrong."""
    max_new_tokens: int
    layout: str
    """The expected record keys, for error messages and the docs."""


def _field(record: Record, key: str) -> Any:
    if key not in record.fields:
        raise DataError(record.location, f"record lacks {key!r} (keys: {sorted(record.fields)})",
                        "fix the record or point --data-dir at the expected layout")
    return record.fields[key]


def _user_turn(record: Record) -> str:
    """The user message the trainer builds from an alpaca record (instruction + input)."""
    fields = {key: record.fields[key] for key in ("instruction", "input") if key in record.fields}
    conversation = to_conversation(Record(record.location, {**fields, "output": ""}), "alpaca", ())
    return conversation[0]["content"]


def _number_gold(record: Record, value: Any) -> str:
    gold = str(value).strip().replace(",", "")
    try:
        float(gold)
    except ValueError:
        raise DataError(record.location, f"answer {value!r} is not a number",
                        "fix the record's answer") from None
    return gold


def _choice_gold(record: Record, choices: tuple[str, ...]) -> str:
    gold = str(_field(record, "answer")).strip()
    if gold not in choices:
        raise DataError(record.location, f"answer {gold!r} is not one of {', '.join(choices)}",
                        "fix the record's answer")
    return gold


def _numeric_item(record: Record) -> Item:
    _field(record, "instruction")
    return Item(record.location, _user_turn(record),
                _number_gold(record, _field(record, "answer")))


def _gsm8k_item(record: Record) -> Item:
    if "instruction" in record.fields:
        return _numeric_item(record)
    answer = str(_field(record, "answer"))
    if "####" not in answer:
        raise DataError(record.location, "original GSM8K answer without '#### <number>'",
                        "fix the record, or use the LLM-Adapters layout (instruction/answer)")
    return Item(record.location, str(_field(record, "question")),
                _number_gold(record, answer.rsplit("####", 1)[1]))


def _choice_reader(choices: tuple[str, ...]) -> Callable[[Record], Item]:
    def read(record: Record) -> Item:
        _field(record, "instruction")
        return Item(record.location, _user_turn(record), _choice_gold(record, choices))

    return read


def _math500_item(record: Record) -> Item:
    gold = record.fields.get("answer")
    if gold is None:
        gold = answers.boxed_answer(str(_field(record, "solution")))
        if gold is None:
            raise DataError(record.location, "no 'answer' and no \\boxed{} in 'solution'",
                            "fix the record")
    return Item(record.location, str(_field(record, "problem")), str(gold))


def _aime_item(record: Record) -> Item:
    key = "problem" if "problem" in record.fields else "question"
    gold = str(_field(record, "answer")).strip()
    if not gold.lstrip("-").isdigit():
        raise DataError(record.location, f"AIME answer {gold!r} is not an integer",
                        "fix the record's answer")
    return Item(record.location, str(_field(record, key)), str(int(gold)))


GPQA_SEED = 0


def _gpqa_item(record: Record) -> Item:
    correct = str(_field(record, "Correct Answer")).strip()
    options = [correct] + [str(_field(record, f"Incorrect Answer {i}")).strip() for i in (1, 2, 3)]
    # Seeded by the record's text, so an item's option order does not depend on the file order.
    random.Random(f"{GPQA_SEED}:{_field(record, 'Question')}").shuffle(options)
    letters = "ABCD"
    listed = "\n".join(f"({letter}) {option}" for letter, option in zip(letters, options))
    prompt = f"{str(_field(record, 'Question')).strip()}\n\n{listed}"
    return Item(record.location, prompt, letters[options.index(correct)])


_NUMERIC = dict(read=_numeric_item, parse=answers.last_number, correct=answers.numbers_equal,
                max_new_tokens=256, layout="instruction, input (optional), answer (a number)")


def _commonsense(name: str, data: str, labels: tuple[str, ...]) -> Task:
    return Task(name, "commonsense", data, _choice_reader(labels), answers.first_label(labels),
                answers.exact_equal, max_new_tokens=32,
                layout=f"instruction, answer (one of {'/'.join(labels)})")


_ANSWERS_5 = tuple(f"answer{i}" for i in range(1, 6))

TASKS: dict[str, Task] = {task.name: task for task in (
    Task("gsm8k", "math", "gsm8k/test", **{**_NUMERIC, "read": _gsm8k_item,
         "layout": "instruction/answer (LLM-Adapters) or question/answer '#### N' (original)"}),
    Task("singleeq", "math", "SingleEq/test", **_NUMERIC),
    Task("svamp", "math", "SVAMP/test", **_NUMERIC),
    Task("multiarith", "math", "MultiArith/test", **_NUMERIC),
    Task("addsub", "math", "AddSub/test", **_NUMERIC),
    Task("mawps", "math", "mawps/test", **_NUMERIC),
    Task("aqua", "math", "AQuA/test", _choice_reader(tuple("ABCDE")),
         answers.first_option_letter, answers.exact_equal, max_new_tokens=256,
         layout="instruction (with the answer choices), answer (A-E)"),
    Task("math500", "s1k", "MATH-500/test", _math500_item, answers.math_answer,
         answers.math_equal, max_new_tokens=4096, layout="problem, answer (or solution)"),
    Task("aime25", "s1k", "AIME25/test", _aime_item, answers.integer_answer,
         answers.integers_equal, max_new_tokens=4096,
         layout="problem (or question), answer (an integer)"),
    Task("gpqa", "s1k", "gpqa/gpqa_diamond", _gpqa_item, answers.stated_option_letter,
         answers.exact_equal, max_new_tokens=4096,
         layout="Question, Correct Answer, Incorrect Answer 1, 2, 3"),
    _commonsense("boolq", "boolq/test", ("true", "false")),
    _commonsense("piqa", "piqa/test", ("solution1", "solution2")),
    # LLM-Adapters parses SIQA (three options) with the five-label rule of ARC/OBQA; kept.
    _commonsense("siqa", "social_i_qa/test", _ANSWERS_5),
    _commonsense("hellaswag", "hellaswag/test", tuple(f"ending{i}" for i in range(1, 5))),
    _commonsense("winogrande", "winogrande/test", ("option1", "option2")),
    _commonsense("arc_e", "ARC-Easy/test", _ANSWERS_5),
    _commonsense("arc_c", "ARC-Challenge/test", _ANSWERS_5),
    _commonsense("obqa", "openbookqa/test", _ANSWERS_5),
    # The held-out split of tools/make_demo_data.py (`make demo`), in no group: `--tasks demo
    # --data-dir runs/demo/data`; the demo's own 48-token budget.
    Task("demo", "demo", "heldout", **{**_NUMERIC, "max_new_tokens": 48}),
)}
"""Every task by its ``--tasks`` name."""

GROUPS = {group: [t.name for t in TASKS.values() if t.group == group]
          for group in ("math", "s1k", "commonsense")}
"""``--tasks`` may also name a group: all its tasks, in table order."""


def resolve_tasks(names: list[str]) -> list[Task]:
    """The tasks named (task or group names, duplicates dropped, order kept).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    chosen: list[str] = []
    for name in names:
        expanded = GROUPS.get(name, [name])
        unknown = [n for n in expanded if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}; "
                             f"groups: {', '.join(GROUPS)}")
        chosen += [n for n in expanded if n not in chosen]
    return [TASKS[name] for name in chosen]


def data_file(task: Task, data_dir: str) -> str:
    """The task's data file under ``data_dir``.

    Raises:
        DataError: none of ``<data>.json/.jsonl/.parquet`` exists.
    """
    base = os.path.join(data_dir, task.data)
    for extension in EXTENSIONS:
        if os.path.isfile(base + extension):
            return base + extension
    raise DataError(base + ".json", f"no data file for task {task.name}",
                    f"put a .json array, .jsonl or .parquet of records ({task.layout}) at "
                    f"{base}{{{','.join(EXTENSIONS)}}}")


def load_items(task: Task, data_dir: str, limit: int | None = None) -> list[Item]:
    """The task's items, in file order (the first ``limit`` when given).

    Raises:
        DataError: a missing file, a malformed line or record (named ``file:line``).
    """
    path = data_file(task, data_dir)
    items = []
    for record in read_records(path):
        if limit is not None and len(items) >= limit:
            break
        items.append(task.read(record))
    if not items:
        raise DataError(path, "no records", f"the file must hold records ({task.layout})")
    return items
