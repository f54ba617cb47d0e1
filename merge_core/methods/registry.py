"""One declaration per merge method: what the engine and the search need to know of it.

A method mergekit registers but this table does not declare gets ``Method(name)``: no seeded
draws, no fast path, built by mergekit's own code. A fast path is a module of this package (its
family) with ``merge`` and ``footprint``; it is imported on first use, so reading the table
(``search.experiment`` does) loads no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from merge_core.parents import Parents
    from merge_core.planner import MergePlan


class Cached(enum.Enum):
    """What a fast path keeps per study (StudyCache), computed once from the parents."""

    TASK_VECTORS = "task vectors"  # model - base, per non-base input
    MAGNITUDE_RANKS = "magnitude ranks"  # int32 place of each |tau| element, for TIES top-k
    L1_NORMS = "L1 norms"  # |tau|_1, the numerator of a rescale (only when the merge rescales)
    SLERP_STATS = "slerp stats"  # the normalized dot product of the two inputs


@dataclass(frozen=True)
class Method:
    name: str
    seeded: bool = False  # draws from torch's global RNG: the engine seeds it per tensor
    random_masks: bool = False  # draws a mask per task vector, so every tensor depends on the seed
    family: str | None = None  # the module of merge_core.methods with its fast path; None: mergekit builds it
    needs: frozenset[Cached] = frozenset()

    @property
    def fast(self) -> bool:
        return self.family is not None

    @property
    def task_vectors(self) -> bool:
        """Built from task vectors: the methods a search space gives weights and densities to."""
        return Cached.TASK_VECTORS in self.needs

    def fast_path(self) -> ModuleType:
        """The family module: ``merge(method, job, inputs, cache, seed, out)`` builds one tensor in
        place, ``footprint(method, job, dtype, usage)`` adds what that keeps to ``usage``."""
        if self.family is None:
            raise ValueError(f"merge method {self.name} has no fast path")
        return import_module(f"merge_core.methods.{self.family}")


_TAU, _RANKS, _L1 = Cached.TASK_VECTORS, Cached.MAGNITUDE_RANKS, Cached.L1_NORMS

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("linear", family="linear"),
        Method("slerp", family="slerp", needs=frozenset({Cached.SLERP_STATS})),
        Method("task_arithmetic", family="task_arithmetic", needs=frozenset({_TAU})),
        Method("ties", family="task_arithmetic", needs=frozenset({_TAU, _RANKS, _L1})),
        Method("dare_ties", seeded=True, random_masks=True, family="task_arithmetic", needs=frozenset({_TAU, _L1})),
        Method("dare_linear", seeded=True, random_masks=True, family="task_arithmetic", needs=frozenset({_TAU, _L1})),
        Method("della", seeded=True, random_masks=True),
        Method("della_linear", seeded=True, random_masks=True),
        Method("arcee_fusion", seeded=True),  # a random sample of each tensor over 1M elements, for its quantiles
    )
}

TASK_VECTOR_METHODS = tuple(name for name, method in METHODS.items() if method.task_vectors)


def get(name: str) -> Method:
    return METHODS.get(name) or Method(name)


@dataclass
class Usage:
    """Device bytes a fast path keeps, added up job by job: study-cache values, and scratch slots,
    each as large as its largest use."""

    device: torch.device
    values: int = 0
    slots: dict[str, int] = field(default_factory=dict)

    def need(self, slot: str, nbytes: int) -> None:
        self.slots[slot] = max(self.slots.get(slot, 0), nbytes)

    @property
    def scratch(self) -> int:
        return sum(self.slots.values())


def footprint(plan: MergePlan, parents: Parents) -> tuple[int, int]:
    """Bytes the fast path for ``plan`` keeps at most: (study-cache values, scratch on the device).

    Each family declares its own; ``tests/test_merge_fast.py`` holds them to the real allocations.
    A method without a fast path keeps nothing.
    """
    method = get(plan.method)
    if not method.fast:
        return 0, 0
    family, usage = method.fast_path(), Usage(parents.device)
    for job in plan.jobs:
        first = job.sources[0]
        family.footprint(method, job, job.in_dtype or parents[first.model].headers[first.tensor].dtype, usage)
    return usage.values, usage.scratch
