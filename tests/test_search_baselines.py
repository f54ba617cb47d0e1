"""Parents as baselines on the pico zoo: built bit for bit, scored once on the trials' own items,
listed beside the trials, and the exported winner judged against the best of them."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from evals.stats import stratified_paired_bootstrap
from search.cli import main
from search.experiment import Experiment
from search.leaderboard import leaderboard
from search.soup import soup_config
from search.verdict import ITERS
from search.workbench import Workbench
from tests.search_helpers import PICO_SLERP, runs_in, study_in, write_experiment

TASK = "tiny_gsm8k"
KEY = "tiny_gsm8k/exact_match_strict-match"


def test_a_parent_alone_is_built_bit_for_bit(pico_zoo):
    """A baseline's merge config, a soup of the parent alone, gives the parent's own weights."""
    experiment = Experiment.model_validate(PICO_SLERP)
    bench = Workbench(experiment, "cpu")
    weights = {alias: load_file(Path(folder) / "model.safetensors") for alias, folder in bench.refs.items()}
    assert any(not weights["general"][name].equal(weights["math"][name]) for name in weights["general"])
    for alias in bench.refs:
        bench.build(soup_config(experiment, bench.refs, [alias]), seed=0)
        built = bench.engine.candidate.tensors
        assert built.keys() == weights[alias].keys()
        for name, tensor in weights[alias].items():
            assert built[name].dtype == tensor.dtype and built[name].equal(tensor), (alias, name)


def _artifact(client, run_id: str, path: str) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path)).read_text())


def _baseline_runs(folder: Path) -> dict:
    _, runs = runs_in(folder)
    return {r.data.tags["soupsearch.baseline"]: r for r in runs if "soupsearch.baseline" in r.data.tags}


def test_parents_are_scored_once_beside_the_trials_and_export_judges_the_winner(
    pico_zoo, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    # two rungs: a parent's search score is its top-rung score, on the items every finished trial scores
    path = write_experiment(
        tmp_path,
        evaluation={"tasks": [TASK], "fidelity": [4, 8], "select_limit": 8, "test_limit": 8},
        study={"sampler": "tpe", "trials": 2},
    )
    assert main(["run", str(path)]) == 0
    printed, progress = capsys.readouterr()
    assert "baselines" in progress  # their progress bar
    study = study_in(tmp_path)
    client, runs = runs_in(tmp_path)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags).info.run_id
    trial = next(r for r in runs if "soupsearch.trial" in r.data.tags)
    trial_items = _artifact(client, trial.info.run_id, "per_item.json")["tasks"][TASK]
    baselines = _baseline_runs(tmp_path)
    assert sorted(baselines) == ["general", "math"]
    rows = {row["trial"]: row for row in leaderboard(study)}
    summary = [line.split() for line in printed.splitlines()]
    for alias, run in baselines.items():
        assert run.info.run_name == f"baseline-{alias}" and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
        for split in ("search", "select", "test"):
            items = _artifact(client, run.info.run_id, f"per_item/{split}.json")["tasks"][TASK]
            mean = sum(items["per_item"]) / 8
            assert len(items["per_item"]) == 8
            assert run.data.metrics[f"{split}/objective"] == pytest.approx(mean) == run.data.metrics[f"{split}/{KEY}"]
            kept = study.user_attrs[f"baseline/{alias}/{split}"]["result"]["tasks"][TASK]
            assert (kept["doc_ids"], kept["per_item"]) == (items["doc_ids"], items["per_item"])
        search = _artifact(client, run.info.run_id, "per_item/search.json")["tasks"][TASK]
        assert search["doc_ids"] == trial_items["doc_ids"]  # exactly the trials' items
        assert rows[alias]["state"] == "BASELINE" and rows[alias]["value"] == pytest.approx(sum(search["per_item"]) / 8)
        assert [alias, "BASELINE", f"{rows[alias]['value']:.4f}"] in [line[:3] for line in summary]
    table = _artifact(client, parent, "leaderboard.json")  # pandas' "split" layout
    recorded = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted((r["trial"], r["value"]) for r in recorded if r["state"] == "BASELINE") == sorted(
        (alias, rows[alias]["value"]) for alias in baselines
    )

    # a resumed run reads the parents back from the study: nothing is scored or logged again
    assert main(["run", str(path)]) == 0
    printed, progress = capsys.readouterr()
    assert "baselines" not in progress
    assert [line[:2] for line in summary if "BASELINE" in line] == [
        line.split()[:2] for line in printed.splitlines() if "BASELINE" in line
    ]
    assert main(["status", str(path)]) == 0
    assert sum("BASELINE" in line for line in capsys.readouterr().out.splitlines()) == 2
    assert len(_baseline_runs(tmp_path)) == 2
    assert len(client.get_metric_history(baselines["math"].info.run_id, "test/objective")) == 1

    # the experiment file edited after the run: export refuses it before it scores anything again
    kept = dict(study_in(tmp_path).user_attrs)
    for name, change in (
        ("anchors.yaml", {"space": {"slerp": {"anchors": 3}}, "warm_starts": []}),
        ("rungs.yaml", {"evaluation": {"tasks": [TASK], "fidelity": [4], "select_limit": 8, "test_limit": 8}}),
    ):
        edited = write_experiment(tmp_path, name=name, study={"sampler": "tpe", "trials": 2}, **change)
        assert main(["export", str(edited), "--out", str(tmp_path / "edited")]) == 2
        said = capsys.readouterr().err.strip()
        assert said.startswith(f"soupsearch: error: {edited}: ") and "the experiment file the study ran with" in said
        assert ("slerp/t/" if name == "anchors.yaml" else "evaluation.fidelity") in said
    assert not (tmp_path / "edited").exists() and study_in(tmp_path).user_attrs == kept
    assert len(_baseline_runs(tmp_path)) == 2

    out = tmp_path / "export"
    assert main(["export", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    scores = json.loads((out / "scores.json").read_text())
    verdict, winner = scores["verdict"], f"trial {scores['trial']}"
    assert verdict["winner"]["name"] == winner
    assert printed[0].startswith(f"exported trial {scores['trial']} ") and printed[1:] == verdict["lines"]
    # the best parent is the one with the best select objective (the first listed on a tie)
    select = {alias: baselines[alias].data.metrics["select/objective"] for alias in ("general", "math")}
    assert verdict["best_parent"] == max(select, key=select.get) and verdict["best_parent_chosen_on"] == "select"
    best = baselines[verdict["best_parent"]].info.run_id
    card = (out / "README.md").read_text()
    for split in ("select", "test"):
        ours = _artifact(client, parent, f"export/per_item/{split}.json")["tasks"][TASK]
        theirs = _artifact(client, best, f"per_item/{split}.json")["tasks"][TASK]
        assert ours["doc_ids"] == theirs["doc_ids"]
        reference = stratified_paired_bootstrap(
            {TASK: ours["per_item"]}, {TASK: theirs["per_item"]}, {TASK: 1.0}, ITERS, 0
        )  # the experiment's seed
        said = verdict[split]["objective"]
        assert said["points"] == pytest.approx(100 * (sum(ours["per_item"]) - sum(theirs["per_item"])) / 8)
        assert (said["ci_low"], said["ci_high"]) == (100 * reference.ci_low, 100 * reference.ci_high)
        assert said["beats"] == (said["points"] > 0)
        assert said["ci_excludes_zero"] == (said["ci_low"] > 0 or said["ci_high"] < 0)
        assert f"{winner} {said['sentence']}" in printed
        assert f"- {winner} {said['sentence']}" in card
    assert verdict["test"]["tasks"] == {}  # one task: the objective is that task
    # the winner and every parent on test, as printed
    assert verdict["winner"]["test_objective"] == scores["test_objective"]
    assert verdict["sentence"] == f"{winner} {verdict['test']['objective']['sentence']}"
    for alias, run in baselines.items():
        assert verdict["parents"][alias]["test_objective"] == pytest.approx(run.data.metrics["test/objective"])
        row = next(line.split() for line in printed if line.split()[:1] == [alias])
        assert row[2] == f"{100 * run.data.metrics['test/objective']:.1f}%"
    recorded = client.get_run(parent).data
    assert recorded.tags["soupsearch.best_parent"] == verdict["best_parent"]
    assert recorded.tags["soupsearch.verdict"] == verdict["sentence"]
    assert recorded.metrics["verdict/test/objective/points"] == verdict["test"]["objective"]["points"]
    assert len(_baseline_runs(tmp_path)) == 2  # export read the parents from the study too


def test_the_recorded_leaderboard_lists_each_trial_once_after_resumes(pico_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(
        tmp_path,
        evaluation={"tasks": [TASK], "fidelity": [4], "select_limit": 4, "test_limit": 4},
        study={"sampler": "random", "trials": 1},
    )
    for trials in ("1", "2", "3"):
        assert main(["run", str(path), "--trials", trials]) == 0
    client, runs = runs_in(tmp_path)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags).info.run_id
    table = _artifact(client, parent, "leaderboard.json")
    recorded = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(str(r["trial"]) for r in recorded) == ["0", "1", "2", "general", "math"]


def test_a_run_stopped_between_a_parents_mlflow_log_and_its_study_record_logs_it_again(
    pico_zoo, tmp_path, monkeypatch, capsys
):
    """The two writes of a parent's split: whichever a kill lands between, the resumed run leaves
    every parent's MLflow run FINISHED with every split's metrics and per-item file."""
    from search.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, study={"sampler": "random", "trials": 1})
    log = Tracker.log

    def stopped_at_test_split(self, run, **logged):
        if "per_item/test.json" in logged.get("dicts", {}):
            raise KeyboardInterrupt  # as a Ctrl-C or a kill at this point would
        return log(self, run, **logged)

    monkeypatch.setattr(Tracker, "log", stopped_at_test_split)
    assert main(["run", str(path)]) == 1
    monkeypatch.setattr(Tracker, "log", log)
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    client, _ = runs_in(tmp_path)
    for alias, run in _baseline_runs(tmp_path).items():
        assert run.info.status == "FINISHED", alias
        for split in ("search", "select", "test"):
            assert f"{split}/objective" in run.data.metrics, (alias, split)
            assert _artifact(client, run.info.run_id, f"per_item/{split}.json")["tasks"][TASK]["per_item"]
