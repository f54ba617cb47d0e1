"""Greedy soup (Wortsman et al., "Model soups", ICML 2022), beside uniform soup and the best single model.

Ingredients are scored alone on held-out (select) items and sorted best first; the soup starts from
the best and, in one pass, keeps each next ingredient only if the uniform average of the soup plus
it scores strictly higher on select. The noise-aware variant keeps it only if the paired gain over
the current soup is also significant (paired bootstrap over items, p < alpha). Test items are
scored after every choice is made, for both soups and for every ingredient alone, so that the
greedy soup is judged against its best ingredient (chosen on select) as a merge against its best
parent (search.verdict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from evals.results import EvalResult
from evals.stats import paired_bootstrap
from search import output
from search.experiment import Experiment
from search.tracking import Tracker, split_metrics
from search.verdict import Verdict, best_parent, compare

if TYPE_CHECKING:  # search.study imports this module (through search.baselines): no import back at run time
    from search.study import Settings


def soup_config(experiment: Experiment, refs: dict[str, str], members: list[str]) -> dict:
    """A uniform soup: mergekit's linear merge with equal weights."""
    return {
        "merge_method": "linear",
        "dtype": experiment.dtype,
        "parameters": {"normalize": True},
        "models": [{"model": refs[m], "parameters": {"weight": 1.0}} for m in members],
    }


def _items(result: EvalResult) -> list[float]:
    """Every task's per-item scores, concatenated in a fixed order: the pairing unit for tests."""
    return [score for task in sorted(result) for score in result[task].per_item]


@dataclass
class SoupResult:
    name: str
    members: list[str]
    select: EvalResult
    test: EvalResult | None = None


class Souper:
    def __init__(self, experiment: Experiment, settings: Settings) -> None:
        from search.workbench import Workbench  # here: `validate` reads soup_config without loading torch

        self.experiment, self.settings = experiment, settings
        self.bench = Workbench(experiment, settings.device)
        # ingredients that cannot merge (shapes, tensors) fail here, before any evaluation
        self.bench.engine.plan(soup_config(experiment, self.bench.refs, experiment.soup.ingredients))
        self.tracker = Tracker(settings.tracking_uri, experiment.name)
        self.parent = self.tracker.parent_run(experiment.study_name)
        self.objective = experiment.evaluation.objective_function
        self.step = 0
        self.verdict: Verdict | None = None
        k = len(experiment.soup.ingredients)
        # every evaluation: k alone, k - 1 greedy tries, the uniform soup, then on test both soups and k alone
        self.shown = output.Progress("soup", 3 * k + 2, "eval")

    def score(self, members: list[str], split: str, label: str, baseline: bool = False) -> EvalResult:
        """``baseline``: one ingredient alone, recorded as a baseline run rather than a soup tried."""
        config = soup_config(self.experiment, self.bench.refs, members)
        self.bench.build(config, self.settings.seed)
        result = self.bench.score(split)
        if not result.ok:
            raise RuntimeError(f"soup {members} failed on {split}: {result.error}")
        if baseline:
            run = self.tracker.baseline_run(self.parent, self.experiment.study_name, members[0])
        else:
            run = self.tracker.trial_run(self.parent, self.experiment.study_name, self.step, name=label)
            self.step += 1
        self.tracker.log(
            run,
            params={"soup": label, "members": ",".join(members), "split": split},
            metrics=split_metrics(split, self.objective(result), result),
            dicts={"per_item.json": result.record()},
        )
        self.tracker.end(run)
        self.shown.update(f"{label}: {split} {self.objective(result):.4f}")
        return result

    def run(self) -> list[SoupResult]:
        soup = self.experiment.soup
        alone = {name: self.score([name], "select", f"ingredient {name}", baseline=True) for name in soup.ingredients}
        order = list(soup.ingredients)
        if soup.order == "select_score":
            order.sort(key=lambda name: -self.objective(alone[name]))  # stable: ties keep the given order
        best_single = best_parent(alone, self.objective)
        members, current = [order[0]], alone[order[0]]
        for name in order[1:]:
            tried = self.score([*members, name], "select", f"greedy +{name}")
            if self.objective(tried) <= self.objective(current):
                continue
            if (
                soup.noise_aware
                and paired_bootstrap(_items(tried), _items(current), seed=self.settings.seed).p_value >= soup.alpha
            ):
                continue
            members, current = [*members, name], tried
            output.say(f"greedy soup keeps {name}: {len(members)} ingredients, select {self.objective(current):.4f}")
        soups = [
            SoupResult("greedy soup", members, current),
            SoupResult("uniform soup", list(soup.ingredients), self.score(list(soup.ingredients), "select", "uniform")),
        ]
        for result in soups:
            result.test = self.score(result.members, "test", f"{result.name} (test)")
        tests = {
            name: self.score([name], "test", f"ingredient {name} (test)", baseline=True) for name in soup.ingredients
        }
        results = [*soups, SoupResult("best single", [best_single], alone[best_single], tests[best_single])]
        self.verdict = compare(
            "greedy soup",
            {"select": current, "test": soups[0].test},
            {name: {"select": alone[name], "test": tests[name]} for name in soup.ingredients},
            self.objective,
            self.settings.seed,
        )
        self.tracker.log(
            self.parent,
            params={"greedy_members": ",".join(members)},
            metrics={
                f"{r.name.replace(' ', '_')}/{split}_objective": self.objective(getattr(r, split))
                for r in results
                for split in ("select", "test")
            },
        )
        self.verdict.log(self.tracker, self.parent)
        self.tracker.end(self.parent)
        self.shown.close()
        return results


def table(results: list[SoupResult], experiment: Experiment) -> str:
    objective = experiment.evaluation.objective_function
    lines = [f"{'model':<14} {'select':>7} {'test':>7}  {'test 95% CI (first task)':<26} members"]
    for r in results:
        first = r.test[next(iter(r.test))]
        lines.append(
            f"{r.name:<14} {100 * objective(r.select):>6.1f}% {100 * objective(r.test):>6.1f}%  "
            f"[{100 * first.ci_low:5.1f}, {100 * first.ci_high:5.1f}]{'':<12} {', '.join(r.members)}"
        )
    return "\n".join(lines)
