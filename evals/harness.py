"""Score a resident model with lm-eval on fixed item subsets, keeping per-item results.

The model is wrapped in lm-eval's HFLM once and the tasks are loaded once; each call to
``score`` goes through ``lm_eval.evaluator.evaluate`` with ``samples=`` (the cheap path, see
ANCHORS.md), so weights swapped in place between calls are picked up without any reload.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evals.splits import ItemSplits, split_items
from evals.stats import mean_ci
from evals.tasks import BUNDLED_TASKS, include_path

FEWSHOT_SEED = 1234  # lm-eval's simple_evaluate default for the few-shot sampler
DEFAULT_FILTER = "strict-match"


def safe_metric_name(name: str) -> str:
    """``exact_match,strict-match`` -> ``exact_match_strict-match``: MLflow rejects commas."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


@dataclass
class TaskScore:
    task: str
    split: str
    metric: str
    doc_ids: list[int]
    per_item: list[float]
    mean: float = field(init=False)
    ci_low: float = field(init=False)
    ci_high: float = field(init=False)

    def __post_init__(self) -> None:
        self.mean, self.ci_low, self.ci_high = mean_ci(self.per_item)


class UnknownTaskError(ValueError):
    pass


class Evaluator:
    """One HFLM around one resident model, re-scored as often as its weights change."""

    def __init__(
        self,
        model,
        tokenizer,
        tasks: Sequence[str],
        *,
        batch_size: int = 64,
        split_seed: int = 0,
        metric: str = "exact_match",
        filter_name: str = DEFAULT_FILTER,
    ) -> None:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        needs_defaults = any(t not in BUNDLED_TASKS for t in tasks)
        manager = TaskManager(include_path=str(include_path()), include_defaults=needs_defaults)
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise UnknownTaskError(f"unknown task(s): {', '.join(missing)}")
        self.tasks = manager.load(list(tasks))["tasks"]
        for task in self.tasks.values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        self.metric_key = f"{metric},{filter_name}"
        self.metric, self.filter_name = metric, filter_name
        self.splits: dict[str, ItemSplits] = {
            name: split_items(name, len(task.eval_docs), split_seed) for name, task in self.tasks.items()
        }

    def score(
        self, split: str = "test", limit: int | None = None, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskScore]:
        """Each task's metric on one split's items (the first ``limit`` of them if given)."""
        from lm_eval.evaluator import evaluate

        chosen = {name: self.tasks[name] for name in (tasks or self.tasks)}
        ids = {name: self.splits[name].ids(split)[:limit] for name in chosen}
        results = evaluate(
            self.lm,
            {"tasks": chosen, "groups": {}, "group_map": {}},
            samples=ids,
            bootstrap_iters=0,
            log_samples=True,
            verbosity="ERROR",
        )
        scores = {}
        for name in chosen:
            by_doc = {
                s["doc_id"]: float(s[self.metric])
                for s in results["samples"][name]
                if s.get("filter") == self.filter_name
            }
            doc_ids = sorted(by_doc)
            scores[name] = TaskScore(name, split, self.metric_key, doc_ids, [by_doc[d] for d in doc_ids])
        return scores


def load_model(model_dir: Path, device: str = "cpu"):
    """A saved HF model folder and its tokenizer, ready for an Evaluator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)
