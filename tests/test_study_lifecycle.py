"""A study's parent run while it resumes, heartbeat retries on an RDB storage, and the settings
that hold URLs: checked without a PostgreSQL server (tests/test_postgres.py runs a study on one;
there, on one host, a dead worker's trial is found by its PID before its heartbeat goes stale)."""

import os
import time

import optuna
import pytest
from optuna.trial import TrialState

from search.cli import main
from search.storage import open_storage
from search.study import Settings, TrialRunner
from search.tracking import _environment
from tests.search_helpers import runs_in, write_experiment


def test_a_resumed_study_reopens_its_parent_run_while_it_works(pico_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, study={"sampler": "random", "trials": 1})
    assert main(["run", str(path)]) == 0
    client, runs = runs_in(tmp_path)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0].info.run_id
    assert client.get_run(parent).info.status == "FINISHED"

    seen = []
    evaluate = TrialRunner._evaluate

    def watched(self, trial, run, seed):
        seen.append(self.tracker.client.get_run(self.parent_run).info.status)
        return evaluate(self, trial, run, seed)

    monkeypatch.setattr(TrialRunner, "_evaluate", watched)
    assert main(["run", str(path), "--trials", "2"]) == 0
    assert seen == ["RUNNING"]  # the resumed study's one new trial ran under a RUNNING parent
    client, runs = runs_in(tmp_path)
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [parent]
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_whose_heartbeat_stops_is_failed_and_rerun_with_its_seed(tmp_path, monkeypatch):
    """Optuna fails a trial whose beats stopped (its process died, on any host) when another process
    starts a trial; soupsearch's callback enqueues it again, as it does an interrupted journal trial."""
    monkeypatch.setenv("SOUPSEARCH_HEARTBEAT_SECONDS", "1")
    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"))
    lost = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    lost.set_user_attr("seed", 42)
    lost.set_user_attr("owner", "elsewhere:1")
    study._storage.record_heartbeat(lost._trial_id)
    time.sleep(3.5)  # past the grace period (two beats), plus one: sqlite keeps heartbeat times to the second
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    retry = trials[1]
    assert retry.system_attrs["fixed_params"] == lost.params and retry.user_attrs["seed"] == 42
    assert retry.user_attrs["retry_of"] == lost.number and retry.user_attrs["retries"] == 1
    assert retry.user_attrs["retry_reason"] == "interrupted: elsewhere:1 stopped sending heartbeats"


def test_settings_show_no_password_and_the_tracking_probe_restores_the_environment(monkeypatch):
    settings = Settings(
        trials=1,
        timeout=None,
        storage="postgresql://soup:hunter2@db/soup",
        tracking_uri="https://me:hunter2@mlflow.example/",
        device="cpu",
        seed=0,
    )
    shown = f"{settings} {settings!r}"
    assert "hunter2" not in shown and "postgresql://soup:***@db/soup" in shown
    assert settings.storage == "postgresql://soup:hunter2@db/soup"  # the real one, to connect with
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.4, 0.6, 0.8])
def test_a_process_killed_while_mlflow_builds_its_sqlite_store_leaves_none_or_a_whole_one(tmp_path, delay):
    """MLflow builds the store's schema in dozens of commits; a store cut off midway could never be
    opened again. The kill lands `delay` seconds after the first file of the store appears."""
    import signal
    import subprocess
    import sys

    from search.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    build = subprocess.Popen(
        [sys.executable, "-c", f"from search.tracking import Tracker; Tracker({uri!r}, 'x')"],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(("mlflow.db", ".mlflow.db")) for p in tmp_path.iterdir()):
        assert build.poll() is None and time.monotonic() < deadline, "the store never appeared"
        time.sleep(0.005)
    time.sleep(delay)
    build.send_signal(signal.SIGKILL)
    build.wait()
    tracker = Tracker(uri, "x")  # opens what the killed process left, or builds the store anew
    assert tracker.client.get_experiment(tracker.experiment_id).name == "x"
