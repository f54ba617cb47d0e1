"""What the zoo is made of: one recipe, in two sizes (tiny for experiments, pico for tests)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from user_input import env_int

ZOO_FORMAT = 5  # bump when the trainer, a constant below or the folder layout changes what a recipe builds
ARITHMETIC = ("tiny_addition", "tiny_subtraction", "tiny_multiplication")
WORD_PROBLEMS = "tiny_gsm8k"
TASKS = (*ARITHMETIC, WORD_PROBLEMS)
SPECIALIST_DECAY = 100  # steps of cosine decay after a specialist meets its ``specialist_target``


@dataclass(frozen=True)
class Shape:
    """The Mistral hyperparameters a zoo model is built with."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class Schedule:
    """One training run: AdamW with linear warmup, then cosine decay over ``steps``; or, with a
    ``target``, warmup-stable-decay: a constant rate until the model solves ``target`` of the probe
    problems (at most ``steps`` steps), then ``decay`` steps of cosine decay."""

    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    target: float | None = None
    decay: int = 0


@dataclass(frozen=True)
class Recipe:
    name: str
    shape: Shape
    vocab_size: int
    base: Schedule  # pretraining on an even mixture of every task
    specialist: Schedule  # one fine-tune of the base per task
    ingredients: tuple[Schedule, ...]  # the soup sweep: fine-tunes on the word problems
    # tasks whose specialist trains longer: multiplication is the hardest, and at the common
    # length its gain over the base stayed inside the 95% CI; for a task with a target (below),
    # the scaled steps cap the stable phase
    specialist_scale: tuple[tuple[str, float], ...] = (("tiny_multiplication", 4.0), (WORD_PROBLEMS, 5.0))
    # tasks whose specialist trains to a share of its own probe problems, then SPECIALIST_DECAY steps
    # of decay: under a fixed number of steps, one training seed's word-problem fine-tune stayed on
    # a plateau no better than the base (docs/performance.md)
    specialist_target: tuple[tuple[str, float], ...] = ((WORD_PROBLEMS, 0.5),)
    replay: float = 0.5  # share of the other tasks mixed into every fine-tune, against forgetting
    # tasks whose specialist replays less, so that the general model complements it: with half
    # replay the word-problem specialist also outgrew the general model at arithmetic, and the
    # demo's merges gained less over it (docs/performance.md)
    specialist_replay: tuple[tuple[str, float], ...] = ((WORD_PROBLEMS, 0.1),)
    general_density: float = 0.5  # DARE-TIES over the arithmetic specialists
    # CPU threads change the float sums, so they are part of the recipe; one thread also keeps a
    # build from stalling when other work shares the cores
    threads: int = 1
    tokenizer_documents: int = 2000
    probe_items: int = 128  # per task: the problems a ``target`` schedule is checked on
    seed: int = 0

    @property
    def digest(self) -> str:
        text = json.dumps({"format": ZOO_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.digest}"

    def specialist_schedule(self, task: str) -> Schedule:
        scale = dict(self.specialist_scale).get(task, 1.0)
        schedule = replace(self.specialist, steps=round(self.specialist.steps * scale))
        target = dict(self.specialist_target).get(task)
        return schedule if target is None else replace(schedule, target=target, decay=SPECIALIST_DECAY)

    def fine_tune_mixture(self, task: str, replay: float | None = None) -> dict[str, float]:
        """Each task's share of a fine-tune's documents: ``1 - replay`` for ``task``, the rest split
        evenly; ``replay`` defaults to the recipe's."""
        replay = self.replay if replay is None else replay
        return {t: replay / (len(TASKS) - 1) for t in TASKS} | {task: 1 - replay}

    def specialist_mixture(self, task: str) -> dict[str, float]:
        """The mixture of ``task``'s specialist: its own replay if ``specialist_replay`` has one."""
        return self.fine_tune_mixture(task, dict(self.specialist_replay).get(task))

    @property
    def models(self) -> list[str]:
        return [
            "base",
            *(f"specialist-{task.removeprefix('tiny_')}" for task in TASKS),
            "general",
            *(f"ingredient-{i:02d}" for i in range(len(self.ingredients))),
        ]


def _sweep(steps: int, lr: float) -> tuple[Schedule, ...]:
    """A hyperparameter sweep around one good setting, with a few deliberately poor points."""
    good = [
        Schedule(steps=steps, lr=lr, seed=1),
        Schedule(steps=steps, lr=lr, seed=2),
        Schedule(steps=steps, lr=lr * 0.6, seed=3),
        Schedule(steps=steps, lr=lr * 1.5, seed=4),
        Schedule(steps=int(steps * 1.5), lr=lr * 0.8, seed=5),
        Schedule(steps=int(steps * 0.7), lr=lr * 1.2, seed=6),
    ]
    poor = [
        Schedule(steps=max(2, steps // 8), lr=lr * 0.3, seed=7),  # barely trained
        Schedule(steps=steps, lr=lr * 10, seed=8, warmup=2),  # too hot: forgets the base
    ]
    return tuple(good + poor)


TINY = Recipe(
    name="tiny",
    shape=Shape(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
    ),
    vocab_size=384,
    # trained to a skill level, not for a number of steps: after a fixed number of steps the bases
    # of different training seeds stood at very different skill levels (docs/performance.md)
    base=Schedule(steps=4000, lr=3e-3, batch_size=32, warmup=50, target=0.15, decay=200),
    # gentle fine-tunes keep task vectors small beside the base, as in LLM fine-tuning, so that they
    # add up: at 1e-3 the sum of the arithmetic ones collapsed the model
    specialist=Schedule(steps=600, lr=3e-4, batch_size=32, warmup=10, seed=1),
    ingredients=_sweep(steps=100, lr=1e-3),
)

PICO = replace(
    TINY,
    name="pico",
    shape=Shape(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=96,
        max_position_embeddings=192,
    ),
    vocab_size=320,
    base=Schedule(steps=250, lr=5e-3, batch_size=16, warmup=20),
    specialist=Schedule(steps=100, lr=3e-3, batch_size=16, warmup=5, seed=1),
    specialist_scale=(("tiny_multiplication", 2.5),),
    # one common fine-tune for every task: the pico zoo serves the tests, not the claims
    specialist_target=(),
    specialist_replay=(),
    ingredients=tuple(replace(s, batch_size=16) for s in _sweep(steps=12, lr=3e-3)),
    tokenizer_documents=600,
)

RECIPES = {r.name: r for r in (TINY, PICO)}


def recipe_for(variant: str, seed: int | None = None) -> Recipe:
    """``variant``'s recipe with training seed ``seed`` (default: $SOUPSEARCH_ZOO_SEED, else 0).

    Other seeds redraw every source of training noise, to check that the zoo's claims are not luck.
    """
    if seed is None:
        seed = env_int("SOUPSEARCH_ZOO_SEED", 0, "the zoo's training seed")
    return replace(RECIPES[variant], seed=seed)
