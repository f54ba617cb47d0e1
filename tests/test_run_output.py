"""`soupsearch run` as a user runs it, its output piped to a log: one plain line per event and no
library noise; an idle run and `status` that answer without loading a model or MLflow; and MLflow
records that open on the runs table, with their artifacts beside the store."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.search_helpers import runs_in, study_in, write_experiment

SOUPSEARCH = str(Path(sys.executable).parent / "soupsearch")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
EVENT = re.compile(
    r"baselines [1-6]/6: parent (general|math) on (search|select|test): \d\.\d{4}"
    r"|building each method once before the first trial .*"
    r"|trials [1-3]/3: trial \d (COMPLETE|PRUNED) \d\.\d{4} on [48] items "
    r"\(merge \d+\.\d\d s, eval \d+\.\d\d s\); best \d\.\d{4}"
)
MODEL_LIBRARIES = ("torch", "transformers", "mergekit", "lm_eval", "mlflow")


@pytest.fixture(scope="module")
def finished(pico_zoo, tmp_path_factory):
    """A pico study that `soupsearch run` took to its end: its folder, experiment file and output."""
    folder = tmp_path_factory.mktemp("study")
    path = write_experiment(
        folder,
        evaluation={"tasks": ["tiny_addition"], "fidelity": [4, 8], "select_limit": 8, "test_limit": 8},
        study={"sampler": "tpe", "pruner": "successive_halving", "trials": 3},
    )
    done = subprocess.run(
        [SOUPSEARCH, "run", str(path)], cwd=folder, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, path, done


def _soupsearch(folder: Path, *argv: str) -> tuple[list[str], str, str]:
    """A command in a fresh interpreter: the model libraries it imported, its stdout and its stderr."""
    probe = (
        f"import json, sys; from search.cli import main; code = main({list(argv)!r}); "
        f"print(json.dumps([m for m in {MODEL_LIBRARIES!r} if m in sys.modules])); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=folder, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed, _, loaded = done.stdout.rstrip("\n").rpartition("\n")
    return json.loads(loaded), printed + "\n", done.stderr


def test_run_output_is_one_plain_line_per_event_with_no_library_logs_or_bars(finished):
    _, _, done = finished
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr  # no bar redrawn in place: the output is not a terminal
    assert [line for line in lines if not EVENT.fullmatch(line)] == []  # MLflow's INFO, datasets' bars, warnings
    assert sum(line.startswith("baselines ") for line in lines) == 6
    assert [line.split(":")[0] for line in lines if line.startswith("trials ")] == [f"trials {n}/3" for n in (1, 2, 3)]
    assert done.stdout.startswith("study pico-slerp: ") and "BASELINE" in done.stdout


def test_idle_run_and_status_print_the_leaderboard_without_loading_models_or_mlflow(finished):
    folder, path, done = finished
    loaded, printed, said = _soupsearch(folder, "run", str(path))
    assert loaded == []
    assert said == "study pico-slerp: 3 trials reached and parents scored; nothing to run\n"
    assert printed == done.stdout
    loaded, printed, said = _soupsearch(folder, "status", str(path), "--quiet")
    assert loaded == [] and said == "" and printed == done.stdout


def test_validate_without_load_leaves_the_model_libraries_unloaded(finished):
    folder, path, _ = finished
    loaded, printed, _ = _soupsearch(folder, "validate", str(path))
    assert loaded == ["lm_eval"]  # its task index names the tasks; no torch, which the zoo's trainer imports
    assert "2 sample config(s) built: slerp (midpoint), warm_starts[0]" in printed


def test_experiment_opens_on_the_runs_table_and_keeps_its_artifacts_beside_the_store(finished):
    folder, _, _ = finished
    client, runs = runs_in(folder)
    experiment = client.get_experiment_by_name("pico-slerp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.soupsearch"])
    assert view == {
        "selectedColumns": [
            "metrics.`search/objective`",
            "metrics.`fidelity`",
            "params.`method`",
            "tags.`soupsearch.state`",
        ],
        "orderByKey": "metrics.`search/objective`",
        "orderByAsc": False,
    }
    artifacts = folder / "mlartifacts" / "pico-slerp"
    assert Path(experiment.artifact_location.removeprefix("file://")) == artifacts
    assert not (folder / "mlruns").exists()
    states = {t.number: t.state.name for t in study_in(folder).get_trials(deepcopy=False)}
    trials = [r for r in runs if "soupsearch.trial" in r.data.tags]
    assert {r.info.run_name: r.data.tags["soupsearch.state"] for r in trials} == {
        f"trial-{n}": state for n, state in states.items()
    }
    assert set(states.values()) <= {TrialState.COMPLETE.name, TrialState.PRUNED.name}
    for run in trials:  # every column of the view, and the trial's config beside the store
        assert {"search/objective", "fidelity"} <= set(run.data.metrics) and run.data.params["method"] == "slerp"
        assert (artifacts / run.info.run_id / "artifacts" / "config.yaml").is_file()
    parents = [r for r in runs if "soupsearch.baseline" in r.data.tags]
    assert [(r.data.tags["soupsearch.state"], r.data.metrics["fidelity"]) for r in parents] == [("BASELINE", 8)] * 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_dashboard_shows_the_parent_and_every_trial_in_a_browser(finished, tmp_path):
    folder, _, _ = finished
    screenshot = tmp_path / "dashboard.png"
    check = subprocess.run(
        [sys.executable, "benchmarks/dashboard_check.py", "--folder", str(folder), "--screenshot", str(screenshot)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert check.returncode == 0, check.stdout + check.stderr[-3000:]
    assert "runs table lists baseline-general, baseline-math, pico-slerp, trial-0, trial-1, trial-2" in check.stdout
    assert screenshot.read_bytes().startswith(b"\x89PNG")
