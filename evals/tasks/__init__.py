"""The bundled tasks: lm-eval task YAMLs over local JSONL that ships with the package.

lm-eval resolves ``data_files`` against the working directory, so ``include_path()`` writes a
copy of these YAMLs with absolute data paths into the cache; pass it to
``TaskManager(include_path=...)`` or to ``lm_eval --include_path``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml

from atomic import atomic_folder
from evals.tasks.synthetic import GENERATORS, eval_items, read_jsonl, write_jsonl
from user_input import UserError

TASK_DIR = Path(__file__).parent
DATA_DIR = TASK_DIR / "data"
BUNDLED_TASKS = tuple(GENERATORS)


def cache_root() -> Path:
    """$SOUPSEARCH_CACHE, else ~/.cache/soupsearch; UserError if it is there but not a folder."""
    said = os.environ.get("SOUPSEARCH_CACHE", "").strip()
    root = Path(said) if said else Path.home() / ".cache" / "soupsearch"
    if root.exists() and not root.is_dir():
        raise UserError(f"SOUPSEARCH_CACHE={str(root)!r}: not a folder (the cache of tasks and zoos)")
    return root


def data_file(task: str) -> Path:
    return DATA_DIR / f"{task}.jsonl"


def write_data() -> None:
    """Regenerate the committed JSONL from the seeded generators."""
    DATA_DIR.mkdir(exist_ok=True)
    for task in BUNDLED_TASKS:
        write_jsonl(data_file(task), eval_items(task))


def load_items(task: str) -> list[dict[str, str]]:
    return read_jsonl(data_file(task))


def include_path() -> Path:
    """A folder of the bundled task YAMLs with absolute ``data_files``, built once per content."""
    sources = sorted(TASK_DIR.glob("*.yaml")) + [TASK_DIR / "_default_template_yaml"]
    digest = hashlib.sha256()
    for path in sources + [data_file(t) for t in BUNDLED_TASKS]:
        digest.update(path.name.encode() + path.read_bytes())
    target = cache_root() / "tasks" / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    try:
        with atomic_folder(target) as staging:
            for path in sources:
                text = path.read_text()
                if path.suffix == ".yaml":
                    config = yaml.safe_load(text)
                    files = config["dataset_kwargs"]["data_files"]
                    config["dataset_kwargs"]["data_files"] = {k: str(TASK_DIR / v) for k, v in files.items()}
                    text = yaml.safe_dump(config, sort_keys=False)
                (staging / path.name).write_text(text)
    except OSError:
        if not target.is_dir():
            raise
        # another process won the race, with identical content
    return target
