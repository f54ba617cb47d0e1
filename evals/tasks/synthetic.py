"""Seeded generators for the bundled tasks.

Every item is a dict in openai/gsm8k's schema: ``question`` and ``answer``, where the answer is
a short worked solution that ends in ``#### N``. The same generators make the evaluation items
(committed as JSONL) and the zoo's training streams, which exclude every evaluation question.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

Item = dict[str, str]

NAMES = ["Tom", "Ann", "Sam", "Mia", "Leo", "Zoe", "Max", "Eva", "Ben", "Ivy", "Dan", "Amy"]
THINGS = ["apples", "pens", "cards", "books", "eggs", "coins", "shells", "stamps", "toys", "cups"]


def _item(question: str, steps: list[str], result: int) -> Item:
    return {"question": question, "answer": " ".join(steps) + f"\n#### {result}"}


def addition(rng: random.Random) -> Item:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return _item(f"What is {a} + {b}?", [f"{a} + {b} = {a + b}."], a + b)


def subtraction(rng: random.Random) -> Item:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return _item(f"What is {a} - {b}?", [f"{a} - {b} = {a - b}."], a - b)


def multiplication(rng: random.Random) -> Item:
    a, b = rng.randint(0, 99), rng.randint(2, 9)  # no x0 / x1 freebies
    if rng.random() < 0.5:
        a, b = b, a
    return _item(f"What is {a} * {b}?", [f"{a} * {b} = {a * b}."], a * b)


def word_problem(rng: random.Random) -> Item:
    """A 1-3 step story about one person's pile of things, in GSM8K's answer format."""
    name, other = rng.sample(NAMES, 2)
    things = rng.choice(THINGS)
    total = rng.randint(2, 20)
    sentences = [f"{name} has {total} {things}."]
    steps = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["add", "sub", "mul"] if total <= 40 else ["add", "sub"])
        if op == "add":
            b = rng.randint(1, 9)
            sentences.append(rng.choice([f"{name} buys {b} more.", f"{other} gives {name} {b} more."]))
            steps.append(f"{total} + {b} = {total + b}.")
            total += b
        elif op == "sub" and total > 1:
            b = rng.randint(1, min(9, total - 1))
            sentences.append(rng.choice([f"{name} gives {b} to {other}.", f"{name} loses {b}."]))
            steps.append(f"{total} - {b} = {total - b}.")
            total -= b
        else:
            b = rng.randint(2, 3)
            sentences.append(f"{name} ends up with {'twice' if b == 2 else 'three times'} as many.")
            steps.append(f"{total} * {b} = {total * b}.")
            total *= b
    sentences.append(f"How many {things} does {name} have now?")
    return _item(" ".join(sentences), steps, total)


GENERATORS: dict[str, Callable[[random.Random], Item]] = {
    "tiny_addition": addition,
    "tiny_subtraction": subtraction,
    "tiny_multiplication": multiplication,
    "tiny_gsm8k": word_problem,
}

EVAL_ITEMS = 600  # per task; split three ways by evals.splits
EVAL_SEED = 20261128


def eval_items(task: str, n: int = EVAL_ITEMS, seed: int = EVAL_SEED) -> list[Item]:
    """The first n distinct questions drawn from the task's generator with a fixed seed."""
    rng, seen, items = random.Random(f"{seed}:{task}"), set(), []
    while len(items) < n:
        item = GENERATORS[task](rng)
        if item["question"] not in seen:
            seen.add(item["question"])
            items.append(item)
    return items


def training_stream(task: str, seed: int, exclude: set[str]) -> Iterator[Item]:
    """An endless seeded stream of items whose questions are not in ``exclude``."""
    rng = random.Random(f"train:{seed}:{task}")
    while True:
        item = GENERATORS[task](rng)
        if item["question"] not in exclude:
            yield item


def format_prompt(item: Item) -> str:
    """lm-eval's gsm8k prompt for an item (zero-shot)."""
    return f"Question: {item['question']}\nAnswer:"


def format_document(item: Item) -> str:
    """The text a model is trained on: the prompt, then the target after one space."""
    return f"{format_prompt(item)} {item['answer']}"


def write_jsonl(path: Path, items: list[Item]) -> None:
    path.write_text("".join(json.dumps(item, sort_keys=True) + "\n" for item in items))


def read_jsonl(path: Path) -> list[Item]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
