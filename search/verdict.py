"""Does the merge beat its best parent? The parent is chosen on select, never on test.

On each split the difference is the winner's objective minus the best parent's, on the same
items, in percentage points, with a 95% paired bootstrap interval over items, stratified by task
(``evals.stats.stratified_paired_bootstrap``). "Beats" means a positive difference; whether the
interval excludes 0 is stated beside it. An objective over several tasks is judged as a whole and
task by task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from evals.objectives import Objective
from evals.results import EvalResult, safe_metric_name
from evals.stats import stratified_paired_bootstrap
from search.tracking import Tracker

SPLITS = ("select", "test")
OBJECTIVE = "objective"  # the scope of a comparison over the weighted objective, beside task names
ITERS = 10_000
METHOD = f"paired bootstrap over items, stratified by task, {ITERS} resamples, percentile 95% CI"


def best_parent(select: Mapping[str, EvalResult], objective: Objective) -> str:
    """The parent with the best select objective; a tie goes to the one listed first."""
    return max(select, key=lambda alias: objective(select[alias]))


@dataclass(frozen=True)
class Comparison:
    """Winner minus best parent on one split, over the objective or one task, in percentage points."""

    split: str
    scope: str
    points: float
    ci_low: float
    ci_high: float

    @property
    def beats(self) -> bool:
        return self.points > 0

    @property
    def ci_excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def sentence(self) -> str:
        verb = "beats" if self.beats else "does not beat"
        # a gain whose interval reaches 0 or below could be the items' noise: say so
        caveat = "; not significant: the interval includes 0" if self.beats and not self.ci_excludes_zero else ""
        return (
            f"{verb} its best parent on {self.split} ({self.points:+.1f} points, "
            f"95% CI [{self.ci_low:+.1f}, {self.ci_high:+.1f}]{caveat})"
        )

    def record(self) -> dict:
        return asdict(self) | {
            "beats": self.beats,
            "ci_excludes_zero": self.ci_excludes_zero,
            "sentence": self.sentence(),
        }


@dataclass(frozen=True)
class Verdict:
    """A winner against its parents: every model's objective, and each comparison with the best parent."""

    winner: str
    best_parent: str
    objectives: dict[str, dict[str, float]]  # model (the winner, then every parent) -> split -> objective
    comparisons: list[Comparison]

    @property
    def headline(self) -> str:
        """The sentence for the objective on test."""
        return self._said(next(c for c in self.comparisons if c.split == "test" and c.scope == OBJECTIVE))

    def _said(self, comparison: Comparison) -> str:
        subject = self.winner if comparison.scope == OBJECTIVE else f"{self.winner} on {comparison.scope}"
        return f"{subject} {comparison.sentence()}"

    def lines(self) -> list[str]:
        """The winner and every parent on select and test, then one sentence per comparison."""
        width = max(len("model"), *map(len, self.objectives))
        rows = [f"{'model':<{width}}  {'select':>7} {'test':>7}"]
        for model, scores in self.objectives.items():
            mark = "  best parent (chosen on select)" if model == self.best_parent else ""
            rows.append(f"{model:<{width}}  {100 * scores['select']:6.1f}% {100 * scores['test']:6.1f}%{mark}")
        return rows + [self._said(c) for c in self.comparisons]

    def markdown(self) -> str:
        rows = [
            f"| {model}{' (best parent)' if model == self.best_parent else ''} | "
            f"{100 * scores['select']:.1f} | {100 * scores['test']:.1f} |"
            for model, scores in self.objectives.items()
        ]
        sentences = [f"- {self._said(c)}" for c in self.comparisons]
        return "\n".join(
            ["| model | select objective (%) | test objective (%) |", "|---|---|---|", *rows, "", *sentences]
        )

    def record(self) -> dict:
        comparisons = {split: {"objective": None, "tasks": {}} for split in SPLITS}
        for c in self.comparisons:
            if c.scope == OBJECTIVE:
                comparisons[c.split]["objective"] = c.record()
            else:
                comparisons[c.split]["tasks"][c.scope] = c.record()
        objectives = {
            model: {f"{split}_objective": value for split, value in scores.items()}
            for model, scores in self.objectives.items()
        }
        return {
            "winner": {"name": self.winner, **objectives.pop(self.winner)},
            "parents": objectives,
            "best_parent": self.best_parent,
            "best_parent_chosen_on": "select",
            "method": METHOD,
            "sentence": self.headline,
            **comparisons,
            "lines": self.lines(),
        }

    def log(self, tracker: Tracker, run: str) -> None:
        """On the study's parent run: the numbers as metrics, the lines as text, the test verdict as a tag."""
        metrics = {
            f"verdict/{c.split}/{safe_metric_name(c.scope)}/{name}": getattr(c, name)
            for c in self.comparisons
            for name in ("points", "ci_low", "ci_high")
        }
        tracker.log(
            run,
            metrics=metrics,
            texts={"verdict.txt": "\n".join(self.lines()) + "\n"},
            dicts={"verdict.json": self.record()},
        )
        tracker.tag(run, "soupsearch.best_parent", self.best_parent)
        tracker.tag(run, "soupsearch.verdict", self.headline)


def compare(
    winner: str,
    scores: Mapping[str, EvalResult],
    parents: Mapping[str, Mapping[str, EvalResult]],
    objective: Objective,
    seed: int = 0,
) -> Verdict:
    """``scores``: the winner's result on each split; ``parents``: alias -> split -> result, on the same items."""
    best = best_parent({alias: results["select"] for alias, results in parents.items()}, objective)
    tasks = list(objective.weights)
    scopes = {OBJECTIVE: objective.weights} | ({task: {task: 1.0} for task in tasks} if len(tasks) > 1 else {})
    comparisons = []
    for split in SPLITS:
        ours, theirs = scores[split], parents[best][split]
        for task in tasks:
            if ours[task].doc_ids != theirs[task].doc_ids:
                raise RuntimeError(f"{winner} and parent {best} were scored on different {split} items of {task}")
        for scope, weights in scopes.items():
            difference = stratified_paired_bootstrap(
                {t: ours[t].per_item for t in weights}, {t: theirs[t].per_item for t in weights}, weights, ITERS, seed
            )
            comparisons.append(
                Comparison(split, scope, 100 * difference.mean, 100 * difference.ci_low, 100 * difference.ci_high)
            )
    objectives = {
        name: {split: objective(results[split]) for split in SPLITS}
        for name, results in {winner: scores, **parents}.items()
    }
    return Verdict(winner, best, objectives, comparisons)
