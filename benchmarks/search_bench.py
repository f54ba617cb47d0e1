"""Does soupsearch reach a good merge for fewer evaluated items than mergekit-evolve's CMA-ES?
Runs each search arm through `soupsearch run`'s own loop and writes docs/search.md with its curves.

    .venv/bin/python benchmarks/search_bench.py                          # docs/search.md, docs/search-*.png
    .venv/bin/python benchmarks/search_bench.py --quick --out /tmp/s.md  # the plumbing, on the pico zoo

Arms, on each experiment and search seed, all on the published tiny zoo:
- soupsearch: TPE with nested fidelity rungs and successive halving (the default);
- cma-es: mergekit-evolve's approach, Optuna's CMA-ES with every trial scored on all search items;
- random: random search with soupsearch's rungs and pruning;
- soupsearch-wilcoxon: soupsearch with a paired pruner (Optuna's WilcoxonPruner) in place of halving;
- seed config: the experiment's hand-written configuration, scored once;
- parents: every parent model, scored once (the best is chosen on select).

The budget is evaluated search items (items x tasks). CMA-ES runs its trials; the other searches run
until they have spent a set share of CMA-ES's items (`Scale.budget_share`). The anytime curve
follows the incumbent (the best complete trial so far by search score), re-scored on select; that
re-scoring is measurement, not budget. The target is CMA-ES's final select score. The final
incumbent is judged on test against the best parent with the paired 95% CI of `soupsearch export`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARMS = {  # name -> (sampler, pruner, every trial on all search items)
    "soupsearch": ("tpe", "successive_halving", False),
    "cma-es": ("cmaes", "none", True),
    "random": ("random", "successive_halving", False),
    # the A/B of soupsearch's pruner: Optuna's WilcoxonPruner tests a trial's per-item results against
    # the incumbent's on the same items at each rung below the top, instead of ranking rung means
    "soupsearch-wilcoxon": ("tpe", "wilcoxon", False),
}
SEARCH_ARMS = tuple(ARMS)
ALL_ARMS = (*SEARCH_ARMS, "seed config", "parents")
ITEMS_ARMS = (*SEARCH_ARMS, "seed config")  # the arms that spend search items


@dataclass(frozen=True)
class Scale:
    """How big a run is: the full benchmark, or --quick."""

    zoo: str
    trials: int  # CMA-ES's trials; the target is its final select score
    rungs: tuple[int, ...]  # search items per task at each rung; the last is every search item
    select: int
    test: int
    seeds: tuple[int, ...]
    # the other searches stop after this share of CMA-ES's items: enough to see the goal (at most a
    # fifth of them) and past it, in half the time of a full equal budget
    budget_share: float = 0.5


# 64 search items per task (the experiments' own top rung is 128) keep the default run within 30
# minutes on 2 cores; the select and test sets are the experiments' own
FULL = Scale(zoo="tiny", trials=100, rungs=(16, 64), select=200, test=200, seeds=(0, 1, 2))
QUICK = Scale(zoo="pico", trials=4, rungs=(8, 16), select=16, test=16, seeds=(0,), budget_share=1.0)

# the experiments, as the repository has them, with the benchmark's rungs and limits; the TIES one
# keeps plain TIES only, since CMA-ES has no categorical choice (Optuna would sample it at random)
EXPERIMENTS = {
    "slerp": ("tiny_slerp.yaml", None),
    "ties": (
        "tiny_dare_ties.yaml",
        # mergekit's README example for TIES: density 0.5 and weight 0.5 for every model
        {f"ties/{p}/{m}": 0.5 for p in ("density", "weight") for m in ("addition", "subtraction", "multiplication")},
    ),
}


def experiment_for(name: str, scale: Scale, arm: str, seed: int, workdir: Path):
    """The benchmark's version of experiment ``name``: ``arm``'s sampler and rungs, storage in ``workdir``."""
    from search.experiment import Experiment, load_experiment

    file, seed_config = EXPERIMENTS[name]
    raw = load_experiment(ROOT / "experiments" / file).model_dump(mode="json", by_alias=True, exclude_none=True)
    raw["models"] = {alias: ref.replace("zoo:tiny/", f"zoo:{scale.zoo}/") for alias, ref in raw["models"].items()}
    if name == "ties":
        raw["space"].pop("dare_ties")
        raw["warm_starts"] = [seed_config]
    sampler, pruner, full = ARMS[arm]
    raw["evaluation"] |= {
        "fidelity": [scale.rungs[-1]] if full else list(scale.rungs),
        "select_limit": scale.select,
        "test_limit": scale.test,
    }
    label = f"{name}-{arm}-seed{seed}"
    raw["name"] = label
    raw["study"] = {"sampler": sampler, "pruner": pruner, "trials": scale.trials, "name": label}
    raw["storage"] = f"sqlite:///{workdir / 'optuna.db'}"
    raw["tracking_uri"] = f"sqlite:///{workdir / 'mlflow.db'}"
    raw["seed"] = seed
    return Experiment.model_validate(raw)


def items_of(trial, tasks: int) -> int:
    """Search items a trial evaluated: the rung it reached, for each task."""
    return trial.user_attrs.get("fidelity", 0) * tasks


def spent(study, tasks: int) -> int:
    return sum(items_of(t, tasks) for t in study.get_trials(deepcopy=False))


def run_arm(name: str, arm: str, scale: Scale, seed: int, workdir: Path, budget: int | None):
    """One search arm through `soupsearch run`'s loop: CMA-ES for its trials, the others until they
    spent ``budget`` items (a study resumed in steps of trials, as `run` resumes one)."""
    from search.study import Settings, run_study

    experiment = experiment_for(name, scale, arm, seed, workdir)
    tasks = len(experiment.evaluation.tasks)
    # a trial costs at most a complete CMA-ES trial's items, so the first step cannot overshoot the budget
    trials = scale.trials if budget is None else max(1, round(scale.trials * scale.budget_share))
    while True:
        study = run_study(experiment, Settings.of(experiment, trials=trials))
        used = spent(study, tasks)
        if budget is None or used >= budget:
            return experiment, study
        # the mean cost per trial so far says how many more trials the rest of the budget buys
        trials += max(1, round((budget - used) * len(study.trials) / used))


class Scorer:
    """Re-scores trials on select and test, with the parents, on one workbench per experiment."""

    def __init__(self, experiment) -> None:
        from search.workbench import Workbench

        self.experiment = experiment
        self.bench = Workbench(experiment, "auto")
        self.objective = experiment.evaluation.objective_function
        self.select: dict[tuple[str, int], object] = {}  # (study, trial) -> an incumbent's select result

    def scores(self, params: dict, seed: int, splits=("select",)) -> dict:
        from search.space import to_config

        self.bench.build(to_config(self.experiment, params, self.bench.refs), seed)
        return {split: self.bench.score(split) for split in splits}

    def curve(self, study) -> list[dict]:
        """Each trial's cumulative items and the incumbent's select objective after it."""
        from optuna.trial import TrialState

        tasks = len(self.experiment.evaluation.tasks)
        points, used, best, select = [], 0, None, None
        for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            used += items_of(trial, tasks)
            if trial.state == TrialState.COMPLETE and (best is None or trial.value > best.value):
                best = trial
                result = self.scores(trial.params, trial.user_attrs["seed"])["select"]
                self.select[study.study_name, trial.number] = result
                select = self.objective(result)
            if best is not None:
                points.append({"items": used, "trial": best.number, "select": select})
        return points


def run_unit(scale: Scale, name: str, seed: int, workdir: Path) -> dict:
    """Every arm on one experiment and search seed: curves, the target, final verdicts."""
    from search import baselines
    from search.space import expand_warm_start
    from search.tracking import Tracker
    from search.verdict import best_parent, compare

    started = time.perf_counter()
    folder = workdir / f"{name}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    reference, cma = run_arm(name, "cma-es", scale, seed, folder, budget=None)
    budget = round(scale.budget_share * spent(cma, len(reference.evaluation.tasks)))
    studies = {"cma-es": cma} | {
        arm: run_arm(name, arm, scale, seed, folder, budget)[1] for arm in SEARCH_ARMS if arm != "cma-es"
    }
    scorer = Scorer(reference)
    objective = scorer.objective
    tracker = Tracker(reference.tracking_uri, reference.name)
    parents = baselines.score(cma, reference, scorer.bench, tracker, cma.user_attrs["mlflow_parent_run_id"])
    arms = {}
    for arm, study in studies.items():
        curve = scorer.curve(study)
        final = study.trials[curve[-1]["trial"]]
        # its select result from the curve, which scored every incumbent on select
        result = {"select": scorer.select[study.study_name, final.number]}
        result |= scorer.scores(final.params, final.user_attrs["seed"], ("test",))
        verdict = compare(f"trial {final.number}", result, parents, objective, seed)
        arms[arm] = {
            "curve": curve,
            "trials": len(study.trials),
            "items": spent(study, len(reference.evaluation.tasks)),
            "test": objective(result["test"]),
            "verdict": verdict.record(),
            "mlflow_run": study.user_attrs["mlflow_parent_run_id"],
        }
    seed_params = expand_warm_start(reference, reference.warm_starts[0], "warm_starts[0]")
    seed_scores = scorer.scores(seed_params, seed, ("select", "test"))
    arms["seed config"] = {
        "items": scale.rungs[-1] * len(reference.evaluation.tasks),
        "select": objective(seed_scores["select"]),
        "test": objective(seed_scores["test"]),
    }
    best = best_parent({alias: results["select"] for alias, results in parents.items()}, objective)
    arms["parents"] = {
        "best": best,
        "select": objective(parents[best]["select"]),
        "test": objective(parents[best]["test"]),
    }
    seconds = round(time.perf_counter() - started)
    print(f"{name}, seed {seed}: {seconds} s", flush=True)
    return {"target": arms["cma-es"]["curve"][-1]["select"], "arms": arms, "seconds": seconds}


def _items_to_target(experiment: dict, arm: str) -> int | None:
    """The items ``arm`` had spent when its incumbent first scored the target on select (None: never)."""
    data, target = experiment["arms"][arm], experiment["target"]
    curve = data.get("curve") or [{"items": data["items"], "select": data["select"]}]  # the seed config: one point
    return next((p["items"] for p in curve if p["select"] >= target), None)


def plot(rows: list[dict], name: str, path: Path) -> None:
    """The anytime curves of one experiment: the incumbent's select objective against items spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    colors = {"soupsearch": "C0", "cma-es": "C3", "random": "C2", "soupsearch-wilcoxon": "C1"}
    for row in rows:
        arms = row["experiments"][name]["arms"]
        for arm in SEARCH_ARMS:
            curve = arms[arm]["curve"]
            label = arm if row is rows[0] else None
            xs = [p["items"] for p in curve]
            ys = [100 * p["select"] for p in curve]
            axes.step(xs, ys, where="post", color=colors[arm], alpha=0.8, label=label)
        for arm, style in (("seed config", ":"), ("parents", "--")):
            label = ("best parent" if arm == "parents" else arm) if row is rows[0] else None
            axes.axhline(100 * arms[arm]["select"], color="grey", linestyle=style, linewidth=0.8, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("search items evaluated (items x tasks, cumulative)")
    axes.set_ylabel("incumbent's objective on select (%)")
    axes.set_title(f"{name}: one line per arm and seed ({len(rows)} seeds)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def log_plots(rows: list[dict], plots: dict[str, Path], workdir: Path, scale: Scale) -> None:
    """Each experiment's curves as an artifact of every search arm's parent MLflow run."""
    from search.tracking import Tracker

    for row in rows:
        for name, path in plots.items():
            folder = workdir / f"{name}-seed{row['seed']}"
            experiment = experiment_for(name, scale, "cma-es", row["seed"], folder)
            tracker = Tracker(experiment.tracking_uri, experiment.name)
            for arm in SEARCH_ARMS:
                tracker.client.log_artifact(row["experiments"][name]["arms"][arm]["mlflow_run"], str(path))


def _median(values: list[float | None]) -> float | None:
    """The median, where a None (target never reached) counts as larger than any number."""
    middle = statistics.median(float("inf") if v is None else v for v in values)
    return None if middle == float("inf") else middle


def _test_gain(rows: list[dict], name: str, arm: str) -> str:
    """The mean over seeds of ``arm``'s final test objective minus soupsearch's, in points."""
    arms = [r["experiments"][name]["arms"] for r in rows]
    gain = statistics.mean(a[arm]["test"] - a["soupsearch"]["test"] for a in arms)
    return f"{100 * gain:+.1f} points from soupsearch's in the mean over seeds"


def report(rows: list[dict], scale: Scale, plots: dict[str, Path], command: str) -> str:
    lines = [
        "# Search at a budget of evaluated items",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, {scale.zoo} zoo, search seeds "
        f"{', '.join(str(r['seed']) for r in rows)}).",
        "",
        "Every search arm runs `soupsearch run`'s own loop. CMA-ES (mergekit-evolve's approach) runs "
        f"{scale.trials} trials, each on all {scale.rungs[-1]} search items per task; soupsearch (TPE, rungs "
        f"{list(scale.rungs)}, successive halving), random search (same rungs and pruning) and soupsearch-wilcoxon "
        "(soupsearch with Optuna's WilcoxonPruner: at each rung below the top, a trial's per-item results are "
        "tested against the incumbent's on the same items, and it stops when it is worse at p < 0.1) run until they "
        f"have evaluated {scale.budget_share:g} times as many items. The x axis counts evaluated search items, "
        "summed over tasks. The incumbent is the best complete trial so far by search score, re-scored on "
        "select; the target is CMA-ES's final select score. Each final incumbent is judged on test against "
        "the best parent (chosen on select) with the paired bootstrap 95% CI of `soupsearch export`.",
        "",
    ]
    for name in EXPERIMENTS:
        file = EXPERIMENTS[name][0]
        lines += [
            f"## {name} (`experiments/{file}`)",
            "",
            f"![anytime curves]({plots[name].name})",
            "",
            f"Items each arm spent until its incumbent reached CMA-ES's final select score, and their share of "
            f"CMA-ES's {scale.trials}-trial items ('-': not reached within the arm's budget):",
            "",
            "| arm | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | median share |",
            "|---|" + "---|" * (len(rows) + 1),
        ]
        shares = {}
        for arm in ITEMS_ARMS:
            cells, shares[arm] = [], []
            for row in rows:
                experiment = row["experiments"][name]
                needed = _items_to_target(experiment, arm)
                shares[arm].append(None if needed is None else needed / experiment["arms"]["cma-es"]["items"])
                cells.append("-" if needed is None else f"{needed} ({shares[arm][-1]:.2f})")
            median = _median(shares[arm])
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {'-' if median is None else f'{median:.2f}'} |")
        warm = [
            str(row["seed"]) for row in rows if row["experiments"][name]["arms"]["cma-es"]["curve"][-1]["trial"] == 0
        ]
        if warm:
            lines += [
                "",
                f"On seed(s) {', '.join(warm)}, CMA-ES's final incumbent is trial 0, the seed configuration that "
                "every arm scores first: no later trial beat it on the search items, so every arm meets the target "
                "with its first trial.",
            ]
        lines += [
            "",
            "Final scores (objective, %): select / test, and the test difference against the best parent "
            "with its 95% CI:",
            "",
            "| arm | " + " | ".join(f"seed {r['seed']}" for r in rows) + " |",
            "|---|" + "---|" * len(rows),
        ]
        for arm in ALL_ARMS:
            cells = []
            for row in rows:
                data = row["experiments"][name]["arms"][arm]
                if arm in SEARCH_ARMS:
                    test = data["verdict"]["test"]["objective"]
                    cells.append(
                        f"{100 * data['curve'][-1]['select']:.1f} / {100 * data['test']:.1f}: "
                        f"{test['points']:+.1f} [{test['ci_low']:+.1f}, {test['ci_high']:+.1f}] "
                        f"({data['trials']} trials)"
                    )
                elif arm == "parents":
                    cells.append(f"{data['best']}: {100 * data['select']:.1f} / {100 * data['test']:.1f}")
                else:
                    cells.append(f"{100 * data['select']:.1f} / {100 * data['test']:.1f}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        share = _median(shares["soupsearch"])
        goal = (
            f"In the median over seeds, soupsearch does not reach the target within {scale.budget_share:g} of "
            "CMA-ES's items: goal (at most 0.20) missed"
            if share is None
            else f"In the median over seeds, soupsearch needs {share:.2f} of CMA-ES's items: goal (at most 0.20) "
            + ("met" if share <= 0.2 else "missed")
        )
        ab = _median(shares["soupsearch-wilcoxon"])
        goal += (
            ". A/B of the pruner: with the Wilcoxon pruner it "
            + ("does not reach the target in the median" if ab is None else f"needs {ab:.2f}")
            + ", and its final test score is "
            + _test_gain(rows, name, "soupsearch-wilcoxon")
        )
        seconds = sum(r["experiments"][name]["seconds"] for r in rows)
        lines += ["", f"{goal}. Time for this experiment, all seeds: {seconds} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the plumbing only: pico zoo, a few trials, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="search seeds (default: 0 1 2; --quick: 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "search.md")
    parser.add_argument(
        "--jobs", type=int, default=2, help="experiment-seed pairs run in parallel processes, one core each"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="studies, MLflow stores and each finished experiment-seed pair, which a rerun keeps "
        "(default: a temporary folder)",
    )
    parser.add_argument("--unit", nargs=2, help=argparse.SUPPRESS)  # EXPERIMENT SEED, in a child process
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    seeds = tuple(args.seeds or scale.seeds)
    from atomic import atomic_write_text
    from search import output

    output.configure(output.QUIET)
    with tempfile.TemporaryDirectory(prefix="search-bench-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if args.unit:
            name, seed = args.unit[0], int(args.unit[1])
            atomic_write_text(_unit_file(workdir, name, seed), json.dumps(run_unit(scale, name, seed, workdir)))
            return 0
        rows = _rows(args, scale, seeds, workdir)
        plots = {name: args.out.with_name(f"{args.out.stem}-{name}.png") for name in EXPERIMENTS}
        for name, path in plots.items():
            plot(rows, name, path)
        log_plots(rows, plots, workdir, scale)
        command = "python benchmarks/search_bench.py" + (" --quick" if args.quick else "")
        args.out.write_text(report(rows, scale, plots, command) + "\n")
        (workdir / "rows.json").write_text(json.dumps(rows))
    print(f"wrote {args.out}")
    return 0


def _unit_file(workdir: Path, name: str, seed: int) -> Path:
    return workdir / f"{name}-seed{seed}.json"


def _rows(args, scale: Scale, seeds: tuple[int, ...], workdir: Path) -> list[dict]:
    """One child process per experiment and seed, ``--jobs`` at a time, each on one core."""
    # the slowest first; a unit that a killed run finished in this workdir is kept
    pending = [(n, s) for n in reversed(EXPERIMENTS) for s in seeds if not _unit_file(workdir, n, s).is_file()]
    running: list[subprocess.Popen] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < args.jobs:
            name, seed = pending.pop(0)
            command = [sys.executable, __file__, "--unit", name, str(seed), "--workdir", str(workdir)]
            running.append(subprocess.Popen(command + (["--quick"] if args.quick else []), env=env))
        time.sleep(1)
        for process in [p for p in running if p.poll() is not None]:
            if process.returncode != 0:
                raise SystemExit(f"search_bench: {' '.join(process.args[2:5])} failed (exit {process.returncode})")
            running.remove(process)
    return [
        {
            "seed": seed,
            "experiments": {name: json.loads(_unit_file(workdir, name, seed).read_text()) for name in EXPERIMENTS},
        }
        for seed in seeds
    ]


if __name__ == "__main__":
    sys.exit(main())
