"""The bundled tasks: committed data, lm-eval loading, and disjoint seeded splits."""

from lm_eval.tasks import TaskManager

from evals.splits import split_items
from evals.tasks import BUNDLED_TASKS, include_path, load_items
from evals.tasks.synthetic import eval_items, training_stream


def test_committed_data_is_the_seeded_generation():
    for task in BUNDLED_TASKS:
        assert load_items(task) == eval_items(task), f"{task}: run evals.tasks.write_data()"


def test_yamls_load_through_lm_eval_task_manager():
    manager = TaskManager(include_path=str(include_path()), include_defaults=False)
    tasks = manager.load(list(BUNDLED_TASKS))["tasks"]
    assert sorted(tasks) == sorted(BUNDLED_TASKS)
    for name, task in tasks.items():
        docs = list(task.eval_docs)
        assert len(docs) == len(load_items(name))
        assert task.doc_to_text(docs[0]) == f"Question: {docs[0]['question']}\nAnswer:"
        assert docs[0]["answer"].split("\n#### ")[-1].lstrip("-").isdigit()
        assert task.config.output_type == "generate_until"
        assert [f["name"] for f in task.config.filter_list] == ["strict-match", "flexible-extract"]


def test_splits_are_disjoint_cover_every_item_and_are_stable():
    for task in BUNDLED_TASKS:
        n = len(load_items(task))
        splits = split_items(task, n, seed=0)
        search, select, test = (set(splits.ids(s)) for s in ("search", "select", "test"))
        assert not (search & select) and not (search & test) and not (select & test)
        assert search | select | test == set(range(n))
        assert len(splits.search) == len(search)  # no repeats in the fixed order
        assert split_items(task, n, seed=0) == splits
        assert split_items(task, n, seed=1).search != splits.search


def test_fidelity_levels_are_nested_prefixes():
    splits = split_items("tiny_addition", 600)
    quarter, half, full = (splits.fidelity(f) for f in (0.25, 0.5, 1.0))
    assert full == list(splits.search)
    assert half[: len(quarter)] == quarter and full[: len(half)] == half


def test_training_streams_share_no_item_with_any_split():
    for task in BUNDLED_TASKS:
        held_out = {item["question"] for item in eval_items(task)}
        stream = training_stream(task, seed=0, exclude=held_out)
        drawn = [next(stream)["question"] for _ in range(3000)]
        assert not held_out.intersection(drawn)
        assert len(set(drawn)) > 500  # a real stream, not one item repeated
