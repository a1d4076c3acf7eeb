"""Deterministic arithmetic word problems for demos and tests.

Writes ``train.jsonl`` and ``heldout.jsonl`` in the LLM-Adapters ``instruction`` / ``input`` /
``output`` / ``answer`` format. Each output is a short worked solution whose equations use
``+ - * /`` and which ends with ``The answer is <n>``; every answer is an integer >= 2
(divisions are exact). The two files share no instruction. The same arguments give byte-identical
files.

Usage::

    python tools/make_demo_data.py --out DIR [--num-train 2000 --num-heldout 200 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable

NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi",
         "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
OBJECTS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "cards",
           "stamps", "buttons", "oranges", "coins", "beads", "toy cars", "crayons", "eggs")
CONTAINERS = ("boxes", "bags", "jars", "packs", "baskets", "crates")

Problem = tuple[str, str, int]
"""(instruction, worked solution without the final sentence, answer)."""


def _addition(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    question = (f"{name} has {a} {thing}. {name} gets {b} more {thing}. "
                f"How many {thing} does {name} have now?")
    return question, f"{name} has {a} + {b} = {a + b} {thing}.", a + b


def _subtraction(rng: random.Random) -> Problem:
    name, friend = rng.sample(NAMES, 2)
    thing = rng.choice(OBJECTS)
    a = rng.randint(10, 99)
    b = rng.randint(1, a - 2)  # Leaves at least 2, so the plural reads right.
    question = (f"{name} had {a} {thing} and gave {b} of them to {friend}. "
                f"How many {thing} does {name} have left?")
    return question, f"{name} has {a} - {b} = {a - b} {thing} left.", a - b


def _multiplication(rng: random.Random) -> Problem:
    name, thing, box = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    a, b = rng.randint(2, 12), rng.randint(2, 25)
    question = (f"{name} buys {a} {box} of {thing}. Each of the {box} holds {b} {thing}. "
                f"How many {thing} does {name} buy?")
    return question, f"{name} buys {a} * {b} = {a * b} {thing}.", a * b


def _division(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    each, friends = rng.randint(2, 20), rng.randint(2, 9)
    total = each * friends
    question = (f"{name} shares {total} {thing} equally among {friends} friends. "
                f"How many {thing} does each friend get?")
    return question, f"Each friend gets {total} / {friends} = {each} {thing}.", each


def _packs_and_loose(rng: random.Random) -> Problem:
    name, thing, box = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    loose, packs, size = rng.randint(1, 40), rng.randint(2, 9), rng.randint(2, 12)
    bought = packs * size
    question = (f"{name} has {loose} {thing} and buys {packs} {box} with {size} {thing} in each. "
                f"How many {thing} does {name} have in total?")
    work = (f"The {box} hold {packs} * {size} = {bought} {thing}. "
            f"In total {name} has {loose} + {bought} = {loose + bought} {thing}.")
    return question, work, loose + bought


def _wage_minus_spend(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    rate, hours = rng.randint(5, 30), rng.randint(2, 10)
    earned = rate * hours
    spent = rng.randint(1, earned - 2)
    question = (f"{name} earns {rate} dollars per hour and works {hours} hours. "
                f"Then {name} spends {spent} dollars. How many dollars does {name} have left?")
    work = (f"{name} earns {rate} * {hours} = {earned} dollars. "
            f"After spending, {name} has {earned} - {spent} = {earned - spent} dollars.")
    return question, work, earned - spent


def _share_then_lose(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    people, each = rng.randint(2, 8), rng.randint(3, 15)
    total = people * each
    lost = rng.randint(1, each - 2)
    question = (f"{name} splits {total} {thing} equally among {people} children. "
                f"Each child then loses {lost} {thing}. How many {thing} does each child have?")
    work = (f"Each child gets {total} / {people} = {each} {thing}. "
            f"After losing some, each child has {each} - {lost} = {each - lost} {thing}.")
    return question, work, each - lost


PROBLEM_MAKERS: tuple[Callable[[random.Random], Problem], ...] = (
    _addition, _subtraction, _multiplication, _division,
    _packs_and_loose, _wage_minus_spend, _share_then_lose,
)


def make_problems(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct problems as ``{instruction, input, output, answer}`` records.

    Raises:
        ValueError: the templates cannot produce that many distinct problems.
    """
    rng = random.Random(seed)
    records, seen = [], set()
    for _ in range(50 * count + 100):
        if len(records) == count:
            return records
        question, work, answer = rng.choice(PROBLEM_MAKERS)(rng)
        if question in seen:
            continue
        seen.add(question)
        records.append({"instruction": question, "input": "",
                        "output": f"{work} The answer is {answer}", "answer": str(answer)})
    if len(records) < count:
        raise ValueError(f"could only make {len(records)} distinct problems; ask for fewer")
    return records


def write_demo_data(out_dir: str, num_train: int = 2000, num_heldout: int = 200,
                    seed: int = 0) -> tuple[str, str]:
    """Writes ``train.jsonl`` and ``heldout.jsonl`` (disjoint) into ``out_dir``.

    Returns:
        The two paths.
    """
    records = make_problems(num_train + num_heldout, seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "heldout.jsonl")
    for path, part in zip(paths, (records[:num_train], records[num_train:]), strict=True):
        with open(path, "w", encoding="utf-8", newline="\n") as stream:
            stream.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in part)
    return paths


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_demo_data(args.out, args.num_train, args.num_heldout, args.seed):
        print(path)


if __name__ == "__main__":
    main()
