"""Where a study lives and how it survives its processes: the Optuna storage (a journal file on one
machine, an RDB URL across machines), the liveness of running trials, and the re-run of a trial
whose process died.

A trial names its owner (host:pid) as it starts. On one host a dead owner is seen by its PID; across
hosts, an RDB storage's heartbeats fail a trial that stopped beating, and Optuna hands it to
``RetryStale``. Either way ``retry`` enqueues it again with its parameters and seed; a trial found
by its PID once the study has its trials is failed and not re-run. Optuna's own
``RetryFailedTrialCallback`` is not used: it copies every user attr of the dead trial (its owner and
its MLflow run among them) into the re-run, and leaves that MLflow run open.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from search.tracking import STATE_TAG
from search.urls import driver_hint, masked
from user_input import UserError, env_int

if TYPE_CHECKING:
    from search.tracking import Tracker

DEFAULT_JOURNAL = Path(".soupsearch") / "journal.log"
# a trial names its owner as it starts: one without an owner this long after its start was cut off before
OWNERLESS_GRACE = timedelta(minutes=5)
# RDB storage: each running trial beats this often; one silent for twice as long is failed and re-run
HEARTBEAT_ENV = "SOUPSEARCH_HEARTBEAT_SECONDS"
HEARTBEAT_S = 60
MAX_RETRIES = 3  # re-runs of one interrupted trial (a candidate that kills its process each time)


class StorageError(UserError):
    """The Optuna storage cannot be opened; the message names it, password masked."""


def heartbeat_seconds() -> int:
    """``SOUPSEARCH_HEARTBEAT_SECONDS`` (default 60): how often a trial on an RDB storage beats."""
    return env_int(HEARTBEAT_ENV, HEARTBEAT_S, "seconds between two heartbeats of a trial", minimum=1)


class RetryStale:
    """Optuna's heartbeat callback: it has already failed a trial that stopped beating (its process
    died, on any host); this re-runs it as :func:`recover_interrupted` does, and ends its MLflow run
    once a tracker is attached (only a process that runs trials has one, and only it checks beats)."""

    def __init__(self) -> None:
        self.tracker: Tracker | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        owner = trial.user_attrs.get("owner", "a process that never named itself")
        retry(study, trial, self.tracker, f"interrupted: {owner} stopped sending heartbeats")


@contextlib.contextmanager
def _heartbeats_on_purpose() -> Iterator[None]:
    """Optuna calls heartbeats and their callback "experimental"; they are used on purpose."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def open_storage(spec: str | None, create: bool = True) -> optuna.storages.BaseStorage:
    """An RDB URL (many machines, with heartbeats) or a journal file (one machine; the default)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        path = journal_path(spec)
        if path is None:
            beat = heartbeat_seconds()
            with _heartbeats_on_purpose():
                return RDBStorage(
                    spec, heartbeat_interval=beat, grace_period=2 * beat, heartbeat_stale_trial_callback=RetryStale()
                )
        if not create and not path.is_file():
            raise FileNotFoundError("no journal there; start the study with `soupsearch run`")
        path.parent.mkdir(parents=True, exist_ok=True)
        # absolute: Optuna's lock is a symlink to the path as given, so a relative one dangles, and the
        # lock that a process killed mid-write leaves is then never broken: every later run would hang
        return JournalStorage(JournalFileBackend(str(path.resolve())))
    except UserError:
        raise
    except Exception as problem:  # noqa: BLE001 -- every failure to open is the storage spec's fault
        raise storage_error(spec, problem) from None


def journal_path(spec: str | None) -> Path | None:
    """The journal file that ``spec`` names (None for an RDB URL); StorageError for a folder, checked
    before anything is written."""
    if spec is not None and "://" in spec:
        return None
    path = Path(spec) if spec else DEFAULT_JOURNAL
    if path.is_dir():
        raise StorageError(f"storage {path}: a folder; give a journal file such as {path / 'journal.log'}")
    return path


def storage_error(spec: str | None, problem: Exception) -> StorageError:
    """One line naming the storage, its password masked, with the driver to install if one is missing."""
    where = str(spec or DEFAULT_JOURNAL)
    said = masked(where, " ".join(str(problem).split()))
    return StorageError(f"storage {masked(where)}: {type(problem).__name__}: {said}{driver_hint(problem)}")


def owner() -> str:
    """This process, as trials name their owner."""
    return f"{socket.gethostname()}:{os.getpid()}"


@functools.cache
def pid_space() -> str:
    """Where this process's PID is meaningful: the machine's boot and the PID namespace (container);
    empty where /proc does not say. Machines and containers can share a hostname."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _owner_dead(owner: str, space: str) -> bool:
    """Only a process of this host and PID namespace can be checked; others rely on RDB heartbeats."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or space != pid_space():
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
        return _owner_dead(trial.user_attrs["owner"], trial.user_attrs.get("pid_space", pid_space()))
    return trial.datetime_start is not None and datetime.now() - trial.datetime_start > OWNERLESS_GRACE


def recover_interrupted(
    study: optuna.Study, tracker: Tracker | None, rerun: Callable[[], bool] = lambda: True
) -> list[int]:
    """Fail each interrupted RUNNING trial; enqueue it again with its params and seed if ``rerun()``
    (the study still needs trials), else give it the reason it was not."""
    from optuna.exceptions import UpdateFinishedTrialError

    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not interrupted(trial):
            continue
        reason = f"interrupted: {trial.user_attrs.get('owner', 'a process that never named itself')} ended mid-trial"
        wanted = rerun()
        again = wanted and trial.user_attrs.get("retries", 0) < MAX_RETRIES
        try:  # journal storage has no heartbeat; tell() fails any RUNNING trial by number
            if not again:  # the failed trial keeps the reason itself: no re-run will carry it
                reason += "; not re-run: " + (f"{MAX_RETRIES} re-runs interrupted" if wanted else "trials reached")
                study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, UpdateFinishedTrialError):
            continue  # another process (or a stale heartbeat) failed it first, and re-runs it
        retry(study, trial, tracker, reason, again)
        recovered.append(trial.number)
    return recovered


def fail_stale(study: optuna.Study) -> None:
    """Fail, and re-run through ``RetryStale``, the trials whose heartbeat went stale; Optuna itself
    checks only as a process starts a trial. Nothing on a storage without heartbeats."""
    with _heartbeats_on_purpose():
        optuna.storages.fail_stale_trials(study)


def retry(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, tracker: Tracker | None, reason: str, rerun: bool = True
) -> None:
    """A failed, interrupted trial: with ``rerun``, enqueued again with its params and seed, up to
    MAX_RETRIES times in a row; its MLflow run ends FAILED, as far as the tracking store can be
    reached (the re-run must not hang on it)."""
    retries = trial.user_attrs.get("retries", 0) + 1
    if rerun and retries <= MAX_RETRIES:
        seed = {k: v for k, v in trial.user_attrs.items() if k == "seed"}  # none if cut off before its seed
        study.enqueue_trial(
            trial.params, user_attrs=seed | {"retry_of": trial.number, "retry_reason": reason, "retries": retries}
        )
    run = trial.user_attrs.get("mlflow_run_id")
    if tracker is not None and run is not None:
        try:
            tracker.tag(run, "soupsearch.fail_reason", reason)
            tracker.tag(run, STATE_TAG, TrialState.FAIL.name)
            tracker.end(run, "FAILED")
        except Exception as problem:  # noqa: BLE001 -- the record can wait; the trial's re-run cannot
            warnings.warn(f"trial {trial.number}: its MLflow run {run} could not be ended: {problem}", stacklevel=2)
