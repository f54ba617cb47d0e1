"""Files and folders that appear whole or not at all: filled beside their target, then renamed into place.

A killed process leaves at most a hidden ``.NAME.partial-*`` entry beside the target, never a
half-written target; ``clear_leftovers`` removes such entries (the zoo's build calls it under its lock,
a merge or export before it writes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _partial_file(target: Path) -> Path:
    """A staging file beside ``target`` that no other writer, process or thread, names the same."""
    return target.with_name(f"{_partial_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """A fresh folder beside ``target`` to fill; it becomes ``target`` when the block ends, and is
    removed if the block raises. An existing ``target`` is removed first with ``replace``; without
    it, only an empty one is (``OSError`` otherwise, the staging folder removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=_partial_prefix(target)))
    try:
        yield staging
        staging.chmod(_new_folder_mode(staging))  # mkdtemp's folder is private; the target gets a new folder's
        if target.exists():
            shutil.rmtree(target) if replace else target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def created_once(target: Path) -> Iterator[Path]:
    """A path beside ``target`` at which to create a file; it becomes ``target`` when the block ends,
    unless another process made ``target`` meanwhile (the first one wins, the others are dropped)."""
    partial = _partial_file(target)
    try:
        yield partial
        try:
            os.link(partial, target)  # fails if ``target`` exists: no process replaces another's
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: the narrow race of a rename remains
            if not target.exists():
                os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _new_folder_mode(where: Path) -> int:
    """The mode ``mkdir`` gives a folder here (0o777 less the umask), read without changing the umask."""
    probe = Path(tempfile.mkdtemp(dir=where))
    probe.rmdir()
    probe.mkdir()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.rmdir()


def clear_leftovers(target: Path) -> None:
    """Remove the staging entries that killed writers of ``target`` left; call it under a lock."""
    for stale in target.parent.glob(_partial_prefix(target) + "*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, with readers seeing the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_file(path)
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
