"""Several machines for real: `run` and `worker` processes on one study in PostgreSQL (Optuna's RDB
storage), with MLflow on PostgreSQL too, directly or behind `mlflow server`; a worker killed with
SIGKILL mid-trial. Each test gets fresh databases on the server that SOUPSEARCH_TEST_POSTGRES names
(a superuser URL; `.ci/run` starts a throwaway server with `.ci/postgres.sh`). Without it the tests
skip, except under CI or SOUPSEARCH_REQUIRE_POSTGRES, where they fail."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from optuna.trial import TrialState

from search.study import FINISHED
from search.tracking import _answers
from tests.search_helpers import write_experiment

URL_ENV = "SOUPSEARCH_TEST_POSTGRES"
STUDY = "pico-slerp"
CLI = [sys.executable, "-m", "search.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
# the experiments name their stores through the environment, as the README tells users to
URLS = {"storage": "${SOUPSEARCH_TEST_STORAGE}", "tracking_uri": "${SOUPSEARCH_TEST_TRACKING}"}


def _required() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
        for name in ("CI", "SOUPSEARCH_REQUIRE_POSTGRES")
    )


def _missing(reason: str) -> None:
    if _required():
        pytest.fail(
            f"{reason}; CI or SOUPSEARCH_REQUIRE_POSTGRES is set, so these tests must run "
            "(.ci/run starts a PostgreSQL with .ci/postgres.sh)",
            pytrace=False,
        )
    pytest.skip(f"{reason} (.ci/run starts a throwaway PostgreSQL with .ci/postgres.sh)")


@pytest.fixture
def database():
    """A factory of fresh, empty databases on the test server; each is dropped after the test."""
    server = os.environ.get(URL_ENV, "").strip()
    if not server:
        _missing(f"{URL_ENV} is not set: no PostgreSQL server to test on")
    try:
        import psycopg
    except ImportError:
        _missing("psycopg is not installed (pip install -e '.[postgres]')")
    made = []

    def make(role: str) -> str:
        name = f"soupsearch_{role}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return urlunsplit(urlsplit(server)._replace(path=f"/{name}"))

    yield make
    with psycopg.connect(server, autocommit=True) as connection:
        for name in made:  # FORCE: this process's own pools (Optuna, MLflow) still hold connections
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _env(storage: str, tracking: str, **more: str) -> dict[str, str]:
    return {**ENV, "SOUPSEARCH_TEST_STORAGE": storage, "SOUPSEARCH_TEST_TRACKING": tracking, **more}


@pytest.fixture
def spawned():
    """Processes a test starts; any still running when it ends (a failed assertion) is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)


def _run_then_together(
    path: Path,
    env: dict,
    workers: int,
    spawned: list,
    cwd: list[Path] | None = None,
) -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    """`run --trials 1` creates the study (and scores the parents); then `run` resumes it while
    ``workers`` workers join, all started at once, so that each is up before the budget is spent
    (a worker started once the study exists would still be importing torch when `run` is done)."""
    folders = cwd or [path.parent] * (workers + 1)
    first = subprocess.run(
        [*CLI, "run", str(path), "--trials", "1"], cwd=folders[0], env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run = subprocess.Popen(
        [*CLI, "run", str(path)], cwd=folders[0], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    started = [
        subprocess.Popen(
            [*CLI, "worker", str(path)],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders[1:]
    ]
    spawned += [run, *started]
    return run, started


def _wait(processes: list[subprocess.Popen]) -> None:
    for process in processes:  # communicate: a full stderr pipe must not block a process
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors[-3000:]


def _study(storage: str):
    import optuna

    return optuna.load_study(study_name=STUDY, storage=storage)


def _runs(client, experiment: str = STUDY):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000)


def _owner(process: subprocess.Popen) -> str:
    return f"{socket.gethostname()}:{process.pid}"


def _check_records(study, client, budget: int, processes: list[subprocess.Popen]) -> dict:
    """The checks every test shares, ``processes`` having run together; returns the MLflow trial
    runs by trial number."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # docs/experiments.md: each process stops once `trials` have finished; with W processes up to
    # W - 1 trials that were already running then also finish
    assert budget <= len(finished) <= budget + len(processes) - 1, len(finished)
    assert len({t.number for t in trials}) == len(trials)
    assert len({tuple(sorted(t.params.items())) for t in finished}) == len(finished)  # no candidate ran twice
    runs = _runs(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    baselines = Counter(r.data.tags["soupsearch.baseline"] for r in children if "soupsearch.baseline" in r.data.tags)
    assert baselines == {"general": 1, "math": 1}
    numbers = Counter(int(r.data.tags["soupsearch.trial"]) for r in children if "soupsearch.trial" in r.data.tags)
    assert numbers == Counter(t.number for t in trials)  # exactly one MLflow run per trial
    assert len(runs) == len(trials) + 2 + 1
    by_number = {int(r.data.tags["soupsearch.trial"]): r for r in children if "soupsearch.trial" in r.data.tags}
    for trial in finished:
        run = by_number[trial.number]
        assert run.info.status == "FINISHED" and run.data.params["seed"] == str(trial.user_attrs["seed"])
        assert run.data.tags["soupsearch.state"] == trial.state.name
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "leaderboard.json")).read_text())
    trial_column, state_column = table["columns"].index("trial"), table["columns"].index("state")
    listed = [row[trial_column] for row in table["data"] if row[state_column] != "BASELINE"]
    shown = [t.number for t in trials if t.state in (*FINISHED, TrialState.FAIL)]
    assert sorted(listed) == sorted(shown) and len(set(listed)) == len(listed)  # each trial exactly once
    owners = Counter(t.user_attrs["owner"] for t in finished)
    print(
        f"measured: {len(finished)} finished of budget {budget}, {len(trials)} trials, by process "
        f"{sorted(owners.values(), reverse=True)}, 0 duplicates, {len(runs)} MLflow runs"
    )
    return by_number


@pytest.mark.slow
def test_run_and_two_workers_share_a_postgresql_study_and_mlflow_store(pico_zoo, tmp_path, database, spawned):
    from mlflow.tracking import MlflowClient

    storage, tracking = database("optuna"), database("mlflow")
    path = write_experiment(
        tmp_path,
        **URLS,
        evaluation={"tasks": ["tiny_gsm8k"], "fidelity": [16], "select_limit": 8, "test_limit": 8},
        study={"sampler": "random", "trials": 6},
    )
    run, workers = _run_then_together(path, _env(storage, tracking), workers=2, spawned=spawned)
    _wait([run, *workers])

    study = _study(storage)
    client = MlflowClient(tracking_uri=tracking)
    _check_records(study, client, budget=6, processes=[run, *workers])
    owners = {t.user_attrs["owner"] for t in study.get_trials(deepcopy=False, states=FINISHED)}
    assert {_owner(p) for p in (run, *workers)} <= owners  # every process ran trials
    # a database store keeps no files: MLflow puts artifacts in ./mlruns of the process that made the
    # experiment (here the shared working folder); across machines, use `mlflow server` (next tests)
    experiment = client.get_experiment_by_name(STUDY)
    assert Path(urlsplit(experiment.artifact_location).path).is_relative_to(tmp_path)
    assert list(Path(urlsplit(experiment.artifact_location).path).rglob("leaderboard.json"))


@pytest.mark.slow
def test_worker_killed_mid_trial_on_postgresql_is_rerun_once(pico_zoo, tmp_path, database, spawned):
    """On this host the others find the dead worker's trial by its process, between two of their own
    trials; on another host its heartbeats going stale tell them (tests/test_study_lifecycle.py)."""
    import optuna
    from mlflow.tracking import MlflowClient

    storage, tracking = database("optuna"), database("mlflow")
    path = write_experiment(
        tmp_path,
        **URLS,
        evaluation={"tasks": ["tiny_gsm8k"], "fidelity": [32], "select_limit": 8, "test_limit": 8},
        study={"sampler": "random", "trials": 24},
    )
    # a beat every 3 s, stale after 6 s (60 s and 120 s by default): whichever finds it first re-runs it
    env = _env(storage, tracking, SOUPSEARCH_HEARTBEAT_SECONDS="3")
    run, workers = _run_then_together(path, env, workers=2, spawned=spawned)
    victim = workers[0]
    watch = optuna.load_study(study_name=STUDY, storage=optuna.storages.RDBStorage(storage))
    killed, deadline = None, time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.05)
        trials = watch.get_trials(deepcopy=False)
        # mid-trial: the victim's trial with every parameter suggested (6), its candidate being scored
        running = [
            t
            for t in trials
            if t.state == TrialState.RUNNING and len(t.params) == 6 and t.user_attrs.get("owner") == _owner(victim)
        ]
        # and the others past their start, where every process recovers what it finds
        others = {_owner(run), _owner(workers[1])} <= {t.user_attrs.get("owner") for t in trials}
        if running and others:
            os.kill(victim.pid, signal.SIGKILL)
            killed = running[0]
            complete_then = {t.number for t in watch.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    victim.wait(timeout=60)
    assert killed is not None, "the worker ended before it could be killed mid-trial"
    _wait([run, workers[1]])

    study = _study(storage)
    client = MlflowClient(tracking_uri=tracking)
    by_number = _check_records(study, client, budget=24, processes=[run, *workers])
    trials = study.get_trials(deepcopy=False)
    assert complete_then <= {t.number for t in trials if t.state == TrialState.COMPLETE}  # none lost
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed.number]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    retry = retries[0]
    assert retry.params == killed.params and retry.user_attrs["seed"] == killed.user_attrs["seed"]
    reason = retry.user_attrs["retry_reason"]
    assert reason.startswith(f"interrupted: {_owner(victim)} ") and reason.endswith(
        ("ended mid-trial", "stopped sending heartbeats")
    )
    assert not [t for t in trials if "retry_of" in t.user_attrs and t.number != retry.number]
    dead = by_number[killed.number]
    assert dead.info.status == "FAILED" and dead.data.tags["soupsearch.state"] == "FAIL"
    assert dead.data.tags["soupsearch.fail_reason"] == reason
    assert by_number[retry.number].info.status == "FINISHED"
    print(
        f"measured: killed trial {killed.number}, re-run as trial {retry.number} by "
        f"{'run' if retry.user_attrs['owner'] == _owner(run) else 'the other worker'} ({reason})"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_run_and_worker_in_separate_folders_share_an_mlflow_server_on_postgresql(pico_zoo, tmp_path, database, spawned):
    from mlflow.tracking import MlflowClient

    storage, backend = database("optuna"), database("mlflow")
    artifacts = tmp_path / "server-artifacts"
    port = _free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "1",
        ],
        env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    tracking = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"{tracking}/health"):
            assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer within 180 s"
            time.sleep(0.5)
        # two "machines": each process in its own folder, sharing only the two URLs
        machines = [tmp_path / "machine-a", tmp_path / "machine-b"]
        for folder in machines:
            folder.mkdir()
        path = write_experiment(
            tmp_path,
            **URLS,
            evaluation={"tasks": ["tiny_gsm8k"], "fidelity": [16], "select_limit": 8, "test_limit": 8},
            study={"sampler": "random", "trials": 4},
        )
        run, workers = _run_then_together(path, _env(storage, tracking), workers=1, spawned=spawned, cwd=machines)
        _wait([run, *workers])

        study = _study(storage)
        client = MlflowClient(tracking_uri=tracking)
        by_number = _check_records(study, client, budget=4, processes=[run, *workers])
        owners = {t.user_attrs["owner"] for t in study.get_trials(deepcopy=False, states=FINISHED)}
        assert {_owner(p) for p in (run, *workers)} <= owners
        # every artifact went through the server into its destination; neither machine kept one
        some_trial = next(iter(by_number.values())).info.run_id
        assert yaml.safe_load(Path(client.download_artifacts(some_trial, "config.yaml")).read_text())["merge_method"]
        assert len(list(artifacts.rglob("leaderboard.json"))) == 1
        assert len(list(artifacts.rglob("config.yaml"))) == len(by_number)
        for folder in machines:
            assert not {p.name for p in folder.iterdir()} & {"mlruns", "mlartifacts", "mlflow.db"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
