"""Disjoint search / select / test item sets, by a fixed and recorded procedure.

The procedure: shuffle the doc ids ``0..n-1`` of the task's evaluation split with
``random.Random(f"{seed}:{task}")``; the first ``fractions[0]`` of that order is *search*, the
next ``fractions[1]`` is *select*, the rest is *test*. Search keeps the shuffled order, so
fidelity levels are nested prefixes and every two trials see the same items first.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from user_input import UserError

SPLITS = ("search", "select", "test")
PROCEDURE = "seeded-shuffle-v1"


@dataclass(frozen=True)
class ItemSplits:
    task: str
    seed: int
    search: tuple[int, ...]
    select: tuple[int, ...]
    test: tuple[int, ...]

    def ids(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return list(getattr(self, split))

    def fidelity(self, fraction: float) -> list[int]:
        """The first ``fraction`` of the search items: a nested prefix."""
        return list(self.search[: max(1, round(fraction * len(self.search)))])

    def record(self) -> dict:
        return {"procedure": PROCEDURE, **asdict(self)}


def split_items(task: str, n_items: int, seed: int = 0, fractions: tuple[float, float] = (1 / 3, 1 / 3)) -> ItemSplits:
    if n_items < 3:
        raise UserError(f"task {task!r} has {n_items} items; at least 3 are needed to split")
    order = list(range(n_items))
    random.Random(f"{seed}:{task}").shuffle(order)
    n_search = max(1, round(fractions[0] * n_items))
    n_select = max(1, round(fractions[1] * n_items))
    return ItemSplits(
        task=task,
        seed=seed,
        search=tuple(order[:n_search]),
        select=tuple(sorted(order[n_search : n_search + n_select])),
        test=tuple(sorted(order[n_search + n_select :])),
    )
