"""Get, cache and verify the tiny zoo: unpacked from the published weights, or trained from the recipe.

Training depends on the CPU (vector width changes float sums), so the weights that every figure in
docs/ stands on are published in the repository (``published/<variant>/``) with a lock file of the
sha256 of every file (``zoo.lock.json``); the recipe still rebuilds them (``zoo build --train``).
Either way the zoo is assembled in a staging folder and renamed into place only after
``manifest.json`` (sha256 of every file) is written last, so a killed build leaves nothing that
looks finished. ``open_zoo`` re-hashes the files before handing out paths.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from atomic import atomic_folder, atomic_write_text, clear_leftovers
from evals.tasks import cache_root
from evals.tasks.synthetic import eval_items, format_document, training_stream
from search import output
from user_input import UserError
from zoo.recipe import ARITHMETIC, TASKS, WORD_PROBLEMS, Recipe, recipe_for
from zoo.tokenizer import train_tokenizer
from zoo.train import answer_accuracy, mixture, new_model, train

MANIFEST = "manifest.json"
PUBLISHED = Path(__file__).parent / "published"
LOCK = Path(__file__).parent / "zoo.lock.json"


class ZooError(UserError):
    """The zoo cache is missing, partial or corrupted."""


def zoo_dir(recipe: Recipe) -> Path:
    return cache_root() / "zoo" / recipe.folder_name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def verify(folder: Path) -> dict:
    """The manifest of a complete, intact zoo folder; ZooError naming the first bad file."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ZooError(f"{folder}: no {MANIFEST} (missing or interrupted build)")
    manifest = json.loads(manifest_path.read_text())
    for rel, expected in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ZooError(f"{path}: listed in {MANIFEST} but missing")
        if _sha256(path) != expected:
            raise ZooError(f"{path}: checksum mismatch (truncated or modified)")
    return manifest


def read_lock() -> dict:
    return json.loads(LOCK.read_text()) if LOCK.is_file() else {}


def weights_digest(files: dict[str, str]) -> str:
    """One name for a zoo's exact bits: the sha256 of its files' sha256 digests."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def published(recipe: Recipe) -> dict | None:
    """The lock entry of ``recipe``'s published weights, or None if this recipe was never published."""
    entry = read_lock().get(recipe.name)
    if entry is None or entry["folder"] != recipe.folder_name or not (PUBLISHED / recipe.name).is_dir():
        return None
    return entry


def differences(recipe: Recipe, manifest: dict) -> list[str]:
    """Files in which a zoo's manifest differs from the published lock (missing, extra or other bits)."""
    entry = read_lock().get(recipe.name)
    if entry is None or entry["folder"] != recipe.folder_name:
        raise ZooError(
            f"zoo {recipe.folder_name}: not published (zoo.lock.json has "
            f"{entry['folder'] if entry else 'no ' + recipe.name + ' entry'})"
        )
    expected, actual = entry["files"], manifest["files"]
    return sorted(f for f in expected.keys() | actual.keys() if expected.get(f) != actual.get(f))


def open_zoo(name: str = "tiny", build: bool = True, progress: bool = True, seed: int | None = None) -> Path:
    """The verified folder of zoo ``name``: the cache, else the published weights, else a training run."""
    recipe = recipe_for(name, seed)
    try:
        verify(zoo_dir(recipe))
        return zoo_dir(recipe)
    except ZooError:
        if not build:
            raise
    if published(recipe) is not None:
        return unpack_zoo(recipe)
    return build_zoo(recipe, progress=progress, reuse=True)


def unpack_zoo(recipe: Recipe) -> Path:
    """Copy the published weights into the cache; ZooError naming a file that does not match the lock."""
    entry = published(recipe)
    if entry is None:
        raise ZooError(f"zoo {recipe.folder_name}: no published weights in {PUBLISHED}")

    def copy_published(staging: Path) -> None:
        shutil.copytree(PUBLISHED / recipe.name, staging, dirs_exist_ok=True)
        bad = differences(recipe, {"files": _digests(staging)})
        if bad:
            raise ZooError(f"{PUBLISHED / recipe.name}: {', '.join(bad[:5])} do not match {LOCK.name}")

    return _install(recipe, copy_published, "published", reuse=True)


def build_zoo(recipe: Recipe, progress: bool = True, reuse: bool = False) -> Path:
    """Train the zoo from its recipe; with ``reuse``, a zoo another process made meanwhile is kept."""
    return _install(recipe, lambda staging: _train_all(recipe, staging, progress), "trained", reuse)


def _install(recipe: Recipe, fill: Callable[[Path], None], source: str, reuse: bool) -> Path:
    """Fill a staging folder under a per-recipe lock, write its manifest last, then rename it into place."""
    folder = zoo_dir(recipe)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{recipe.folder_name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the first build
        if reuse:
            try:
                verify(folder)
                return folder
            except ZooError as problem:
                if folder.exists():
                    print(f"zoo: {problem}; rebuilding")
        clear_leftovers(folder)  # of a killed build
        with atomic_folder(folder, replace=True) as staging:
            fill(staging)
            manifest = {
                "recipe": asdict(recipe),
                "digest": recipe.digest,
                "models": recipe.models,
                "source": source,
                "torch": torch.__version__,
                "files": _digests(staging),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return folder


def publish(recipe: Recipe) -> Path:
    """Make the cached zoo of ``recipe`` the published one: its files into PUBLISHED, its digests into the lock."""
    if recipe.seed != 0:
        raise ZooError(f"zoo {recipe.folder_name}: only the recipe's own seed (0) is published")
    manifest = verify(zoo_dir(recipe))
    target = PUBLISHED / recipe.name
    with atomic_folder(target, replace=True) as staging:
        shutil.copytree(zoo_dir(recipe), staging, ignore=shutil.ignore_patterns(MANIFEST), dirs_exist_ok=True)
    lock = read_lock() | {
        recipe.name: {
            "folder": recipe.folder_name,
            "torch": manifest["torch"],
            "bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file()),
            "files": manifest["files"],
        }
    }
    atomic_write_text(LOCK, json.dumps(lock, indent=1, sort_keys=True) + "\n")
    return target


def _train_all(recipe: Recipe, out: Path, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar for the whole build, not one per saved shard
    torch.set_num_threads(recipe.threads)
    held_out = {item["question"] for task in TASKS for item in eval_items(task)}
    streams = lambda seed: {t: training_stream(t, recipe.seed * 1000 + seed, held_out) for t in TASKS}
    corpus = mixture(streams(-1), {t: 1.0 for t in TASKS}, recipe.seed, format_document)
    tokenizer = train_tokenizer(itertools.islice(corpus, recipe.tokenizer_documents), recipe.vocab_size)

    # a schedule with a target stops its stable phase early: the bar counts the longest it can take,
    # then drops what a schedule did not use
    longest = lambda schedule: schedule.steps + schedule.decay
    total = (
        longest(recipe.base)
        + sum(longest(recipe.specialist_schedule(t)) for t in TASKS)
        + sum(longest(s) for s in recipe.ingredients)
    )
    # progress: a bar over every step on a terminal, otherwise one line per model
    bar = tqdm(total=total, desc=f"zoo {recipe.name}", unit="step", disable=not (progress and output.bars()))
    made = iter(range(1, len(recipe.models) + 1))  # models made so far, counted as lines show them

    def saved(label: str, how: str) -> None:
        count = next(made)
        if progress and bar.disable:
            output.say(f"zoo {recipe.name} {count}/{len(recipe.models)}: {label} {how}")

    def fit(label: str, model, documents, schedule, probe=None):
        bar.set_postfix_str(label)
        steps, start = 0, time.monotonic()

        def on_step(step: int, loss: float) -> None:
            nonlocal steps
            steps += 1
            bar.update()

        model = train(model, documents, tokenizer, schedule, on_step=on_step, probe=probe)
        bar.total -= longest(schedule) - steps
        saved(label, f"trained ({steps} steps, {time.monotonic() - start:.0f} s)")
        return model

    def save(label: str, model) -> None:
        model.save_pretrained(out / label, safe_serialization=True)
        tokenizer.save_pretrained(out / label)

    # the probes: problems of every task from a stream of their own, none an evaluation item
    problems = {
        t: list(itertools.islice(training_stream(t, recipe.seed * 1000 + 999, held_out), recipe.probe_items))
        for t in TASKS
    }
    solved = lambda model, task: answer_accuracy(model, tokenizer, problems[task])
    base = new_model(recipe.shape, tokenizer, recipe.seed)
    base_probe = lambda model: sum(solved(model, t) for t in TASKS) / len(TASKS)
    fit(
        "base",
        base,
        mixture(streams(0), {t: 1.0 for t in TASKS}, recipe.seed, format_document),
        recipe.base,
        base_probe,
    )
    save("base", base)

    def fine_tune(label: str, stream_seed: int, schedule, shares: dict[str, float], probe=None):
        documents = mixture(streams(stream_seed), shares, stream_seed, format_document)
        return fit(label, copy.deepcopy(base), documents, schedule, probe)

    specialists = {}
    for i, task in enumerate(TASKS, start=1):
        name = f"specialist-{task.removeprefix('tiny_')}"
        schedule, shares = recipe.specialist_schedule(task), recipe.specialist_mixture(task)
        specialists[task] = fine_tune(name, i, schedule, shares, probe=lambda model, task=task: solved(model, task))
        save(name, specialists[task])

    save("general", _general(recipe, base, [specialists[t] for t in ARITHMETIC]))
    saved("general", "merged (DARE-TIES of the arithmetic specialists)")

    for i, schedule in enumerate(recipe.ingredients):
        name = f"ingredient-{i:02d}"
        save(name, fine_tune(name, 100 + i, schedule, recipe.fine_tune_mixture(WORD_PROBLEMS)))
    bar.close()


def _general(recipe: Recipe, base, specialists):
    """DARE-TIES of the arithmetic specialists, the analogue of Merge-14, through mergekit's API."""
    from mergekit.merge_methods.api import merge_state_dicts

    models = {"base": base.state_dict(), **{f"s{i}": s.state_dict() for i, s in enumerate(specialists)}}
    torch.manual_seed(recipe.seed)  # mergekit draws DARE masks from the global RNG
    merged = merge_state_dicts(
        models,
        "dare_ties",
        base="base",
        # normalize divides by the summed weights: the mean of the sparsified task vectors
        parameters={"density": recipe.general_density, "weight": 1.0, "normalize": True},
    )
    general = copy.deepcopy(base)
    general.load_state_dict(merged)
    return general
