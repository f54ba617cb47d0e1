"""What an evaluation returns: per-item scores by task, their means and 95% intervals, as plain
records that MLflow, the study and the export read back without torch or lm-eval."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from evals.stats import mean_ci


class EvaluationFailed(RuntimeError):
    """Raised when scores are read from an evaluation that failed; the reason is its message."""


def safe_metric_name(name: str) -> str:
    """``exact_match,strict-match`` -> ``exact_match_strict-match``: MLflow rejects commas."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


@dataclass
class TaskScore:
    """One task's metric on one item subset; ``per_item`` follows ``doc_ids``, in the split's order."""

    task: str
    split: str
    metric: str
    doc_ids: list[int]
    per_item: list[float]
    mean: float = field(init=False)
    ci_low: float = field(init=False)
    ci_high: float = field(init=False)

    def __post_init__(self) -> None:
        self.mean, self.ci_low, self.ci_high = mean_ci(self.per_item)

    @property
    def key(self) -> str:
        """An MLflow-safe metric name, e.g. ``gsm8k/exact_match_strict-match``."""
        return f"{self.task}/{safe_metric_name(self.metric)}"


@dataclass
class EvalResult(Mapping[str, TaskScore]):
    """One evaluation: scores by task, or the reason it failed. Reading a failed one raises."""

    split: str
    scores: dict[str, TaskScore]
    seconds: float
    model_seconds: float  # inside the model's own forward passes and generate
    batch_size: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def overhead_share(self) -> float:
        return 1 - self.model_seconds / self.seconds

    def __getitem__(self, task: str) -> TaskScore:
        if self.error is not None:
            raise EvaluationFailed(self.error)
        return self.scores[task]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def record(self) -> dict:
        """Everything about this evaluation as plain JSON: per-item results included."""
        return {
            "split": self.split,
            "error": self.error,
            "seconds": self.seconds,
            "model_seconds": self.model_seconds,
            "batch_size": self.batch_size,
            "tasks": {name: dataclasses.asdict(score) for name, score in self.scores.items()},
        }

    @classmethod
    def from_record(cls, record: Mapping) -> EvalResult:
        """The evaluation that ``record()`` wrote, per-item scores and all."""
        given = [f.name for f in dataclasses.fields(TaskScore) if f.init]
        scores = {name: TaskScore(**{key: score[key] for key in given}) for name, score in record["tasks"].items()}
        return cls(
            record["split"], scores, record["seconds"], record["model_seconds"], record["batch_size"], record["error"]
        )

    def extended(self, more: EvalResult) -> EvalResult:
        """This evaluation followed by ``more``, a later stretch of the same split's order: the
        scores of the longer prefix, without scoring this one's items again."""
        if not more.ok:
            return more
        scores = {
            name: dataclasses.replace(
                score,
                doc_ids=score.doc_ids + more.scores[name].doc_ids,
                per_item=score.per_item + more.scores[name].per_item,
            )
            if name in more.scores
            else score
            for name, score in self.scores.items()
        }
        return EvalResult(
            self.split, scores, self.seconds + more.seconds, self.model_seconds + more.model_seconds, more.batch_size
        )

    def table(self) -> str:
        rows = [f"{'task':<24} {'metric':<28} {'split':<7} {'n':>5} {'mean':>7}  95% CI"]
        rows += [
            f"{s.task:<24} {s.metric:<28} {s.split:<7} {len(s.per_item):>5} {100 * s.mean:>6.1f}%  "
            f"[{100 * s.ci_low:.1f}, {100 * s.ci_high:.1f}]"
            for s in self.scores.values()
        ]
        return "\n".join(rows if self.ok else [f"evaluation failed: {self.error}"])

    def metrics(self) -> dict[str, float]:
        """Flat, MLflow-safe metrics: each task's mean and its 95% interval."""
        flat = {}
        for score in self.values():
            flat |= {score.key: score.mean, f"{score.key}/ci_low": score.ci_low, f"{score.key}/ci_high": score.ci_high}
        return flat
