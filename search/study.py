"""The Optuna loop: propose a config, build it in place, score it on nested search prefixes, record it."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import yaml
from optuna.trial import TrialState

from search import baselines, output
from search.experiment import Experiment
from search.leaderboard import leaderboard, trial_value
from search.space import expand_warm_start, grid, suggest, to_config
from search.tracking import STATE_TAG, Tracker, split_metrics
from search.urls import driver_hint, masked
from user_input import UserError

if TYPE_CHECKING:  # torch, mergekit and lm-eval load only where a trial runs: `status` needs none
    from search.workbench import Workbench

DEFAULT_JOURNAL = Path(".soupsearch") / "journal.log"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RECORDED = "mlflow_recorded_trials"  # user attr: how many trials the parent run's records cover
# a trial names its owner as it starts: one without an owner this long after its start was cut off before
OWNERLESS_GRACE = timedelta(minutes=5)


class StorageError(UserError):
    """The Optuna storage cannot be opened; the message names it, password masked."""


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

    @classmethod
    def of(cls, experiment: Experiment, **overrides) -> Settings:
        defaults = {"trials": experiment.study.trials, "timeout": experiment.study.timeout,
                    "storage": experiment.storage, "tracking_uri": experiment.tracking_uri,
                    "device": experiment.device, "seed": experiment.seed}
        return cls(**(defaults | {k: v for k, v in overrides.items() if v is not None}))


def open_storage(spec: str | None, create: bool = True) -> optuna.storages.BaseStorage:
    """An RDB URL (many machines, with heartbeats) or a journal file (one machine; the default)."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    try:
        if spec is not None and "://" in spec:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats and retries are used on purpose
                return RDBStorage(spec, heartbeat_interval=60,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
        path = Path(spec) if spec else DEFAULT_JOURNAL
        if not create and not path.is_file():
            raise FileNotFoundError("no journal there; start the study with `soupsearch run`")
        path.parent.mkdir(parents=True, exist_ok=True)
        # absolute: Optuna's lock is a symlink to the path as given, so a relative one dangles, and the
        # lock that a process killed mid-write leaves is then never broken: every later run would hang
        return JournalStorage(JournalFileBackend(str(path.resolve())))
    except Exception as problem:  # noqa: BLE001 -- every failure to open is the storage spec's fault
        raise _storage_error(spec, problem) from None


def _storage_error(spec: str | None, problem: Exception) -> StorageError:
    """One line naming the storage, its password masked, with the driver to install if one is missing."""
    where = str(spec or DEFAULT_JOURNAL)
    said = masked(where, " ".join(str(problem).split()))
    return StorageError(f"storage {masked(where)}: {type(problem).__name__}: {said}{driver_hint(problem)}")


def _sampler(experiment: Experiment, seed: int) -> optuna.samplers.BaseSampler:
    name = experiment.study.sampler
    if name == "grid":
        return optuna.samplers.GridSampler(grid(experiment), seed=seed)
    return {"tpe": optuna.samplers.TPESampler, "cmaes": optuna.samplers.CmaEsSampler,
            "random": optuna.samplers.RandomSampler, "nsga2": optuna.samplers.NSGAIISampler}[name](seed=seed)


def _pruner(experiment: Experiment) -> optuna.pruners.BasePruner:
    rungs = experiment.evaluation.fidelity
    return {"none": optuna.pruners.NopPruner,
            "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=rungs[0]),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=rungs[0], max_resource=rungs[-1]),
            "wilcoxon": lambda: optuna.pruners.WilcoxonPruner(p_threshold=0.1)}[experiment.study.pruner]()


def open_study(experiment: Experiment, settings: Settings, create: bool = True) -> optuna.Study:
    storage = open_storage(settings.storage, create)
    tasks = experiment.evaluation.task_names
    directions = ["maximize"] * (len(tasks) if experiment.study.sampler == "nsga2" else 1)
    sampler, pruner = _sampler(experiment, settings.seed), _pruner(experiment)
    try:
        if not create:
            return optuna.load_study(study_name=experiment.study_name, storage=storage, sampler=sampler,
                                     pruner=pruner)
        return optuna.create_study(study_name=experiment.study_name, storage=storage, load_if_exists=True,
                                   sampler=sampler, pruner=pruner, directions=directions)
    except KeyError:
        raise StorageError(f"storage {masked(str(settings.storage or DEFAULT_JOURNAL))}: no study "
                           f"{experiment.study_name!r}; start it with `soupsearch run`") from None
    except Exception as problem:  # noqa: BLE001 -- a journal damaged past its last line is read only here
        raise _storage_error(settings.storage, problem) from None


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_dead(owner: str) -> bool:
    """Only a process on this host can be checked; other hosts rely on RDB heartbeats."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose process is gone, or that never named its process within the grace period."""
    if "owner" in trial.user_attrs:
        return _owner_dead(trial.user_attrs["owner"])
    return trial.datetime_start is not None and datetime.now() - trial.datetime_start > OWNERLESS_GRACE


def recover_interrupted(study: optuna.Study, tracker: Tracker) -> list[int]:
    """Fail each interrupted RUNNING trial and enqueue it again with its params and seed."""
    retried = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not interrupted(trial):
            continue
        owner = trial.user_attrs.get("owner", "a process that never named itself")
        # journal storage has no heartbeat; tell() fails any RUNNING trial by number
        study.tell(trial.number, state=TrialState.FAIL)
        if "mlflow_run_id" in trial.user_attrs:
            tracker.tag(trial.user_attrs["mlflow_run_id"], "soupsearch.fail_reason", f"interrupted: {owner} ended mid-trial")
            tracker.tag(trial.user_attrs["mlflow_run_id"], STATE_TAG, TrialState.FAIL.name)
            tracker.end(trial.user_attrs["mlflow_run_id"], "FAILED")
        seed = {k: v for k, v in trial.user_attrs.items() if k == "seed"}  # none if cut off before its seed
        study.enqueue_trial(trial.params, user_attrs=seed | {"retry_of": trial.number,
                                                             "retry_reason": f"interrupted: {owner} ended mid-trial"})
        retried.append(trial.number)
    return retried


def enqueue_warm_starts(study: optuna.Study, experiment: Experiment) -> None:
    for index, start in enumerate(experiment.warm_starts):
        study.enqueue_trial(expand_warm_start(experiment, start, f"warm_starts[{index}]"), skip_if_exists=True)


class Objective:
    """One trial: suggest -> mergekit config -> in-place build -> scores at each fidelity rung."""

    def __init__(self, experiment: Experiment, bench: Workbench, tracker: Tracker, parent_run: str,
                 seed: int) -> None:
        self.experiment, self.bench, self.tracker = experiment, bench, tracker
        self.parent_run, self.seed = parent_run, seed
        self.multi = experiment.study.sampler == "nsga2"

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        # a re-run of an interrupted trial keeps that trial's seed, so it rebuilds the same weights
        seed = trial.user_attrs.get("seed", self.seed * 1_000_003 + trial.number)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("owner", _owner())
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
        objective = self.experiment.evaluation.weights
        eval_s, reported = 0.0, set()
        for rung, more, result in self.bench.score_rungs(self.experiment.evaluation.fidelity):
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
                "fidelity": rung, "merge_s": merge_s, "eval_s": eval_s, "total_s": time.perf_counter() - started}
            self.tracker.log(run, metrics=metrics, step=rung)
            if trial.should_prune():
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
    if (sum(t.state in FINISHED for t in trials) < settings.trials or any(t.state == TrialState.RUNNING for t in trials)
            or baselines.missing(study, experiment) or study.user_attrs.get(RECORDED) != len(trials)):
        return None
    return study


def _event(trial: optuna.trial.FrozenTrial) -> str:
    """A finished trial as one line: its score, on how many items, and where its time went."""
    attrs = trial.user_attrs
    return (f"trial {trial.number} {trial.state.name} {trial_value(trial):.4f} on {attrs['fidelity']} items "
            f"(merge {attrs['merge_s']:.2f} s, eval {attrs['eval_s']:.2f} s)")


def run_study(experiment: Experiment, settings: Settings, join: bool = False) -> optuna.Study:
    """Run (or resume) the study until ``settings.trials`` trials have finished; ``join``: a worker."""
    settled = None if join else _settled(experiment, settings)
    if settled is not None:
        output.say(f"study {settled.study_name}: {settings.trials} trials reached and parents scored; nothing to run")
        return settled
    from optuna.study import MaxTrialsCallback

    from search.validate import check_configs, midpoint_configs
    from search.workbench import Workbench

    bench = Workbench(experiment, settings.device)  # a missing model fails before anything is written
    check_configs(experiment, bench.refs, bench.engine)  # parents that cannot merge fail before the first trial
    tracker = Tracker(settings.tracking_uri, experiment.name)  # the store exists before any trial
    study = open_study(experiment, settings, create=not join)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent is None:
        parent = tracker.parent_run(study.study_name)
        study.set_user_attr("mlflow_parent_run_id", parent)
        tracker.log(parent, params={"sampler": experiment.study.sampler, "pruner": experiment.study.pruner,
                                    "methods": ",".join(experiment.space.methods), "seed": settings.seed,
                                    "fidelity": experiment.evaluation.fidelity,
                                    "objective": experiment.evaluation.weights.name},
                    texts={"experiment.yaml": yaml.safe_dump(experiment.model_dump(mode="json", by_alias=True),
                                                             sort_keys=False)})
    recover_interrupted(study, tracker)
    if not join:
        baselines.score(study, experiment, bench, tracker, parent)
    # a resumed sampler must not replay the fresh stream (it would propose the finished trials again),
    # and concurrent workers must not share one: reseed by trials so far, and by process for workers
    offset = len(study.trials) + (os.getpid() << 20 if join else 0)
    study.sampler = _sampler(experiment, (settings.seed + offset) % 2**32)
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
                    best = (f"{study.best_value:.4f}" if len(study.directions) == 1
                            and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else "")
                    shown.update(_event(trial) + (f"; best {best}" if best else ""), best=best)

            objective = Objective(experiment, bench, tracker, parent, settings.seed)
            # failed trials do not count; allow as many failures as trials before giving up
            study.optimize(objective, n_trials=remaining + settings.trials, timeout=settings.timeout,
                           catch=(TrialFailed,), gc_after_trial=False,
                           callbacks=[MaxTrialsCallback(settings.trials, states=FINISHED), progress])
    # the last process to stop records the study: any other still running a trial records it after this one
    if all(interrupted(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        record_study(study, tracker, parent)
    return study


def record_study(study: optuna.Study, tracker: Tracker, parent: str) -> None:
    """On the parent run: the leaderboard, the best config and Optuna's plots."""
    rows = leaderboard(study)
    # rewritten as a whole: MLflow's log_table appends, so every resume would add the rows again
    columns = list(rows[0]) if rows else []
    tracker.log(parent, dicts={"leaderboard.json": {"columns": columns, "data": [[r[k] for k in columns] for r in rows]}})
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete and len(study.directions) == 1:
        best = study.best_trial
        config = tracker.client.download_artifacts(best.user_attrs["mlflow_run_id"], "config.yaml")
        tracker.log(parent, metrics={"best/search_objective": best.value},
                    texts={"best_config.yaml": Path(config).read_text()})
        tracker.tag(parent, "soupsearch.best_trial", str(best.number))
        _log_plots(tracker, parent, study, importances=len(complete) > 1 and len(best.params) > 1)
    tracker.end(parent)
    study.set_user_attr(RECORDED, len(study.trials))


def _log_plots(tracker: Tracker, parent: str, study: optuna.Study, importances: bool) -> None:
    """Optuna's plots as HTML (plotly) and PNG (Optuna's matplotlib backend, which needs no
    browser: plotly's PNG export through kaleido needs Chrome)."""
    import warnings

    os.environ.setdefault("MPLBACKEND", "Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt
    from optuna import visualization
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as static

    plots = {"optimization_history": (visualization.plot_optimization_history, static.plot_optimization_history)}
    if importances:
        plots["param_importances"] = (visualization.plot_param_importances, static.plot_param_importances)
    for name, (interactive, still) in plots.items():
        tracker.client.log_figure(parent, interactive(study), f"plots/{name}.html")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # the matplotlib backend is "experimental"
            figure = still(study).figure
        figure.tight_layout()
        tracker.client.log_figure(parent, figure, f"plots/{name}.png")
        plt.close(figure)
