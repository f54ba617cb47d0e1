"""What a command shows while it works, and how much the libraries it drives may say.

Each command has one progress display: a tqdm bar while stdout and stderr are both terminals,
otherwise one plain line per event, so that logs and CI stay readable. Results go to stdout,
progress to stderr. ``--quiet`` leaves results and errors only; ``--verbose`` also lets the
libraries' own INFO logs, warnings and progress bars through (MLflow's database set-up and
artifact downloads, datasets' split generation, transformers' weight loading, Optuna's trials).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL

# the libraries read these once, at import: they must be set before the command imports them
_LIBRARIES_QUIET = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def configure(level: int) -> None:
    """How much this process shows, from here on; a variable the user set is left as it is."""
    global _level
    _level = level
    verbose = level >= VERBOSE
    if not verbose:
        for name, value in _LIBRARIES_QUIET.items():
            os.environ.setdefault(name, value)
    logging.captureWarnings(True)  # the libraries' warnings, as log records that the level below filters
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import optuna.logging  # Optuna resets its own logger's level when first imported, so set it after

    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)


def bars() -> bool:
    """Whether this process shows bars: not --quiet, and both stdout and stderr are terminals."""
    return _level >= NORMAL and sys.stdout.isatty() and sys.stderr.isatty()


def say(line: str) -> None:
    """One event, as a line on stderr above any bar; nothing with --quiet."""
    from tqdm.auto import tqdm

    if _level >= NORMAL:
        tqdm.write(line, file=sys.stderr)


class Progress:
    """One phase of a command (parents scored, trials run): a bar, or a line per step."""

    def __init__(self, desc: str, total: int, unit: str, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self.desc, self.total, self.done = desc, total, initial
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True) if bars() else None

    def update(self, note: str, **postfix: object) -> None:
        """A step done: ``note`` says which (the plain line); ``postfix`` stands beside the bar."""
        self.done += 1
        if self.bar is None:
            say(f"{self.desc} {self.done}/{self.total}: {note}")
            return
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def progress(desc: str, total: int, unit: str, initial: int = 0) -> Iterator[Progress]:
    shown = Progress(desc, total, unit, initial)
    try:
        yield shown
    finally:
        shown.close()
