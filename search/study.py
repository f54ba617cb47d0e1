"""The Optuna loop: propose a config, build it in place, score it on nested search prefixes, record it.

Where the study is stored and how interrupted trials are re-run is ``search.storage``; what the
parent MLflow run records at the end is ``search.report``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import optuna
import yaml
from optuna.trial import TrialState

from search import baselines, output
from search.experiment import Experiment
from search.leaderboard import trial_value
from search.report import RECORDED, record_study
from search.space import expand_warm_start, grid, suggest, to_config
from search.storage import (
    DEFAULT_JOURNAL,
    RetryStale,
    StorageError,
    fail_stale,
    interrupted,
    journal_path,
    open_storage,
    owner,
    pid_space,
    recover_interrupted,
    retry,
    storage_error,
)
from search.tracking import STATE_TAG, Tracker, split_metrics
from search.urls import masked

if TYPE_CHECKING:  # torch, mergekit and lm-eval load only where a trial runs: `status` needs none
    from search.workbench import Workbench

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialFailed(Exception):
    """One candidate could not be built or scored; the study records the reason and goes on."""


@dataclass
class Settings:
    """The experiment's run settings after command-line overrides."""

    trials: int
    timeout: float | None
    storage: str | None
    tracking_uri: str | None
    device: str
    seed: int

    def __repr__(self) -> str:
        """The URLs with their passwords masked: the real ones stay in the fields, to connect with."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown |= {k: masked(v) for k in ("storage", "tracking_uri") if isinstance(v := shown[k], str)}
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def of(cls, experiment: Experiment, **overrides) -> Settings:
        defaults = {
            "trials": experiment.study.trials,
            "timeout": experiment.study.timeout,
            "storage": experiment.storage,
            "tracking_uri": experiment.tracking_uri,
            "device": experiment.device,
            "seed": experiment.seed,
        }
        return cls(**(defaults | {k: v for k, v in overrides.items() if v is not None}))


def _sampler(experiment: Experiment, seed: int) -> optuna.samplers.BaseSampler:
    name = experiment.study.sampler
    if name == "grid":
        return optuna.samplers.GridSampler(grid(experiment), seed=seed)
    return {
        "tpe": optuna.samplers.TPESampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "random": optuna.samplers.RandomSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
    }[name](seed=seed)


def _pruner(experiment: Experiment) -> optuna.pruners.BasePruner:
    rungs = experiment.evaluation.fidelity
    return {
        "none": optuna.pruners.NopPruner,
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=rungs[0]),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=rungs[0], max_resource=rungs[-1]),
        "wilcoxon": lambda: optuna.pruners.WilcoxonPruner(p_threshold=0.1),
    }[experiment.study.pruner]()


def open_study(experiment: Experiment, settings: Settings, create: bool = True) -> optuna.Study:
    storage = open_storage(settings.storage, create)
    tasks = experiment.evaluation.task_names
    directions = ["maximize"] * (len(tasks) if experiment.study.sampler == "nsga2" else 1)
    sampler, pruner = _sampler(experiment, settings.seed), _pruner(experiment)
    try:
        if not create:
            return optuna.load_study(study_name=experiment.study_name, storage=storage, sampler=sampler, pruner=pruner)
        return optuna.create_study(
            study_name=experiment.study_name,
            storage=storage,
            load_if_exists=True,
            sampler=sampler,
            pruner=pruner,
            directions=directions,
        )
    except KeyError:
        raise StorageError(
            f"storage {masked(str(settings.storage or DEFAULT_JOURNAL))}: no study "
            f"{experiment.study_name!r}; start it with `soupsearch run`"
        ) from None
    except Exception as problem:  # noqa: BLE001 -- a journal damaged past its last line is read only here
        raise storage_error(settings.storage, problem) from None


def enqueue_warm_starts(study: optuna.Study, experiment: Experiment) -> None:
    for index, start in enumerate(experiment.warm_starts):
        study.enqueue_trial(expand_warm_start(experiment, start, f"warm_starts[{index}]"), skip_if_exists=True)


class TrialRunner:
    """One trial: suggest -> mergekit config -> in-place build -> scores at each fidelity rung."""

    def __init__(self, experiment: Experiment, bench: Workbench, tracker: Tracker, parent_run: str, seed: int) -> None:
        self.experiment, self.bench, self.tracker = experiment, bench, tracker
        self.parent_run, self.seed = parent_run, seed
        self.multi = experiment.study.sampler == "nsga2"

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        # a re-run of an interrupted trial keeps that trial's seed, so it rebuilds the same weights
        seed = trial.user_attrs.get("seed", self.seed * 1_000_003 + trial.number)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("owner", owner())
        trial.set_user_attr("pid_space", pid_space())
        run = self.tracker.trial_run(self.parent_run, trial.study.study_name, trial.number)
        trial.set_user_attr("mlflow_run_id", run)
        state = TrialState.FAIL
        try:
            values = self._evaluate(trial, run, seed)
            state = TrialState.COMPLETE
            return values
        except optuna.TrialPruned:
            state = TrialState.PRUNED
            raise
        except TrialFailed as problem:
            trial.set_user_attr("fail_reason", str(problem))
            self.tracker.tag(run, "soupsearch.fail_reason", str(problem)[:5000])
            raise
        except KeyboardInterrupt:  # re-run later with its parameters and seed, as a killed trial is
            reason = "interrupted: Ctrl-C"
            trial.set_user_attr("fail_reason", reason)
            retry(trial.study, trial.study._storage.get_trial(trial._trial_id), None, reason)
            raise
        finally:
            self.tracker.tag(run, STATE_TAG, state.name)
            self.tracker.end(run, "FAILED" if state == TrialState.FAIL else "FINISHED")

    def _evaluate(self, trial: optuna.Trial, run: str, seed: int) -> float | list[float]:
        import torch

        from merge_core import MergeInputError
        from merge_core.errors import ParentError

        started = time.perf_counter()
        params = suggest(trial, self.experiment)
        config = to_config(self.experiment, params, self.bench.refs)
        config_yaml = yaml.safe_dump(config, sort_keys=False)
        self.tracker.log(run, params=params | {"seed": seed}, texts={"config.yaml": config_yaml})
        try:
            report = self.bench.build(config, seed)
        except ParentError:
            raise  # no config can merge such a parent: end the study, naming the tensor
        except (MergeInputError, torch.OutOfMemoryError) as problem:
            raise TrialFailed(f"merge failed: {type(problem).__name__}: {problem}") from None
        merge_s = report.seconds
        trial.set_user_attr("merge_s", merge_s)
        objective = self.experiment.evaluation.objective_function
        eval_s, reported = 0.0, set()
        rungs = self.experiment.evaluation.fidelity
        for rung, more, result in self.bench.score_rungs(rungs):
            eval_s += more.seconds
            trial.set_user_attr("eval_s", eval_s)
            if not more.ok:
                self.tracker.log(run, metrics={"merge_s": merge_s, "eval_s": eval_s}, step=rung)
                raise TrialFailed(f"evaluation failed at {rung} items: {more.error}")
            value = objective(result)
            self._report(trial, result, value, rung, reported)
            trial.set_user_attr("fidelity", rung)
            trial.set_user_attr("objective", value)  # a pruned trial's score, where it stopped
            metrics = split_metrics("search", value, result) | {
                "fidelity": rung,
                "merge_s": merge_s,
                "eval_s": eval_s,
                "total_s": time.perf_counter() - started,
            }
            self.tracker.log(run, metrics=metrics, step=rung)
            # a trial at the top fidelity rung is complete: pruning it there would throw away a full
            # evaluation (halving's rung at the top step ranks it against the other full ones)
            if rung != rungs[-1] and trial.should_prune():
                self.tracker.log(run, dicts={"per_item.json": result.record()})
                raise optuna.TrialPruned(f"pruned at {rung} search items (objective {value:.4f})")
        trial.set_user_attr("batch_size", result.batch_size)  # what export re-scores the winner with
        self.tracker.log(run, dicts={"per_item.json": result.record()})
        return objective.means(result) if self.multi else value

    def _report(self, trial: optuna.Trial, result, value: float, rung: int, reported: set[int]) -> None:
        """Wilcoxon wants per-item scores (step = task and item); halving wants the mean at each rung."""
        if self.multi:
            return
        if self.experiment.study.pruner != "wilcoxon":
            trial.report(value, step=rung)
            return
        for task_index, task in enumerate(result):
            for doc, score in zip(result[task].doc_ids, result[task].per_item):
                step = task_index * 1_000_000 + doc
                if step not in reported:
                    trial.report(score, step=step)
                    reported.add(step)


def _settled(experiment: Experiment, settings: Settings) -> optuna.Study | None:
    """The study if a run has nothing to do (its trials reached, its parents scored, nothing
    running, MLflow up to date), read without loading any model or MLflow; else None."""
    try:
        study = open_study(experiment, settings, create=False)
    except StorageError:
        return None  # no study yet, or a storage that the full start reports on
    trials = study.get_trials(deepcopy=False)
    if (
        sum(t.state in FINISHED for t in trials) < settings.trials
        or any(t.state == TrialState.RUNNING for t in trials)
        or baselines.missing(study, experiment)
        or study.user_attrs.get(RECORDED) != len(trials)
    ):
        return None
    return study


def _event(trial: optuna.trial.FrozenTrial) -> str:
    """A finished trial as one line: its score, on how many items, and where its time went."""
    attrs = trial.user_attrs
    return (
        f"trial {trial.number} {trial.state.name} {trial_value(trial):.4f} on {attrs['fidelity']} items "
        f"(merge {attrs['merge_s']:.2f} s, eval {attrs['eval_s']:.2f} s)"
    )


def run_study(experiment: Experiment, settings: Settings, join: bool = False) -> optuna.Study:
    """Run (or resume) the study until ``settings.trials`` trials have finished; ``join``: a worker."""
    settled = None if join else _settled(experiment, settings)
    if settled is not None:
        output.say(f"study {settled.study_name}: {settings.trials} trials reached and parents scored; nothing to run")
        return settled
    from optuna.study import MaxTrialsCallback

    from search.validate import check_configs, check_fidelity, midpoint_configs
    from search.workbench import Workbench

    bench = Workbench(experiment, settings.device)  # a missing model fails before anything is written
    check_configs(experiment, bench.refs, bench.engine)  # parents that cannot merge fail before the first trial
    check_fidelity(experiment)
    _sampler(experiment, settings.seed)  # so does a grid too large to list
    journal_path(settings.storage)  # and a journal that is a folder, before the MLflow store is made
    study = open_study(experiment, settings, create=False) if join else None  # no study to join: nothing written
    tracker = Tracker(settings.tracking_uri, experiment.name)  # the store exists before any trial
    study = study or open_study(experiment, settings)
    stale = getattr(study._storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    if isinstance(stale, RetryStale):
        stale.tracker = tracker  # a trial that this process finds stale gets its MLflow run ended
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent is not None:
        tracker.reopen(parent)  # a resumed study, or a worker joining: RUNNING while this process works
    else:
        parent = tracker.parent_run(study.study_name)
        study.set_user_attr("mlflow_parent_run_id", parent)
        tracker.log(
            parent,
            params={
                "sampler": experiment.study.sampler,
                "pruner": experiment.study.pruner,
                "methods": ",".join(experiment.space.methods),
                "seed": settings.seed,
                "fidelity": experiment.evaluation.fidelity,
                "objective": experiment.evaluation.objective_function.name,
            },
            texts={
                "experiment.yaml": yaml.safe_dump(experiment.model_dump(mode="json", by_alias=True), sort_keys=False)
            },
        )

    # a trial whose process died is run again while this process needs trials, so that this process
    # runs the re-run itself: one queued for another process could be left waiting when it stops
    def needs_trials() -> bool:
        return len(study.get_trials(deepcopy=False, states=FINISHED)) < settings.trials

    recover_interrupted(study, tracker, rerun=needs_trials)
    if not join:
        baselines.score(study, experiment, bench, tracker, parent)
    # a resumed sampler must not replay the fresh stream (it would propose the finished trials again),
    # and concurrent workers must not share one: reseed by trials so far, and by process for workers
    offset = len(study.trials) + (os.getpid() << 20 if join else 0)
    study.sampler = _sampler(experiment, (settings.seed + offset) % 2**32)
    if not join:  # `run` enqueues them once; a worker too could race it to an empty queue and run one twice
        enqueue_warm_starts(study, experiment)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    remaining = settings.trials - done
    if remaining > 0:
        # trial 0's merge time is a trial's: in these builds numba compiles the kernels (once per
        # install, then read from its cache) and the engine fills its per-study cache
        output.say("building each method once before the first trial (compiles the merge kernels after an install)")
        for config in midpoint_configs(experiment, bench.refs).values():
            bench.build(config, settings.seed)
        with output.progress("trials", settings.trials, "trial", initial=done) as shown:

            def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if trial.state == TrialState.FAIL:
                    reason = trial.user_attrs.get("fail_reason", trial.system_attrs.get("fail_reason", ""))
                    output.say(f"trial {trial.number} FAIL: {reason}")
                elif trial.state in FINISHED:
                    best = (
                        f"{study.best_value:.4f}"
                        if len(study.directions) == 1
                        and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        else ""
                    )
                    shown.update(_event(trial) + (f"; best {best}" if best else ""), best=best)

            objective = TrialRunner(experiment, bench, tracker, parent, settings.seed)
            # failed trials do not count; allow as many failures as trials before giving up
            study.optimize(
                objective,
                n_trials=remaining + settings.trials,
                timeout=settings.timeout,
                catch=(TrialFailed,),
                gc_after_trial=False,
                callbacks=[
                    MaxTrialsCallback(settings.trials, states=FINISHED),
                    progress,
                    # between two trials: one of another process on this host that died meanwhile
                    lambda study, trial: recover_interrupted(study, tracker, rerun=needs_trials),
                ],
            )
    # as this process stops: a trial of a process on this host that died meanwhile, and one whose
    # heartbeat went stale
    recover_interrupted(study, tracker, rerun=needs_trials)
    fail_stale(study)
    # the last process to stop records the study: any other still running a trial records it after this one
    if all(interrupted(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        record_study(study, tracker, parent)
    return study
