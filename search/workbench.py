"""What every trial reuses: the parents resident once, one candidate built in place, one evaluator."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

from evals.harness import Evaluator, known_tasks
from evals.results import EvalResult
from evals.spec import TaskSpec
from merge_core import BuildReport, Engine, Parents
from search.experiment import Experiment, ExperimentError, pick_device, resolve_model


class Workbench:
    def __init__(self, experiment: Experiment, device: str = "auto") -> None:
        from transformers import AutoTokenizer

        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        self.experiment = experiment
        self.device = pick_device(device)
        known_tasks([TaskSpec.of(task) for task in experiment.evaluation.tasks])  # an unknown task fails first
        self.refs: dict[str, str] = {alias: str(resolve_model(ref)) for alias, ref in experiment.models.items()}
        self.engine = Engine(Parents.open(dict.fromkeys(self.refs.values()), self.device))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.refs[experiment.base_model])
        except (OSError, ValueError) as problem:  # no tokenizer files, or ones transformers cannot read
            raise ExperimentError(
                f"model {experiment.models[experiment.base_model]}: the base model's tokenizer, "
                f"which every evaluation uses, cannot be loaded ({type(problem).__name__})"
            ) from None
        self._evaluator: Evaluator | None = None

    def build(self, config: Mapping, seed: int) -> BuildReport:
        return self.engine.build(config, seed=seed)

    @property
    def evaluator(self) -> Evaluator:
        """Wraps the candidate built last; rebuilt only if the engine had to re-create the candidate."""
        model = self.engine.candidate.model
        if self._evaluator is None or self._evaluator.lm.model is not model:
            evaluation = self.experiment.evaluation
            self._evaluator = Evaluator(
                model,
                self.tokenizer,
                evaluation.tasks,
                batch_size=evaluation.batch_size,
                split_seed=evaluation.split_seed,
            )
        return self._evaluator

    def score(self, split: str, limit: int | None = None, skip: int = 0) -> EvalResult:
        """The built candidate on ``split``; search limits are nested prefixes of a fixed order,
        and ``skip`` leaves out the items a lower rung scored already."""
        if limit is None:
            limit = {
                "select": self.experiment.evaluation.select_limit,
                "test": self.experiment.evaluation.test_limit,
            }.get(split)
        return self.evaluator.score(split, limit=limit, skip=skip)

    def score_rungs(self, rungs: Sequence[int]) -> Iterator[tuple[int, EvalResult, EvalResult]]:
        """The search split rung by rung, each rung scoring only its new items: (rung, the new
        items' result, the whole prefix's). Stops after a failed rung. Export re-scores a trial
        through this too, so that it sees the very batches the trial saw."""
        result, scored = None, 0
        for rung in rungs:
            more = self.score("search", limit=rung, skip=scored)
            joined = more if result is None else result.extended(more)  # a failed rung: itself
            yield rung, more, joined
            if not more.ok:
                return
            result, scored = joined, rung
