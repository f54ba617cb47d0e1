"""What the search maximizes: one weighted mean of task scores, or (multi-objective) a list of them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # an experiment file is read without loading torch through the harness
    from evals.results import TaskScore


def check_weights(weights: Mapping[str, float]) -> Mapping[str, float]:
    """``weights`` if an objective can use them; ValueError otherwise."""
    if not weights or not all(0 <= w < math.inf for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"objective weights must be finite and >= 0 with a positive sum, got {dict(weights)}")
    return weights


class Objective(BaseModel):
    """``sum(w_t * mean_t) / sum(w_t)`` over tasks t: a weighted mean, so it stays on the metric's scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[str, float] = Field(description="task name -> weight (each >= 0, not all 0)")

    @field_validator("weights")
    @classmethod
    def _usable(cls, weights: dict[str, float]) -> dict[str, float]:
        return check_weights(weights)

    @property
    def name(self) -> str:
        return "+".join(f"{w:g}*{task}" for task, w in self.weights.items())

    def __call__(self, scores: Mapping[str, TaskScore]) -> float:
        """Raises EvaluationFailed when ``scores`` is a failed EvalResult, KeyError for a missing task."""
        return sum(w * scores[task].mean for task, w in self.weights.items()) / sum(self.weights.values())

    def means(self, scores: Mapping[str, TaskScore]) -> list[float]:
        """Each weighted task's mean, in the weights' order: what a multi-objective study maximizes."""
        return [scores[task].mean for task in self.weights]
