"""evals: in-memory scores against lm-eval's own CLI, weight swaps, splits, failures, statistics."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evals import lm_eval_patches
from evals.harness import Evaluator, TaskError, load_model
from evals.objectives import Objective
from evals.results import EvaluationFailed
from evals.spec import TaskSpec
from evals.tasks import include_path, load_items
from search.cli import main

LM_EVAL = str(Path(sys.executable).parent / "lm_eval")
ARITHMETIC = ["tiny_addition", "tiny_subtraction"]


def test_lm_eval_is_the_version_its_patches_were_checked_against():
    """A new lm-eval means re-reading every internal that evals.lm_eval_patches touches."""
    from importlib.metadata import version

    assert version("lm_eval") == lm_eval_patches.CHECKED


@pytest.fixture(scope="module")
def gsm8k_copy(tmp_path_factory):
    """A small local GSM8K in openai/gsm8k's schema (question, answer ending '#### N'), as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("gsm8k")
    items = [{"question": i["question"], "answer": i["answer"]} for i in load_items("tiny_gsm8k")]
    for split, rows in {"train": items[:20], "test": items[20:50]}.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
    return {split: folder / f"{split}-00000-of-00001.parquet" for split in ("train", "test")}


@pytest.fixture(scope="module")
def addition(pico_zoo):
    """One Evaluator on the base model; tests that swap weights restore the base before returning."""
    model, tokenizer = load_model(pico_zoo / "base")
    return Evaluator(model, tokenizer, ARITHMETIC)


def _swap(evaluator, state):
    with torch.no_grad():
        evaluator.lm.model.load_state_dict(state)


@pytest.mark.slow
def test_soupsearch_eval_equals_lm_eval_cli_on_the_same_items(pico_zoo, gsm8k_copy, tmp_path):
    model_dir = pico_zoo / "specialist-gsm8k"
    ours = tmp_path / "ours.json"
    data = [f"--data=gsm8k:{split}={path}" for split, path in gsm8k_copy.items()]
    argv = [
        "eval",
        str(model_dir),
        "--tasks",
        "tiny_subtraction,tiny_gsm8k,gsm8k",
        *data,
        "--limit",
        "100",
        "--gen-kwargs",
        "max_gen_toks=32",
        "--json",
        str(ours),
    ]
    assert main(argv) == 0
    record = json.loads(ours.read_text())

    # lm-eval's CLI on the same saved model and doc ids; gsm8k from a YAML over the same parquet files.
    tasks_dir = shutil.copytree(include_path(), tmp_path / "tasks")
    gsm8k_yaml = Path(sys.modules["lm_eval"].__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    (tasks_dir / "gsm8k_local.yaml").write_text(
        f"include: {gsm8k_yaml}\ntask: gsm8k\ndataset_path: parquet\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {gsm8k_copy['train']}\n    test: {gsm8k_copy['test']}\n"
    )
    samples = {task: r["doc_ids"] for task, r in record["tasks"].items()}
    subprocess.run(
        [
            LM_EVAL,
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_dir}",
            "--tasks",
            ",".join(samples),
            "--include_path",
            str(tasks_dir),
            "--samples",
            json.dumps(samples),
            "--batch_size",
            str(record["batch_size"]),
            "--gen_kwargs",
            "max_gen_toks=32",
            "--output_path",
            str(tmp_path / "cli"),
            "--log_samples",
        ],
        check=True,
        capture_output=True,
    )
    results = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]
    for task, ours_task in record["tasks"].items():
        assert ours_task["mean"] == pytest.approx(results[task]["exact_match,strict-match"], abs=1e-12)
        logged = next((tmp_path / "cli").rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        cli_items = {s["doc_id"]: s["exact_match"] for s in map(json.loads, logged) if s["filter"] == "strict-match"}
        assert {d: cli_items[d] for d in ours_task["doc_ids"]} == dict(zip(ours_task["doc_ids"], ours_task["per_item"]))
    assert len(record["tasks"]["gsm8k"]["doc_ids"]) == 10  # the whole test split of the 30-item local copy
    assert sum(sum(r["per_item"]) for r in record["tasks"].values()) > 0  # some right answers among the compared


def test_a_then_b_then_a_is_identical_without_reloading_anything(pico_zoo, addition, monkeypatch):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    built = {"managers": 0, "prompts": 0, "probes": 0}
    count = lambda key, original: lambda *a, **k: (built.__setitem__(key, built[key] + 1), original(*a, **k))[1]
    monkeypatch.setattr(TaskManager, "__init__", count("managers", TaskManager.__init__))
    monkeypatch.setattr(ConfigurableTask, "build_all_requests", count("prompts", ConfigurableTask.build_all_requests))
    monkeypatch.setattr(addition.lm, "_detect_batch_size", count("probes", addition.lm._detect_batch_size))

    to_build = sum((task, "search") not in addition._prompts for task in ARITHMETIC)
    to_probe = int(addition.batch_size is None and addition.lm.device.type != "cpu")  # the CPU takes the largest batch
    base = load_file(pico_zoo / "base" / "model.safetensors")
    specialist = load_file(pico_zoo / "specialist-subtraction" / "model.safetensors")
    first = addition.score("search")
    _swap(addition, specialist)
    other = addition.score("search")
    _swap(addition, base)
    again = addition.score("search")
    for task in ARITHMETIC:
        assert again[task].per_item == first[task].per_item
        assert again[task].doc_ids == first[task].doc_ids == list(addition.splits[task].search)
    assert any(other[t].per_item != first[t].per_item for t in ARITHMETIC)  # the swap took effect
    assert built == {"managers": 0, "prompts": to_build, "probes": to_probe}


def test_fidelity_levels_are_nested_item_by_item(addition):
    half, full = addition.score("search", fidelity=0.25), addition.score("search", fidelity=0.5)
    for task in ARITHMETIC:
        n = len(addition.splits[task].search)
        assert len(half[task].doc_ids) == round(0.25 * n) and len(full[task].doc_ids) == round(0.5 * n)
        assert full[task].doc_ids[: len(half[task].doc_ids)] == half[task].doc_ids
        assert full[task].per_item[: len(half[task].per_item)] == half[task].per_item  # same prompts, same answers


def test_a_higher_rung_scores_only_its_new_items(addition):
    low = addition.score("search", limit=24)
    more = addition.score("search", limit=60, skip=24)
    joined, whole = low.extended(more), addition.score("search", limit=60)
    for task in ARITHMETIC:
        assert more[task].doc_ids == whole[task].doc_ids[24:]
        assert joined[task].doc_ids == whole[task].doc_ids and joined[task].per_item == whole[task].per_item
        assert (joined[task].mean, joined[task].ci_low, joined[task].ci_high) == (
            whole[task].mean,
            whole[task].ci_low,
            whole[task].ci_high,
        )
    assert joined.seconds == low.seconds + more.seconds


def test_only_the_reported_filter_runs_and_it_scores_as_lm_eval_does(pico_zoo):
    """The Evaluator drops unreported filters and metrics; lm-eval itself, on a task loaded afresh
    with all of them, gives the same per-item scores for the one reported."""
    from lm_eval.evaluator import evaluate

    from evals.harness import load_tasks

    model, tokenizer = load_model(pico_zoo / "specialist-addition")
    evaluator = Evaluator(model, tokenizer, [TaskSpec(task="tiny_addition", metric="exact_match,flexible-extract")])
    task = evaluator.tasks["tiny_addition"]
    assert [f.name for f in task._filters] == ["flexible-extract"] and list(task._metric_fn_list) == ["exact_match"]
    ours = evaluator.score("select", limit=80)["tiny_addition"]

    fresh = load_tasks([TaskSpec(task="tiny_addition")])["tiny_addition"]
    assert [f.name for f in fresh._filters] == ["strict-match", "flexible-extract"]
    results = evaluate(
        evaluator.lm,
        {"tasks": {"tiny_addition": fresh}, "groups": {}, "group_map": {}},
        samples={"tiny_addition": sorted(ours.doc_ids)},
        bootstrap_iters=0,
        log_samples=True,
    )
    theirs = {
        s["doc_id"]: s["exact_match"] for s in results["samples"]["tiny_addition"] if s["filter"] == "flexible-extract"
    }
    assert [theirs[d] for d in ours.doc_ids] == ours.per_item
    assert sum(ours.per_item) > 0  # some right answers among the compared


def test_hub_task_splits_its_evaluation_split_disjointly_and_stably(pico_zoo, gsm8k_copy):
    model, tokenizer = load_model(pico_zoo / "base")
    spec = {"task": "gsm8k", "data_files": {k: str(v) for k, v in gsm8k_copy.items()}, "num_fewshot": 1}
    first = Evaluator(model, tokenizer, [spec]).splits["gsm8k"]
    again = Evaluator(model, tokenizer, [spec]).splits["gsm8k"]
    assert first == again
    parts = [set(first.ids(s)) for s in ("search", "select", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 30  # the test file's 30 rows, each once
    assert first.record()["procedure"] == "seeded-shuffle-v1"


def test_failures_are_recorded_and_the_next_evaluation_is_clean(pico_zoo, addition, monkeypatch):
    base = load_file(pico_zoo / "base" / "model.safetensors")
    before = addition.score("select", limit=10)

    poisoned = dict(base, **{"model.norm.weight": torch.full_like(base["model.norm.weight"], math.nan)})
    _swap(addition, poisoned)
    nan = addition.score("select", limit=10)
    assert not nan.ok and "non-finite weights in model.norm.weight" in nan.error
    with pytest.raises(EvaluationFailed, match="non-finite"):
        nan["tiny_addition"]

    _swap(addition, base)

    def out_of_memory(requests):
        raise RuntimeError("CUDA out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(addition.lm, "generate_until", out_of_memory)
        oom = addition.score("select", limit=10)
    assert oom.error == "RuntimeError: CUDA out of memory"
    assert addition.score("select", limit=10)["tiny_addition"].per_item == before["tiny_addition"].per_item


def test_a_model_with_no_parsable_answer_scores_zero(pico_zoo, addition):
    base = load_file(pico_zoo / "base" / "model.safetensors")
    _swap(addition, {name: torch.zeros_like(t) for name, t in base.items()})  # emits token 0 forever
    try:
        result = addition.score("select", limit=10)
    finally:
        _swap(addition, base)
    assert result.ok and all(result[t].per_item == [0.0] * 10 for t in ARITHMETIC)


def test_metric_names_are_accepted_by_mlflow(addition):
    from mlflow.utils.validation import _validate_metric_name

    metrics = addition.score("select", limit=5).metrics()
    assert "tiny_addition/exact_match_strict-match" in metrics
    for name in metrics:
        _validate_metric_name(name)


def test_objectives_weight_task_means(addition):
    scores = addition.score("select", limit=20)
    a, s = scores["tiny_addition"].mean, scores["tiny_subtraction"].mean
    assert Objective(weights={"tiny_addition": 3, "tiny_subtraction": 1})(scores) == pytest.approx((3 * a + s) / 4)
    with pytest.raises(ValueError, match="positive sum"):
        Objective(weights={"tiny_addition": 0})


def test_task_problems_are_named_with_the_fix(pico_zoo, gsm8k_copy, tmp_path, capsys):
    model_dir = str(pico_zoo / "base")
    assert main(["eval", model_dir, "--tasks", "tiny_nonsense"]) == 2
    assert "'tiny_nonsense' is unknown to lm-eval" in capsys.readouterr().err
    assert main(["eval", model_dir, "--tasks", "gsm8k"]) == 2
    assert "--data gsm8k:test=FILE" in capsys.readouterr().err
    assert main(["eval", model_dir, "--tasks", "gsm8k", f"--data=gsm8k:test={gsm8k_copy['test']}"]) == 2
    assert "reads split 'train'" in capsys.readouterr().err
    assert main(["eval", model_dir, "--tasks", "gsm8k", f"--data=gsm8k:test={tmp_path / 'no.parquet'}"]) == 2
    assert "no.parquet" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "tiny_addition"]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(TaskError, match="no chat template"):
        Evaluator(*load_model(pico_zoo / "base"), [TaskSpec(task="tiny_addition", chat_template=True)])
