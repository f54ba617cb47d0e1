"""The experiment file: one typed, validated description of a merge search or a soup.

Every model is named once under ``models`` (a hub id, a local folder, or ``zoo:VARIANT/MODEL``
for the tiny zoo, whose cache folder name is a hash) and referred to by that alias elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from evals.objectives import Objective, check_weights
from evals.spec import TaskSpec
from merge_core.methods import TASK_VECTOR_METHODS as TASK_VECTOR_METHODS  # for search.space
from search.urls import expand, masked
from user_input import UserError, one_line, parse_yaml, read_file

T_FILTERS = ("self_attn", "mlp", "rest")  # mergekit filters; "rest" is the catch-all entry
# names that MLflow filters and file names take as they are; not dots alone, which name folders
NAME_PATTERN = r"^[A-Za-z0-9_.\-]*[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$"
MAX_SEED = 2**32 - 1  # numpy's and Optuna's samplers take seeds in [0, 2**32)


class ExperimentError(UserError):
    """An experiment file that cannot be used; the message names the file and the key."""


def pick_device(requested: str) -> str:
    """`auto` -> cuda when present, else cpu; cpu, cuda or cuda:N otherwise (ExperimentError)."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = requested.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ExperimentError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ExperimentError(f"device {requested}: no CUDA device is available")
    return requested


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """A float searched in [low, high]; ``log`` for scale parameters such as density."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


Searched = float | Range  # a plain number is held fixed


class SlerpSpace(_Strict):
    """``t`` as a gradient: ``anchors`` values per filter, interpolated across layers by mergekit."""

    t: Range = Range(low=0.0, high=1.0)
    anchors: int = Field(default=3, ge=1, le=16)
    filters: tuple[Literal["self_attn", "mlp", "rest"], ...] = T_FILTERS

    @model_validator(mode="after")
    def _has_rest(self) -> SlerpSpace:
        if "rest" not in self.filters:
            raise ValueError("filters must include 'rest' (layernorms and embeddings match no other filter)")
        return self


class LinearSpace(_Strict):
    weight: Searched = Range(low=0.0, high=1.0)
    normalize: bool = True


class TaskVectorSpace(_Strict):
    """task_arithmetic / ties / dare_*: per-parent weight (negative = negation) and density, global λ."""

    weight: Searched = Range(low=0.0, high=1.0)
    density: Searched | None = None
    lambda_: Searched | None = Field(default=None, alias="lambda")
    normalize: bool | None = None  # None keeps mergekit's per-method default
    anchors: int = Field(
        default=1,
        ge=1,
        le=16,
        description="searched weight/density values per parent across "
        "the layers (a mergekit gradient): per layer group; 1 is one value per parent",
    )

    @model_validator(mode="after")
    def _density_in_range(self) -> TaskVectorSpace:
        low = self.density.low if isinstance(self.density, Range) else self.density
        high = self.density.high if isinstance(self.density, Range) else self.density
        if low is not None and not (0 < low and high <= 1):
            raise ValueError(f"density must lie in (0, 1], got {self.density}")
        return self


class Space(_Strict):
    """One section per merge method; with several, the method itself is a categorical choice."""

    slerp: SlerpSpace | None = None
    linear: LinearSpace | None = None
    task_arithmetic: TaskVectorSpace | None = None
    ties: TaskVectorSpace | None = None
    dare_ties: TaskVectorSpace | None = None
    dare_linear: TaskVectorSpace | None = None

    @property
    def methods(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]

    @model_validator(mode="after")
    def _some_method(self) -> Space:
        if not self.methods:
            raise ValueError(f"give at least one method section: {', '.join(type(self).model_fields)}")
        if self.task_arithmetic is not None and self.task_arithmetic.density is not None:
            raise ValueError("task_arithmetic has no density; use ties or dare_ties")
        return self


class Soup(_Strict):
    """Greedy soup (Wortsman et al. 2022) over ``ingredients``, beside uniform soup and best single."""

    ingredients: list[str] = Field(min_length=2)
    order: Literal["select_score", "given"] = "select_score"
    noise_aware: bool = False  # add only on a significant paired gain (paired bootstrap over items)
    alpha: float = Field(default=0.05, gt=0, lt=1)


class Study(_Strict):
    name: str | None = Field(default=None, min_length=1, pattern=NAME_PATTERN)  # default: the experiment's name
    sampler: Literal["tpe", "cmaes", "random", "grid", "nsga2"] = "tpe"
    pruner: Literal["none", "successive_halving", "hyperband", "wilcoxon"] = "none"
    trials: int = Field(default=20, ge=1)
    timeout: float | None = Field(default=None, gt=0, description="seconds")
    grid_points: int = Field(default=3, ge=2, description="values per float parameter for the grid sampler")
    select_top: int = Field(default=3, ge=1, description="best search trials re-scored on select by export")


class Evaluation(_Strict):
    tasks: list[str | TaskSpec] = Field(min_length=1)
    objective: dict[str, float] | None = None  # task -> weight; default equal weights
    fidelity: list[int] = Field(
        default=[64], min_length=1, description="search items scored at each rung: nested prefixes"
    )
    select_limit: int | None = Field(default=None, ge=1)
    test_limit: int | None = Field(default=None, ge=1)
    split_seed: int = 0
    batch_size: int | Literal["auto"] = "auto"

    @property
    def task_names(self) -> list[str]:
        return [TaskSpec.of(task).task for task in self.tasks]

    @property
    def objective_function(self) -> Objective:
        return Objective(weights=self.objective or {name: 1.0 for name in self.task_names})

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, batch_size: int | str) -> int | str:
        if batch_size != "auto" and batch_size < 1:
            raise ValueError(f"expected a positive integer or 'auto', got {batch_size}")
        return batch_size

    @field_validator("objective")
    @classmethod
    def _usable(cls, objective: dict[str, float] | None) -> dict[str, float] | None:
        return objective if objective is None else check_weights(objective)

    @model_validator(mode="after")
    def _consistent(self) -> Evaluation:
        if self.fidelity != sorted(set(self.fidelity)) or self.fidelity[0] < 1:
            raise ValueError(f"fidelity must be increasing positive item counts, got {self.fidelity}")
        unknown = sorted(set(self.objective or {}) - set(self.task_names))
        if unknown:
            raise ValueError(f"objective names task(s) {unknown} that are not in tasks {self.task_names}")
        return self


class Experiment(_Strict):
    name: str = Field(min_length=1, pattern=NAME_PATTERN)
    models: dict[str, str] = Field(min_length=1, description="alias -> hub id, folder or zoo:VARIANT/MODEL")
    base_model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    space: Space | None = None
    soup: Soup | None = None
    warm_starts: list[dict[str, float | str | bool | list[float]]] = []
    evaluation: Evaluation
    study: Study = Study()
    storage: str | None = None  # Optuna URL or journal file; default .soupsearch/journal.log
    tracking_uri: str | None = None  # default sqlite:///mlflow.db in the working directory
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def study_name(self) -> str:
        return self.study.name or self.name

    @field_validator("storage", "tracking_uri")
    @classmethod
    def _from_environment(cls, url: str | None) -> str | None:
        """``${VAR}`` parts come from the environment, so that a password stays out of the file."""
        return None if url is None else expand(url)

    @field_serializer("storage", "tracking_uri")
    def _without_password(self, url: str | None) -> str | None:
        """Every dump of an experiment (the MLflow experiment.yaml artifact among them) hides passwords."""
        return None if url is None else masked(url)

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        if self.base_model not in self.models:
            raise ValueError(f"base_model {self.base_model!r} is not an alias in models {sorted(self.models)}")
        if (self.space is None) == (self.soup is None):
            raise ValueError("give exactly one of 'space' (a merge search) or 'soup' (greedy soup)")
        if self.soup is not None:
            unknown = [i for i in self.soup.ingredients if i not in self.models]
            if unknown:
                raise ValueError(f"soup.ingredients {unknown} are not aliases in models {sorted(self.models)}")
        if self.space is not None and self.space.slerp is not None and len(self.models) != 2:
            raise ValueError(f"space.slerp merges exactly two models, models has {len(self.models)}")
        if self.study.sampler == "nsga2" and self.study.pruner != "none":
            raise ValueError("study.pruner: multi-objective (nsga2) studies cannot be pruned")
        if self.study.sampler == "grid" and self.space is not None and len(self.space.methods) > 1:
            raise ValueError(
                "study.sampler: grid needs a single method in space (conditional parameters "
                f"cannot be gridded), got {self.space.methods}"
            )
        return self


def load_experiment(path: str | Path) -> Experiment:
    """The experiment in ``path``; raises ExperimentError naming the file and each bad key."""
    path = Path(path)
    raw = parse_yaml(read_file(path, "experiment file"), str(path))
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: an experiment is a mapping of keys, got {type(raw).__name__}")
    try:
        return Experiment.model_validate(raw)
    except ValidationError as problem:
        raise ExperimentError(f"{path}: {one_line(problem)}") from None


def resolve_model(reference: str, load: bool = True) -> Path | str:
    """A local folder for ``reference``; hub ids come from the local HF cache only (offline).

    With ``load=False`` nothing is built or looked up: a zoo reference is only checked by name.
    """
    from zoo.recipe import RECIPES

    if reference.startswith("zoo:"):
        variant, _, model = reference[4:].partition("/")
        if variant not in RECIPES:
            raise ExperimentError(f"model {reference}: unknown zoo {variant!r} (zoos: {', '.join(RECIPES)})")
        if model not in RECIPES[variant].models:
            raise ExperimentError(
                f"model {reference}: zoo {variant!r} has no {model!r} (it has {', '.join(RECIPES[variant].models)})"
            )
        if not load:
            return reference
        from zoo.build import open_zoo

        return open_zoo(variant) / model  # a first use trains the zoo (minutes), with its progress bar
    folder = Path(reference).expanduser()
    if folder.exists() or reference.startswith((".", "/", "~")):
        if not (folder / "config.json").is_file():
            raise ExperimentError(f"model {reference}: no Hugging Face model folder there (no config.json)")
        return folder.resolve()
    if not load:
        return reference
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(reference, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):
        raise ExperimentError(
            f"model {reference}: not in the local Hugging Face cache "
            f"(download it first, e.g. `hf download {reference}`)"
        ) from None
