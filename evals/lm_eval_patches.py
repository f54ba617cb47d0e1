"""Every place soupsearch reaches into lm-eval's internals, with the reason and the version checked.

lm-eval is built to score a model once per process; a search scores one resident model hundreds
of times on fixed item subsets. The patches below remove per-call work that gives the same result
every time, and silence bars that would flood the search's own. None of them changes a score:
``tests/test_evals.py`` holds every score to lm-eval's own CLI, item by item.

All were checked against lm-eval 0.4.13 (``CHECKED``), the version ``pyproject.toml`` pins; a new
lm-eval version means re-reading each symbol named here, then moving the pin.

Each patch, the lm-eval symbol it touches, and why:

- ``ModelClock``: wraps ``HFLM._model_call`` and ``HFLM._model_generate`` (private), to time the
  model apart from lm-eval's overhead.
- ``hflm``: lowers the ``lm_eval.models.huggingface`` logger while HFLM is given a model object,
  whose two warnings are what we intend.
- ``quiet_model``: binds ``disable_tqdm`` on ``HFLM.generate_until``, ``loglikelihood`` and
  ``loglikelihood_rolling``: one bar per request batch would flood the search's own.
- ``set_batch_size``: sets ``HFLM.batch_size_per_gpu``, a probed or given batch size without a new
  HFLM.
- ``detect_batch_size``: calls ``HFLM._detect_batch_size`` (private), lm-eval's OOM-halving probe,
  once per Evaluator, on GPUs only.
- ``memoize_tokenization``: replaces ``HFLM.tok_encode`` and ``tok_batch_encode``: prompts are
  encoded again on every call.
- ``cache_jinja_templates``: memoizes ``lm_eval.utils.env.from_string`` process-wide: a template is
  compiled again per doc and metric.
- ``freeze_eval_docs``: replaces ``Task.test_docs``/``validation_docs`` and ``Task.doc_to_target``:
  docs are decoded and targets rendered on every call.
- ``quiet_request_building``: swaps the module global ``lm_eval.api.task.tqdm`` while prompts are
  built, once.
- ``serve``: replaces ``Task.build_all_requests``: ``evaluate`` rebuilds every prompt on every call.
- ``filter_names``, ``score_only``: read and prune ``Task._filters``, ``_metric_fn_list``,
  ``_metric_fn_kwargs``, ``_aggregation_list`` and ``_higher_is_better`` (private): every filter and
  metric runs per item, and one of each is reported.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator

CHECKED = "0.4.13"


class ModelClock:
    """Seconds spent in the model's own forward passes and generate; the rest is our overhead."""

    def __init__(self, lm) -> None:
        import torch  # here: reading scores back and checking task names need no torch

        self.seconds = 0.0
        self._sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
        for name in ("_model_generate", "_model_call"):
            setattr(lm, name, self._timed(getattr(lm, name)))

    def _timed(self, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = method(*args, **kwargs)
            self._sync()
            self.seconds += time.perf_counter() - start
            return out

        return timed


def hflm(model, tokenizer, max_batch_size: int):
    """lm-eval's HFLM around a model object; its two warnings about being given one are what we intend."""
    from lm_eval.models.huggingface import HFLM

    log = logging.getLogger("lm_eval.models.huggingface")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_batch_size=max_batch_size)
    finally:
        log.setLevel(level)


def quiet_model(lm) -> None:
    """One bar per request batch floods the caller's own progress bar (trial x/N)."""
    for name in ("generate_until", "loglikelihood", "loglikelihood_rolling"):
        setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))


def set_batch_size(lm, batch_size: int) -> None:
    lm.batch_size_per_gpu = int(batch_size)


def detect_batch_size(lm, length: int) -> int:
    """lm-eval's own OOM-halving probe for a prompt of ``length`` tokens (context and budget)."""
    return lm._detect_batch_size([(None, [0] * (length + 1), [])])


def memoize_tokenization(lm) -> None:
    """The prompts, so their tokens and their batches, are the same in every trial: encode each
    once. lm-eval re-encodes every prompt to sort requests and again to batch them, per call."""
    encode, batch_encode = lm.tok_encode, lm.tok_batch_encode

    @functools.cache
    def encoded(string: str, add_special_tokens, left_truncate_len) -> tuple[int, ...]:
        return tuple(encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len))

    @functools.lru_cache(maxsize=4096)
    def batch_encoded(strings: tuple[str, ...], padding_side, left_truncate_len, truncation):
        return batch_encode(
            list(strings), padding_side=padding_side, left_truncate_len=left_truncate_len, truncation=truncation
        )

    def tok_encode(string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        if kwargs:
            return encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len, **kwargs)
        return list(encoded(string, add_special_tokens, left_truncate_len))

    def tok_batch_encode(
        strings: list[str], padding_side: str = "left", left_truncate_len=None, truncation: bool = False
    ):
        ids, mask = batch_encoded(tuple(strings), padding_side, left_truncate_len, truncation)
        return ids.clone(), mask.clone()  # generate() may keep or move them; the cache stays intact

    lm.tok_encode, lm.tok_batch_encode = tok_encode, tok_batch_encode


def cache_jinja_templates() -> None:
    """lm-eval recompiles a task's Jinja template for every doc and metric; compile each one once."""
    from lm_eval import utils

    if not hasattr(utils.env.from_string, "cache_info"):
        utils.env.from_string = functools.lru_cache(maxsize=1024)(utils.env.from_string)


def freeze_eval_docs(task) -> None:
    """evaluate() walks all of a task's evaluation docs on every call, decoding each row of its
    datasets table (and re-running ``process_docs``), and renders each doc's target through Jinja
    twice: read the docs once, as a list, and render each of their targets once."""
    docs = list(task.eval_docs)
    setattr(task, "test_docs" if task.has_test_docs() else "validation_docs", lambda: docs)
    targets: dict[int, object] = {}
    frozen = {id(doc) for doc in docs}  # these dicts live as long as the task: their ids are stable
    render = task.doc_to_target

    def doc_to_target(doc, *args, **kwargs):
        if args or kwargs or id(doc) not in frozen:
            return render(doc, *args, **kwargs)
        if id(doc) not in targets:
            targets[id(doc)] = render(doc)
        return targets[id(doc)]

    task.doc_to_target = doc_to_target


@contextlib.contextmanager
def quiet_request_building() -> Iterator[None]:
    """lm-eval draws a progress bar per task and split while it builds prompts (a fraction of a
    second here, once): inside the caller's own bars it is noise, so build without it."""
    import lm_eval.api.task as lm_task

    bar = lm_task.tqdm
    lm_task.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        lm_task.tqdm = bar


def serve(task, requests: list) -> None:
    """evaluate() rebuilds a task's prompts on every call; make it take the ones built once."""
    task.build_all_requests = lambda **_: setattr(task, "_instances", requests)


def filter_names(task) -> list[str]:
    """A task's filter names; lm-eval names a task without a filter_list "none"."""
    return [f.name for f in task._filters]


def score_only(task, key: str) -> None:
    """Drop the filters and metrics that are not reported: lm-eval runs every filter over every
    answer and computes every metric per item and filter, and an Evaluator reports one of each."""
    metric, filter_name = key.split(",")
    task._filters = [f for f in task._filters if f.name == filter_name]
    for table in (task._metric_fn_list, task._metric_fn_kwargs, task._aggregation_list, task._higher_is_better):
        for name in [name for name in table if name != metric]:
            del table[name]
