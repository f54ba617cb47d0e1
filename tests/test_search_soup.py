"""Greedy soup on the pico zoo: ranked on select, one strict pass, never below the best single model."""

import pytest
from mlflow.tracking import MlflowClient

from search.experiment import Experiment
from search.soup import Souper
from search.study import Settings
from tests.search_helpers import PICO_SLERP

SOUP = {**{k: v for k, v in PICO_SLERP.items() if k not in ("space", "warm_starts", "study")},
        "name": "pico-soup",
        "models": {f"i{i}": f"zoo:pico/ingredient-0{i}" for i in range(4)}, "base_model": "i0",
        "soup": {"ingredients": ["i0", "i1", "i2", "i3"]},
        "evaluation": {"tasks": ["tiny_gsm8k"], "select_limit": 48, "test_limit": 24}}


def test_greedy_soup_follows_the_paper_and_never_ends_below_best_single(pico_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = Experiment.model_validate(SOUP)
    greedy, uniform, single = Souper(experiment, Settings.of(experiment)).run()
    assert greedy.members[0] == single.members[0]  # the soup starts from the best ingredient
    assert greedy.select["tiny_gsm8k"].mean >= single.select["tiny_gsm8k"].mean
    assert uniform.members == ["i0", "i1", "i2", "i3"]
    assert [len(r.test["tiny_gsm8k"].per_item) for r in (greedy, uniform, single)] == [24, 24, 24]

    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pico-soup").experiment_id])
    steps = {r.data.params["soup"]: r.data.metrics for r in runs if "soup" in r.data.params}
    alone = {name: steps[f"ingredient {name}"]["select/objective"] for name in uniform.members}
    assert single.members == [max(alone, key=alone.get)]
    assert steps["ingredient " + single.members[0]]["select/objective"] == pytest.approx(single.select["tiny_gsm8k"].mean)
    # one strict pass: an ingredient joined exactly when its try beat the soup it was tried on
    ranked = sorted(alone, key=lambda n: -alone[n])
    soup_score, members = alone[ranked[0]], [ranked[0]]
    for name in ranked[1:]:
        tried = steps[f"greedy +{name}"]["select/objective"]
        if tried > soup_score:
            soup_score, members = tried, [*members, name]
    assert members == greedy.members
    assert len(runs) == 1 + 2 * 4 + 3
