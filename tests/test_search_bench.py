"""benchmarks/search_bench.py --quick: every arm runs through `soupsearch run`'s loop on the pico
zoo, and the report's budgets, curves and targets follow from the studies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import search_bench  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search-bench")
    out, workdir = folder / "search.md", folder / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "search_bench.py"), "--quick", "--out", str(out)]
    done = subprocess.run([*command, "--workdir", str(workdir)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, workdir, json.loads((workdir / "rows.json").read_text())


def test_cma_es_scores_every_trial_on_all_search_items_and_sets_the_budget(quick):
    _, _, rows = quick
    scale = search_bench.QUICK
    for name, tasks in (("slerp", 2), ("ties", 3)):
        arms = rows[0]["experiments"][name]["arms"]
        assert arms["cma-es"]["trials"] == scale.trials
        assert arms["cma-es"]["items"] == scale.trials * scale.rungs[-1] * tasks
        for arm in set(search_bench.SEARCH_ARMS) - {"cma-es"}:  # they run until they spent at least as many items
            assert arms[arm]["items"] >= arms["cma-es"]["items"]
        assert arms["seed config"]["items"] == scale.rungs[-1] * tasks


def test_an_anytime_curve_counts_items_trial_by_trial_and_its_target_is_cma_es_final_select(quick):
    _, _, rows = quick
    for experiment in rows[0]["experiments"].values():
        assert experiment["target"] == experiment["arms"]["cma-es"]["curve"][-1]["select"]
        for arm in search_bench.SEARCH_ARMS:
            curve = experiment["arms"][arm]["curve"]
            items = [point["items"] for point in curve]
            assert items == sorted(set(items)) and items[-1] == experiment["arms"][arm]["items"]
            # the incumbent changes only to a trial that started later
            trials = [point["trial"] for point in curve]
            assert trials == sorted(trials)


def test_items_to_target_is_the_first_point_at_or_above_the_target():
    experiment = {
        "target": 0.5,
        "arms": {
            "a": {"curve": [{"items": 10, "select": 0.2}, {"items": 30, "select": 0.5}, {"items": 50, "select": 0.7}]},
            "b": {"curve": [{"items": 10, "select": 0.4}]},
            "seed config": {"items": 64, "select": 0.6},
        },
    }
    assert search_bench._items_to_target(experiment, "a") == 30
    assert search_bench._items_to_target(experiment, "b") is None
    assert search_bench._items_to_target(experiment, "seed config") == 64
    assert search_bench._median([30, None, 10]) == 30 and search_bench._median([None, None, 10]) is None


def test_the_report_has_the_tables_and_the_curves_also_in_each_arm_mlflow_run(quick):
    out, workdir, rows = quick
    text = out.read_text()
    for name in search_bench.EXPERIMENTS:
        png = out.with_name(f"search-{name}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![anytime curves]({png.name})" in text
        for arm in search_bench.SEARCH_ARMS:
            run = rows[0]["experiments"][name]["arms"][arm]["mlflow_run"]
            client = mlflow.MlflowClient(f"sqlite:///{workdir / f'{name}-seed0' / 'mlflow.db'}")
            assert png.name in [a.path for a in client.list_artifacts(run)]
    for arm in search_bench.ALL_ARMS:
        assert text.count(f"\n| {arm} |") == (4 if arm in search_bench.ITEMS_ARMS else 2)
