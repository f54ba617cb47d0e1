"""Greedy soup on the pico zoo: ranked on select, one strict pass, never below the best single model,
judged on test against its best ingredient."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from evals.stats import stratified_paired_bootstrap
from search.experiment import Experiment
from search.soup import Souper
from search.study import Settings
from search.verdict import ITERS
from tests.search_helpers import PICO_SLERP

SOUP = {
    **{k: v for k, v in PICO_SLERP.items() if k not in ("space", "warm_starts", "study")},
    "name": "pico-soup",
    "models": {f"i{i}": f"zoo:pico/ingredient-0{i}" for i in range(4)},
    "base_model": "i0",
    "soup": {"ingredients": ["i0", "i1", "i2", "i3"]},
    "evaluation": {"tasks": ["tiny_gsm8k"], "select_limit": 48, "test_limit": 24},
}


def test_greedy_soup_follows_the_paper_and_never_ends_below_best_single(pico_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = Experiment.model_validate(SOUP)
    souper = Souper(experiment, Settings.of(experiment))
    greedy, uniform, single = souper.run()
    assert greedy.members[0] == single.members[0]  # the soup starts from the best ingredient
    assert greedy.select["tiny_gsm8k"].mean >= single.select["tiny_gsm8k"].mean
    assert uniform.members == ["i0", "i1", "i2", "i3"]
    assert [len(r.test["tiny_gsm8k"].per_item) for r in (greedy, uniform, single)] == [24, 24, 24]

    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pico-soup").experiment_id])
    steps = {r.data.params["soup"]: r.data.metrics for r in runs if "soup" in r.data.params}
    alone = {name: steps[f"ingredient {name}"]["select/objective"] for name in uniform.members}
    assert single.members == [max(alone, key=alone.get)]
    assert steps["ingredient " + single.members[0]]["select/objective"] == pytest.approx(
        single.select["tiny_gsm8k"].mean
    )
    # one strict pass: an ingredient joined exactly when its try beat the soup it was tried on
    ranked = sorted(alone, key=lambda n: -alone[n])
    soup_score, members = alone[ranked[0]], [ranked[0]]
    for name in ranked[1:]:
        tried = steps[f"greedy +{name}"]["select/objective"]
        if tried > soup_score:
            soup_score, members = tried, [*members, name]
    assert members == greedy.members
    # 4 alone and 3 greedy tries on select, then the uniform soup; on test both soups and the 4 alone
    assert len(runs) == 1 + 2 * 4 + 2 + 4
    alone_runs = [r for r in runs if "soupsearch.baseline" in r.data.tags]
    assert sorted((r.data.tags["soupsearch.baseline"], r.data.params["split"]) for r in alone_runs) == sorted(
        (name, split) for name in uniform.members for split in ("select", "test")
    )

    # the greedy soup against its best ingredient, chosen on select, recomputed from the per-item scores
    verdict = souper.verdict
    assert verdict.best_parent == single.members[0]
    tests = {r.data.tags["soupsearch.baseline"]: r for r in alone_runs if r.data.params["split"] == "test"}
    theirs = json.loads(
        Path(client.download_artifacts(tests[verdict.best_parent].info.run_id, "per_item.json")).read_text()
    )["tasks"]["tiny_gsm8k"]
    assert theirs["per_item"] == single.test["tiny_gsm8k"].per_item
    ours = greedy.test["tiny_gsm8k"]
    assert ours.doc_ids == theirs["doc_ids"]
    reference = stratified_paired_bootstrap({"t": ours.per_item}, {"t": theirs["per_item"]}, {"t": 1.0}, ITERS, 0)
    test = next(c for c in verdict.comparisons if c.split == "test")
    assert test.points == pytest.approx(100 * (ours.mean - single.test["tiny_gsm8k"].mean))
    assert (test.ci_low, test.ci_high) == (100 * reference.ci_low, 100 * reference.ci_high)
    assert verdict.lines()[-1] == f"greedy soup {test.sentence()}"
    for name, run in tests.items():  # every ingredient's test score is shown beside the soup's
        assert verdict.objectives[name]["test"] == pytest.approx(run.data.metrics["test/objective"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["soupsearch.verdict"] == f"greedy soup {test.sentence()}"
    assert parent.data.tags["soupsearch.best_parent"] == single.members[0]
    assert parent.data.metrics["verdict/test/objective/points"] == test.points
