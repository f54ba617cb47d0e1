"""What to evaluate: one typed, validated spec per task, in the words of lm-eval's own CLI flags.

A plain task name is a spec with every option left to the task's YAML. ``data_files`` points a
hub task at a local copy of its dataset (same schema, for example openai/gsm8k's ``question`` and
``answer``), keyed by the dataset's split names.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

GenValue = bool | int | float | str | list[str]
DATA_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, description="an lm-eval task name, bundled or built in")
    data_files: dict[str, Path] | None = Field(
        default=None, description="local copy of the task's dataset: {split: .parquet/.jsonl file}"
    )
    num_fewshot: int | None = Field(default=None, ge=0, description="None keeps the task's own")
    gen_kwargs: dict[str, GenValue] | None = Field(
        default=None, description="merged over the task's generation_kwargs, e.g. {max_gen_toks: 256}"
    )
    chat_template: bool = False
    system_instruction: str | None = None
    metric: str | None = Field(
        default=None, description="lm-eval key 'metric,filter'; None takes the task's first of each"
    )

    @field_validator("data_files")
    @classmethod
    def _local_files(cls, files: dict[str, Path] | None) -> dict[str, Path] | None:
        if files is None:
            return None
        if not files:
            raise ValueError("data_files is empty; give at least the evaluation split, e.g. {test: FILE}")
        formats = {DATA_FORMATS.get(p.suffix) for p in files.values()}
        if None in formats or len(formats) > 1:
            raise ValueError(
                f"data_files must all be .parquet or all .json/.jsonl, got {sorted(map(str, files.values()))}"
            )
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise ValueError(f"data file(s) not found: {', '.join(missing)}")
        return {split: p.resolve() for split, p in files.items()}

    @field_validator("gen_kwargs")
    @classmethod
    def _positive_length(cls, kwargs: dict[str, GenValue] | None) -> dict[str, GenValue] | None:
        if kwargs and "max_gen_toks" in kwargs:
            tokens = kwargs["max_gen_toks"]
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"max_gen_toks must be a positive integer, got {tokens!r}")
        return kwargs

    @field_validator("metric")
    @classmethod
    def _metric_key(cls, metric: str | None) -> str | None:
        if metric is not None and metric.count(",") != 1:
            raise ValueError(
                f"metric {metric!r} must be lm-eval's 'metric,filter' key, e.g. 'exact_match,strict-match'"
            )
        return metric

    @property
    def data_format(self) -> str | None:
        return DATA_FORMATS[next(iter(self.data_files.values())).suffix] if self.data_files else None

    @classmethod
    def of(cls, task: str | TaskSpec | dict) -> TaskSpec:
        if isinstance(task, TaskSpec):
            return task
        return cls(task=task) if isinstance(task, str) else cls.model_validate(task)
