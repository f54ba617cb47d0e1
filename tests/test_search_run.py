"""`soupsearch run` / `export` end to end on the pico zoo: Optuna journal, MLflow records, resume."""

import collections
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file

from merge_core.config import load_config
from search.cli import main
from search.leaderboard import leaderboard
from tests.search_helpers import runs_in, study_in, write_experiment

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_run_tracks_every_trial_and_export_matches_mergekit(pico_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path)
    assert main(["run", str(path), "--trials", "3"]) == 0
    assert "study pico-slerp: 3 complete" in capsys.readouterr().out
    assert main(["status", str(path)]) == 0
    assert "study pico-slerp: 3 complete" in capsys.readouterr().out
    study = study_in(tmp_path)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3
    assert trials[0].params["slerp/t/self_attn/1"] == 1.0  # the warm start ran first

    client, runs = runs_in(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    trial_runs = [r for r in children if "soupsearch.trial" in r.data.tags]
    assert len(parents) == 1 and len(trial_runs) == 3 and len(children) == 3 + 2 == len(runs) - 1  # + 2 baselines
    by_number = {int(r.data.tags["soupsearch.trial"]): r for r in trial_runs}
    for trial in trials:
        run = by_number[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["search/objective"] == pytest.approx(trial.value)
        key = "search/tiny_gsm8k/exact_match_strict-match"
        assert run.data.metrics[f"{key}/ci_low"] <= run.data.metrics[key] <= run.data.metrics[f"{key}/ci_high"]
        assert {"merge_s", "eval_s", "total_s", "fidelity"} <= set(run.data.metrics)
        assert run.data.params["seed"] == str(trial.user_attrs["seed"])
        assert trial.user_attrs["batch_size"] >= 1  # what export re-scores the winner with
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
        assert config["parameters"]["t"][0]["value"] == [
            trial.params["slerp/t/self_attn/0"],
            trial.params["slerp/t/self_attn/1"],
        ]
        load_config(config)
        per_item = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "per_item.json")).read_text())
        items = per_item["tasks"]["tiny_gsm8k"]["per_item"]
        assert len(items) == 8 and sum(items) / 8 == pytest.approx(trial.value)
    parent = parents[0].info.run_id
    best = Path(client.download_artifacts(parent, "best_config.yaml")).read_text()
    assert (
        best
        == Path(client.download_artifacts(by_number[study.best_trial.number].info.run_id, "config.yaml")).read_text()
    )
    assert {"leaderboard.json", "plots"} <= {a.path for a in client.list_artifacts(parent)}
    plots = {a.path: a.file_size for a in client.list_artifacts(parent, "plots")}
    for name in ("optimization_history", "param_importances"):
        assert plots[f"plots/{name}.html"] > 0
        png = Path(client.download_artifacts(parent, f"plots/{name}.png")).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000

    out = tmp_path / "export"
    assert main(["export", str(path), "--out", str(out)]) == 0
    scores = yaml.safe_load((out / "scores.json").read_text())
    assert scores["finalists"][0] == study.best_trial.number and scores["trial"] in scores["finalists"]
    assert "| test | tiny_gsm8k |" in (out / "README.md").read_text()
    # SLERP is deterministic: mergekit-yaml on the exported YAML must give the exported weights
    reference = tmp_path / "mergekit"
    subprocess.run(
        [str(Path(sys.executable).parent / "mergekit-yaml"), str(out / "mergekit_config.yml"), str(reference)],
        check=True,
        env=ENV,
        capture_output=True,
        timeout=600,
    )
    ours, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equal(theirs[name]), name


def test_killed_run_resumes_without_losing_or_duplicating_trials(pico_zoo, tmp_path):
    # the parents' baselines are scored before the first trial: on a few select and test items only
    path = write_experiment(
        tmp_path,
        evaluation={"tasks": ["tiny_gsm8k"], "fidelity": [64], "select_limit": 8, "test_limit": 8},
        study={"sampler": "random", "trials": 4},
    )
    command = [sys.executable, "-m", "search.cli", "run", str(path)]
    worker = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.05)
        if not (tmp_path / ".soupsearch" / "journal.log").exists():
            continue
        try:
            trials = study_in(tmp_path).get_trials(deepcopy=False)
        except KeyError:
            continue
        # mid-trial: every parameter suggested (6: 3 filters x 2 anchors), the candidate being scored
        running = [t for t in trials if t.state == TrialState.RUNNING and len(t.params) == 6]
        if any(t.state == TrialState.COMPLETE for t in trials) and running:
            os.kill(worker.pid, signal.SIGKILL)
            killed = running[0]
    worker.wait(timeout=600)  # no kill: the run finishes its four trials
    assert killed is not None, "the run ended before it could be killed mid-trial"
    assert study_in(tmp_path).get_trials(deepcopy=False)[killed.number].state == TrialState.RUNNING

    resumed = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trials = study_in(tmp_path).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == 4
    assert [t.number for t in failed] == [killed.number]
    retry = [t for t in complete if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1
    assert "interrupted" in retry[0].user_attrs["retry_reason"]
    note = {row["trial"]: row["note"] for row in leaderboard(study_in(tmp_path))}[killed.number]
    assert note.startswith("interrupted") and note.endswith(f"re-run as trial {retry[0].number}")
    assert (
        retry[0].params == killed.params == failed[0].params
        and retry[0].user_attrs["seed"] == killed.user_attrs["seed"]
    )
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # no duplicate trial
    client, runs = runs_in(tmp_path)
    states = {int(r.data.tags["soupsearch.trial"]): r.info.status for r in runs if "soupsearch.trial" in r.data.tags}
    assert states.pop(killed.number) == "FAILED"
    assert sorted(states) == sorted(t.number for t in complete) and set(states.values()) == {"FINISHED"}


def test_a_trial_stopped_by_ctrl_c_is_rerun_with_its_parameters_and_seed(pico_zoo, tmp_path, monkeypatch, capsys):
    from search.space import suggest
    from search.study import TrialRunner

    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, study={"sampler": "random", "trials": 2})
    evaluate = TrialRunner._evaluate

    def stopped(self, trial, run, seed):
        if trial.number == 1:
            suggest(trial, self.experiment)  # its parameters are drawn, as before every build
            raise KeyboardInterrupt
        return evaluate(self, trial, run, seed)

    monkeypatch.setattr(TrialRunner, "_evaluate", stopped)
    assert main(["run", str(path)]) == 1
    assert capsys.readouterr().err.endswith("soupsearch: interrupted\n")
    monkeypatch.setattr(TrialRunner, "_evaluate", evaluate)
    assert main(["run", str(path)]) == 0
    trials = study_in(tmp_path).trials
    assert (trials[1].state, trials[1].user_attrs["fail_reason"]) == (TrialState.FAIL, "interrupted: Ctrl-C")
    [rerun] = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert rerun.state == TrialState.COMPLETE and rerun.params == trials[1].params
    assert rerun.user_attrs["seed"] == trials[1].user_attrs["seed"]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


def test_journal_lock_left_by_a_process_killed_mid_write_is_broken_after_the_grace_period(tmp_path):
    """The default journal path is relative; Optuna's lock is a symlink to that path, which dangled,
    so a run after a kill mid-write spun forever instead of breaking the stale lock after 30 s."""
    dies_holding_the_lock = (
        "import os; from search.storage import open_storage; open_storage(None)._backend._lock.acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", dies_holding_the_lock], cwd=tmp_path, env=ENV, check=True, timeout=120)
    assert (tmp_path / ".soupsearch" / "journal.log.lock").is_symlink()
    opens_the_study = (
        "import optuna; from search.storage import open_storage; "
        "optuna.create_study(study_name='s', storage=open_storage(None)); print('created')"
    )
    started = time.monotonic()
    after = subprocess.run(
        [sys.executable, "-c", opens_the_study], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=150
    )
    assert after.returncode == 0 and after.stdout.strip() == "created", after.stderr[-2000:]
    assert 30 <= time.monotonic() - started < 150  # Optuna's grace period, then on
    assert not (tmp_path / ".soupsearch" / "journal.log.lock").is_symlink()


def test_failed_trial_is_recorded_with_its_reason_and_the_study_goes_on(pico_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # weights past float32's range make the normalized linear merge inf/inf = NaN: the candidate fails
    path = write_experiment(
        tmp_path,
        space={"linear": {"weight": {"low": 0, "high": 1e39}}},
        warm_starts=[
            {"linear/weight/general": 1, "linear/weight/math": 1},
            {"linear/weight/general": 1e39, "linear/weight/math": 1e39},
            {"linear/weight/general": 1, "linear/weight/math": 3},
        ],
        study={"trials": 2},
    )
    assert main(["run", str(path)]) == 0
    assert "2 complete, 1 fail" in capsys.readouterr().out
    trials = study_in(tmp_path).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "non-finite weights" in trials[1].user_attrs["fail_reason"]
    client, runs = runs_in(tmp_path)
    failed = [r for r in runs if r.data.tags.get("soupsearch.trial") == "1"]
    assert failed[0].info.status == "FAILED" and "non-finite" in failed[0].data.tags["soupsearch.fail_reason"]


def test_bad_storage_or_tracking_uri_exits_2_and_writes_nothing(pico_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path)
    assert main(["run", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/no/such/dir/mlflow.db"]) == 2
    assert "no/such/dir" in capsys.readouterr().err
    assert main(["run", str(path), "--storage", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    assert "postgresql://nobody@127.0.0.1:1/none" in capsys.readouterr().err
    assert not (tmp_path / ".soupsearch").exists()
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("pico-slerp") is None


def test_a_storage_that_is_a_folder_exits_2_before_anything_is_written(pico_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["run", str(path), "--storage", "runs"]) == 2
    assert "storage runs: a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml", "runs"]
    assert not any((tmp_path / "runs").iterdir())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_worker_shares_the_study_and_dashboard_serves_it(pico_zoo, tmp_path):
    import json
    import urllib.request

    path = write_experiment(
        tmp_path,
        evaluation={"tasks": ["tiny_gsm8k"], "fidelity": [32], "select_limit": 8, "test_limit": 8},
        study={"sampler": "random", "trials": 1},
    )
    command = [sys.executable, "-m", "search.cli"]
    subprocess.run([*command, "run", str(path)], cwd=tmp_path, env=ENV, check=True, capture_output=True, timeout=600)
    # two workers started together on the study that `run` created; a pico trial takes a fraction of
    # a second, so the workers get 30 of them, enough to outlast the gap between their start-ups
    workers = [
        subprocess.Popen(
            [*command, "worker", str(path), "--trials", "31"],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for worker in workers:  # communicate: a full stderr pipe must not block a worker
        _, errors = worker.communicate(timeout=600)
        assert worker.returncode == 0, errors[-2000:]
    complete = study_in(tmp_path).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert 31 <= len(complete) <= 32  # each stops at 31; both may finish the last one at once
    owners = collections.Counter(t.user_attrs["owner"] for t in complete)
    assert len(owners) == 3, owners  # run's trial, then each worker's
    assert len({tuple(sorted(t.params.items())) for t in complete}) == len(complete)

    port = _free_port()
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "dashboard", "--port", str(port)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline, found = time.monotonic() + 90, None
        while found is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name=pico-slerp") as answer:
                    found = json.load(answer)["experiment"]["experiment_id"]
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(
            f"{api}/runs/search",
            data=json.dumps({"experiment_ids": [found]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as answer:
            runs = json.load(answer)["runs"]
    finally:
        os.killpg(dashboard.pid, signal.SIGTERM)
        dashboard.wait(timeout=60)
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r["info"]["run_id"] for r, t in zip(runs, tags) if "mlflow.parentRunId" not in t]
    assert len(parents) == 1
    assert sum(t.get("mlflow.parentRunId") == parents[0] for t in tags) == len(complete) + 2  # and 2 baselines


def test_same_seed_gives_the_same_study_and_dare_export_reproduces_it(pico_zoo, tmp_path, monkeypatch):
    dare = {
        "models": {
            "base": "zoo:pico/base",
            "add": "zoo:pico/specialist-addition",
            "sub": "zoo:pico/specialist-subtraction",
        },
        "base_model": "base",
        "warm_starts": [],
        "space": {"dare_ties": {"density": {"low": 0.2, "high": 0.8}, "weight": {"low": 0.2, "high": 1.0}}},
        "evaluation": {"tasks": ["tiny_addition"], "fidelity": [8], "select_limit": 8, "test_limit": 8},
        "study": {"sampler": "tpe", "trials": 2, "select_top": 2},
    }
    results = []
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        monkeypatch.chdir(folder)
        path = write_experiment(folder, **dare)
        assert main(["run", str(path), "--seed", "7"]) == 0
        results.append([(t.params, t.value, t.user_attrs["seed"]) for t in study_in(folder).trials])
    assert results[0] == results[1]
    assert main(["export", str(path), "--out", str(tmp_path / "b" / "export")]) == 0
    scores = yaml.safe_load((tmp_path / "b" / "export" / "scores.json").read_text())
    # DARE draws random masks: the export rebuilt them from the trial's seed and matched its search score
    assert scores["search_objective_reproduced"] == study_in(tmp_path / "b").trials[scores["trial"]].value


@pytest.mark.slow
def test_the_last_process_to_stop_records_every_finished_trial_once(pico_zoo, tmp_path):
    import json

    path = write_experiment(tmp_path, study={"sampler": "random", "trials": 6})
    command = [sys.executable, "-m", "search.cli"]
    # `run` stops at 2 finished trials while the workers go on to 6: a worker must record the study
    run = subprocess.Popen(
        [*command, "run", str(path), "--trials", "2"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        try:
            study_in(tmp_path)
            break
        except (KeyError, FileNotFoundError, ValueError):
            time.sleep(0.2)
    workers = [
        subprocess.Popen(
            [*command, "worker", str(path), "--trials", "6"],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in [run, *workers]:  # communicate: a full stderr pipe must not block a process
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors[-2000:]
    finished = [
        t.number for t in study_in(tmp_path).get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    ]
    client, runs = runs_in(tmp_path)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0].info.run_id
    table = json.loads(Path(client.download_artifacts(parent, "leaderboard.json")).read_text())
    column = table["columns"].index("trial")
    recorded = [row[column] for row in table["data"] if row[table["columns"].index("state")] != "BASELINE"]
    assert len(finished) >= 6 and sorted(recorded) == sorted(finished)


def test_each_fidelity_rung_is_logged_at_its_number_of_items(pico_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(
        tmp_path,
        evaluation={"tasks": ["tiny_gsm8k"], "fidelity": [4, 8], "select_limit": 8, "test_limit": 8},
        study={"sampler": "random", "trials": 1},
    )
    assert main(["run", str(path)]) == 0
    client, runs = runs_in(tmp_path)
    trial_run = [r for r in runs if "soupsearch.trial" in r.data.tags][0].info.run_id
    assert [m.step for m in client.get_metric_history(trial_run, "search/objective")] == [4, 8]


def test_halving_prunes_below_the_top_rung_only_so_every_full_evaluation_completes(pico_zoo, tmp_path, monkeypatch):
    """Successive halving (reduction factor 4) has a rung at step 32 = 8 x 4 too: there it would rank
    each fully scored trial against the others and keep only the top quarter (the best, at first)."""
    monkeypatch.chdir(tmp_path)
    path = write_experiment(
        tmp_path,
        evaluation={"tasks": ["tiny_addition", "tiny_gsm8k"], "fidelity": [8, 32], "select_limit": 8, "test_limit": 8},
        study={"sampler": "random", "pruner": "successive_halving", "trials": 12},
    )
    assert main(["run", str(path)]) == 0
    trials = study_in(tmp_path).get_trials(deepcopy=False)
    reached = {(t.state, t.user_attrs["fidelity"]) for t in trials}
    assert (TrialState.PRUNED, 32) not in reached and (TrialState.COMPLETE, 32) in reached
    assert (TrialState.PRUNED, 8) in reached  # halving still prunes at the lower rung
    assert sum(t.state == TrialState.COMPLETE for t in trials) == sum(t.user_attrs["fidelity"] == 32 for t in trials)


def test_status_and_recovery_call_a_trial_of_a_dead_process_or_of_no_process_interrupted(tmp_path, monkeypatch, capsys):
    from datetime import timedelta

    import optuna

    from search import storage as storage_module
    from search.experiment import load_experiment
    from search.storage import recover_interrupted
    from search.study import Settings, open_study

    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path)
    experiment = load_experiment(path)
    study = open_study(experiment, Settings.of(experiment))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask({"slerp/t/self_attn/0": optuna.distributions.FloatDistribution(0, 1)})
    orphan.set_user_attr("owner", f"{socket.gethostname()}:{dead.pid}")
    orphan.set_user_attr("seed", 5)
    alive = study.ask()
    alive.set_user_attr("owner", f"{socket.gethostname()}:{os.getpid()}")
    unnamed = study.ask()
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"interrupted: trial {orphan.number} on" in out and f"running: trial {alive.number} on" in out
    assert f"running: trial {unnamed.number} on ?" in out  # still within the grace period
    assert recover_interrupted(study, None) == [orphan.number]
    monkeypatch.setattr(storage_module, "OWNERLESS_GRACE", timedelta(0))
    assert recover_interrupted(study, None) == [unnamed.number]
    retries = {t.user_attrs["retry_of"]: t for t in study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}
    assert retries[orphan.number].user_attrs["seed"] == 5 and "seed" not in retries[unnamed.number].user_attrs


def test_a_trial_whose_process_dies_while_run_works_is_failed_between_trials_and_rerun_while_trials_are_needed(
    pico_zoo, tmp_path, monkeypatch
):
    """Another process on this host dies mid-trial (a worker, killed): `run` fails its trial after its
    own trial and re-runs it with its parameters; one that dies during the last trial is failed and
    not re-run, so nothing is left RUNNING or queued once the study has its trials."""
    import optuna

    from search import study as study_module

    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphans, calls = [], []
    evaluate = study_module.TrialRunner._evaluate

    def with_a_dying_neighbour(self, trial, run, seed):
        calls.append(trial.number)
        if len(calls) in (1, 3):  # during the first trial and during the last
            orphan = trial.study.ask({"slerp/t/self_attn/0": optuna.distributions.FloatDistribution(0, 1)})
            orphan.set_user_attr("owner", f"{socket.gethostname()}:{dead.pid}")
            orphans.append((orphan.number, orphan.params["slerp/t/self_attn/0"]))
        return evaluate(self, trial, run, seed)

    monkeypatch.setattr(study_module.TrialRunner, "_evaluate", with_a_dying_neighbour)
    path = write_experiment(tmp_path, study={"sampler": "random", "trials": 3})
    assert main(["run", str(path)]) == 0

    trials = study_in(tmp_path).get_trials(deepcopy=False)
    (first, first_t), (last, _) = orphans
    assert sorted(t.number for t in trials if t.state == TrialState.FAIL) == [first, last]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    rerun = [t for t in trials if t.user_attrs.get("retry_of") == first]
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE
    assert rerun[0].params["slerp/t/self_attn/0"] == first_t
    assert rerun[0].number == calls[1]  # the re-run is the next trial this process runs
    assert not [t for t in trials if t.user_attrs.get("retry_of") == last]
    assert len({tuple(sorted(t.params.items())) for t in trials if t.state == TrialState.COMPLETE}) == 3
    notes = {row["trial"]: row["note"] for row in leaderboard(study_in(tmp_path))}
    assert notes[first] == f"interrupted: {socket.gethostname()}:{dead.pid} ended mid-trial; re-run as trial {calls[1]}"
    assert notes[last].endswith("ended mid-trial; not re-run: trials reached")
    client, runs = runs_in(tmp_path)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.info.status == "FINISHED"  # recorded: nothing left running


def test_a_pid_is_judged_only_in_its_own_machine_and_pid_namespace(tmp_path, monkeypatch):
    """Machines and containers can share a hostname: a PID that is gone here says nothing of a
    process in another PID namespace or on another boot, so its trial is left to heartbeats."""
    from search.experiment import load_experiment
    from search.storage import interrupted, pid_space
    from search.study import Settings, open_study

    monkeypatch.chdir(tmp_path)
    experiment = load_experiment(write_experiment(tmp_path))
    study = open_study(experiment, Settings.of(experiment))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here, elsewhere, unsaid = study.ask(), study.ask(), study.ask()
    for trial in (here, elsewhere, unsaid):
        trial.set_user_attr("owner", f"{socket.gethostname()}:{dead.pid}")
    here.set_user_attr("pid_space", pid_space())
    elsewhere.set_user_attr("pid_space", "another-boot/pid:[4026531836]")
    assert pid_space().count("/") == 1  # this test runs on Linux, where /proc says both
    judged = {t.number: interrupted(t) for t in study.get_trials(deepcopy=False)}
    assert judged == {here.number: True, elsewhere.number: False, unsaid.number: True}
