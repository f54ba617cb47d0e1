"""Score a resident model with lm-eval on fixed item subsets, keeping per-item results.

The model is wrapped in lm-eval's HFLM once, the tasks are loaded once, the batch size is probed
once (on GPUs), and each split's prompts are built once; every ``score`` call then goes through
``lm_eval.evaluator.evaluate`` with ``samples=`` (the cheap path: no per-call seeding, environment
report or hub lookup), so weights swapped in place between calls are picked up without any reload.

lm-eval's ``cache_requests`` is not used: its key ignores ``samples``, so a second item subset
would silently be served the first one's prompts. Prompts are memoized here instead, per task
and split, in the doc order lm-eval itself uses. Every touch of lm-eval's internals is in
``evals.lm_eval_patches``; the result types are in ``evals.results``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import yaml

from evals import lm_eval_patches as patches
from evals.results import EvalResult, TaskScore
from evals.spec import TaskSpec
from evals.splits import ItemSplits, split_items
from evals.tasks import BUNDLED_TASKS, cache_root, include_path
from user_input import UserError

FEWSHOT_SEED = 1234  # lm-eval's simple_evaluate default for the few-shot sampler


class TaskError(UserError):
    """A task that cannot be loaded or scored as asked; the message names it and says what to do."""


@contextlib.contextmanager
def _prompt_errors_named(name: str, task) -> Iterator[None]:
    """lm-eval's failures to build a task's prompts (more few-shot examples than it has, say) as a
    TaskError naming the task and its few-shot count."""
    try:
        yield
    except (ValueError, IndexError, KeyError) as err:
        shots = task.get_config("num_fewshot")
        raise TaskError(
            f"task {name!r} (num_fewshot {shots}): cannot build its prompts: {type(err).__name__}: {err}"
        ) from None


def _local_copy(spec: TaskSpec, manager) -> str:
    """A YAML that includes the task's own and swaps its dataset for the local files."""
    entry = manager.task_index[spec.task]
    if entry.yaml_path is None:
        raise TaskError(f"task {spec.task!r} is not defined by a YAML file, so data_files cannot replace its dataset")
    config = {
        "include": str(entry.yaml_path),
        "task": spec.task,
        "dataset_path": spec.data_format,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in spec.data_files.items()}},
    }
    text = yaml.safe_dump(config, sort_keys=False)
    path = cache_root() / "local-tasks" / hashlib.sha256(text.encode()).hexdigest()[:16] / f"{spec.task}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _offline_hint(spec: TaskSpec, dataset: str) -> str:
    return (
        f"task {spec.task!r}: its dataset {dataset!r} could not be loaded (offline, or not on this machine). "
        f"Supply a local copy in the same schema: data_files: {{test: FILE.parquet, train: FILE.parquet}} in the "
        f"task spec, or on the command line --data {spec.task}:test=FILE --data {spec.task}:train=FILE "
        "(.parquet or .jsonl; train is only needed for few-shot examples)"
    )


def _configure(task, spec: TaskSpec) -> None:
    """Apply the spec's options the way lm-eval's own simple_evaluate applies its flags."""
    name, config = spec.task, task.config
    if spec.data_files and config.test_split not in spec.data_files and config.validation_split not in spec.data_files:
        raise TaskError(
            f"task {name!r}: data_files needs its evaluation split {config.test_split or config.validation_split!r}"
        )
    if spec.num_fewshot is not None:
        task.set_config(key="num_fewshot", value=spec.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    if spec.gen_kwargs:
        if config.output_type != "generate_until":
            raise TaskError(f"task {name!r} is {config.output_type}; gen_kwargs only apply to generate_until tasks")
        task.set_config(key="generation_kwargs", value=dict(spec.gen_kwargs), update=True)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


def _metric_key(task, spec: TaskSpec) -> str:
    """The 'metric,filter' key to report: the spec's, else the task's first metric and filter."""
    metrics = list(task.aggregation())
    filters = patches.filter_names(task)
    key = spec.metric or f"{metrics[0]},{filters[0]}"
    metric, filter_name = key.split(",")
    if metric not in metrics or filter_name not in filters:
        raise TaskError(f"task {spec.task!r} has no metric {key!r}; it has metrics {metrics} and filters {filters}")
    if task.aggregation()[metric].__name__ != "mean":
        raise TaskError(f"task {spec.task!r}: metric {metric!r} is not a mean over items, so it has no per-item score")
    return key


@functools.cache
def task_manager(bundled: str, with_defaults: bool):
    """The bundled tasks, plus lm-eval's own index of ~15k tasks (seconds to build) only when asked."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=bundled, include_defaults=with_defaults)


def known_tasks(specs: Sequence[TaskSpec]):
    """lm-eval's task manager, once every spec is known to name one task, listed once: a check
    that loads no dataset, so a search makes it before any work."""
    names = [spec.task for spec in specs]
    if len(set(names)) != len(names):
        raise TaskError(f"a task is listed twice: {names}")
    manager = task_manager(str(include_path()), any(name not in BUNDLED_TASKS for name in names))
    for spec in specs:
        if spec.task not in manager.all_subtasks:
            kind = (
                "a group or tag; list its tasks one by one" if spec.task in manager.all_tasks else "unknown to lm-eval"
            )
            raise TaskError(f"task {spec.task!r} is {kind} (bundled tasks: {', '.join(BUNDLED_TASKS)})")
    return manager


def load_tasks(specs: Sequence[TaskSpec]) -> dict[str, object]:
    """Every spec's lm-eval Task, configured."""
    manager = known_tasks(specs)
    tasks = {}
    for spec in specs:
        try:
            loaded = manager.load([_local_copy(spec, manager) if spec.data_files else spec.task])["tasks"]
        except OSError as err:  # datasets raises ConnectionError/FileNotFoundError when the hub is out of reach
            dataset = manager.task_index[spec.task].cfg.get("dataset_path", spec.task)
            raise TaskError(f"{_offline_hint(spec, dataset)}; the loader said: {err}") from err
        except KeyError as err:
            if not spec.data_files:
                raise
            raise TaskError(
                f"task {spec.task!r} reads split {err}, which its data_files lack (lm-eval draws few-shot "
                f"examples from it): add --data {spec.task}:{err.args[0]}=FILE, or {err.args[0]}: FILE to data_files"
            ) from err
        except Exception as err:  # a damaged file, or rows without the fields the task's prompt reads
            if not spec.data_files:
                raise
            files = ", ".join(str(path) for path in spec.data_files.values())
            raise TaskError(
                f"task {spec.task!r}: data_files {files} do not load as its dataset "
                f"({type(err).__name__}: {' '.join(str(err).split())})"
            ) from None
        tasks[spec.task] = loaded[spec.task]
        _configure(tasks[spec.task], spec)
    return tasks


class Evaluator:
    """One HFLM around one resident model, re-scored as often as its weights change."""

    def __init__(
        self,
        model,
        tokenizer,
        tasks: Sequence[str | TaskSpec | dict],
        *,
        batch_size: int | Literal["auto"] = "auto",
        max_batch_size: int = 64,
        split_seed: int = 0,
    ) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        patches.cache_jinja_templates()
        specs = [TaskSpec.of(task) for task in tasks]
        self.specs = {spec.task: spec for spec in specs}
        chat = [name for name, spec in self.specs.items() if spec.chat_template]
        if chat and not getattr(tokenizer, "chat_template", None):
            raise TaskError(f"chat_template is on for {chat}, but the model's tokenizer has no chat template")
        self.lm = patches.hflm(model, tokenizer, max_batch_size)
        self.batch_size = None if batch_size == "auto" else int(batch_size)
        patches.set_batch_size(self.lm, self.batch_size or 1)
        self._clock = patches.ModelClock(self.lm)
        patches.quiet_model(self.lm)
        patches.memoize_tokenization(self.lm)
        self.tasks = load_tasks(specs)
        for task in self.tasks.values():
            patches.freeze_eval_docs(task)
        self.metrics = {name: _metric_key(task, self.specs[name]) for name, task in self.tasks.items()}
        for name, task in self.tasks.items():
            patches.score_only(task, self.metrics[name])
        self.splits: dict[str, ItemSplits] = {
            name: split_items(name, len(task.eval_docs), split_seed) for name, task in self.tasks.items()
        }
        self._prompts: dict[tuple[str, str], dict[int, list]] = {}

    def use_batch_size(self, batch_size: int) -> None:
        """Score with this batch size from now on (e.g. the one a study probed), without probing."""
        self.batch_size = int(batch_size)
        patches.set_batch_size(self.lm, self.batch_size)

    def item_ids(self, task: str, split: str, limit: int | None = None, fidelity: float | None = None) -> list[int]:
        """The doc ids scored for ``split``: search in its fixed order (a fidelity is a prefix of it)."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")  # lm-eval reads samples=[] as every item
        if fidelity is not None:
            if split != "search":
                raise ValueError(f"fidelity levels are prefixes of the search split, not of {split!r}")
            return self.splits[task].fidelity(fidelity)[:limit]
        return self.splits[task].ids(split)[:limit]

    def _split_prompts(self, name: str, split: str) -> dict[int, list]:
        """Every item of one split, built once; a doc's prompt never depends on the subset scored."""
        if (name, split) not in self._prompts:
            task, spec = self.tasks[name], self.specs[name]
            ids = sorted(self.splits[name].ids(split))
            task.set_fewshot_seed(seed=FEWSHOT_SEED)  # the same few-shot draw as a fresh lm_eval run on this split
            with patches.quiet_request_building(), _prompt_errors_named(name, task):
                type(task).build_all_requests(
                    task,
                    samples=ids,
                    system_instruction=spec.system_instruction,
                    apply_chat_template=spec.chat_template,
                    fewshot_as_multiturn=spec.chat_template,
                    chat_template=self.lm.apply_chat_template if spec.chat_template else None,
                    tokenizer_name=self.lm.tokenizer_name if spec.chat_template else "",
                )
            by_doc = defaultdict(list)
            for instance in task.instances:
                by_doc[ids[instance.doc_id]].append(instance)
            self._prompts[(name, split)] = by_doc
        return self._prompts[(name, split)]

    def built_requests(self, name: str, split: str, ids: list[int]) -> list:
        """Fresh copies of the built requests, numbered the way evaluate() numbers ``samples``."""
        by_doc = self._split_prompts(name, split)
        return [
            dataclasses.replace(instance, metadata=(name, position, instance.repeats), resps=[], filtered_resps={})
            for position, doc_id in enumerate(sorted(ids))
            for instance in by_doc[doc_id]
        ]

    def _probe_batch_size(self, requests: list) -> int:
        """lm-eval's own OOM-halving probe, run once: the first evaluation's longest prompt plus its
        budget. On the CPU it is skipped: it would take its first try, the largest batch, after five
        forward passes (seconds per process), since memory there is overcommitted, not refused."""
        if self.lm.device.type == "cpu":
            return self.lm.max_batch_size

        def tokens(instance) -> int:
            text = "".join(a for a in instance.args if isinstance(a, str))
            generates = instance.request_type == "generate_until"
            return len(self.lm.tok_encode(text)) + (
                instance.args[1].get("max_gen_toks", self.lm.max_gen_toks) if generates else 0
            )

        length = min(self.lm.max_length, max(map(tokens, requests)))
        return patches.detect_batch_size(self.lm, length)

    def score(
        self,
        split: str = "test",
        limit: int | None = None,
        tasks: Sequence[str] | None = None,
        fidelity: float | None = None,
        skip: int = 0,
    ) -> EvalResult:
        """Each task's metric on one split's items (the first ``limit``, or a search ``fidelity``).

        ``skip`` leaves out the first items of that prefix, those a lower fidelity rung scored
        already; ``EvalResult.extended`` joins the two. Tasks with nothing left are not scored.

        An exception or a non-finite weight or score fails this evaluation only: the result holds
        the reason and the next call starts clean.
        """
        from lm_eval.evaluator import evaluate

        names = list(tasks or self.tasks)
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise TaskError(f"task(s) {unknown} were not given to this Evaluator ({list(self.tasks)})")
        ids = {name: self.item_ids(name, split, limit, fidelity)[skip:] for name in names}
        names = [name for name in names if ids[name]]
        requests = {name: self.built_requests(name, split, ids[name]) for name in names}
        if self.batch_size is None:
            self.batch_size = self._probe_batch_size([r for rs in requests.values() for r in rs])
            patches.set_batch_size(self.lm, self.batch_size)
        start, self._clock.seconds = time.perf_counter(), 0.0
        try:
            check_finite(self.lm.model)
            for name in names:
                patches.serve(self.tasks[name], requests[name])
            results = evaluate(
                self.lm,
                {"tasks": {name: self.tasks[name] for name in names}, "groups": {}, "group_map": {}},
                samples={name: sorted(ids[name]) for name in names},  # lm-eval maps positions back in sorted order
                bootstrap_iters=0,
                log_samples=True,
            )
            scores = {name: self._task_score(name, split, ids[name], results["samples"][name]) for name in names}
            error = None
        except Exception as err:  # one bad candidate must not end the search; the reason is kept
            scores, error = {}, f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
        return EvalResult(split, scores, seconds, self._clock.seconds, self.batch_size, error)

    def _task_score(self, name: str, split: str, ids: list[int], samples: list[dict]) -> TaskScore:
        metric, filter_name = self.metrics[name].split(",")
        by_doc = {s["doc_id"]: float(s[metric]) for s in samples if s["filter"] == filter_name}
        for doc_id, value in by_doc.items():
            if not math.isfinite(value):
                raise FloatingPointError(f"task {name!r}: {metric} is {value} on doc {doc_id}")
        return TaskScore(name, split, self.metrics[name], ids, [by_doc[d] for d in ids])


def check_finite(model) -> None:
    """FloatingPointError naming the first parameter that holds NaN or Inf."""
    import torch

    params = dict(model.named_parameters())
    if not torch.stack([torch.isfinite(p).all() for p in params.values()]).all():
        bad = next(n for n, p in params.items() if not torch.isfinite(p).all())
        raise FloatingPointError(f"non-finite weights in {bad}")


def load_model(model_dir: Path, device: str = "cpu"):
    """A saved HF model folder and its tokenizer, ready for an Evaluator; weights from safetensors only.

    ValueError naming a tensor when the weights do not fill the architecture in config.json:
    transformers would fill the gaps with fresh random values and print its load report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report: the error below says what matters in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    for kind, what in (
        ("unexpected_keys", f"is not part of {type(model).__name__}, the architecture in config.json"),
        ("mismatched_keys", "has another shape than config.json gives it"),
        ("missing_keys", "is not in the weights"),
    ):
        names = sorted(name if isinstance(name, str) else str(name[0]) for name in info.get(kind) or ())
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ValueError(f"tensor {names[0]}{more} {what}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as problem:  # missing, or files that transformers cannot read
        raise ValueError(f"its tokenizer does not load ({type(problem).__name__}: {problem})") from None
    return model.to(device).eval(), tokenizer
