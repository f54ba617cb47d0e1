"""Run several command lines of one console script in one interpreter, one after another, as the
script runs one: ``ENTRY(argv)`` (``search.cli:main`` unless named), its return value or
``SystemExit`` as the exit code. Each case gets its own working folder and its own stderr at the
file-descriptor level, so that what libraries write there directly is caught too. It saves the
interpreter's start and the imports of torch and the libraries for every case but the first.

    python tests/cli_batch.py RESULTS.json [MODULE:FUNCTION] < CASES.json    # CASES: [[argv, cwd], ...]
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SOUPSEARCH = "search.cli:main"


def run_case(entry: str, argv: list[str], cwd: str) -> dict:
    module, function = entry.split(":")
    main = getattr(importlib.import_module(module), function)
    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's refusals, click's every exit
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        except Exception:  # what escapes the entry point fails this case, not the batch
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return {"code": code, "stderr": err.read().decode(errors="replace"), "seconds": time.monotonic() - started}


def run_batch(
    cases: list[tuple[list[str], Path]], env: dict, entry: str = SOUPSEARCH, timeout: int = 600
) -> list[dict]:
    """``cases`` (argv, working folder) through this script in one interpreter of their own: each
    case's exit code, stderr and seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch) / "results.json"
        try:
            done = subprocess.run(
                [sys.executable, __file__, str(results), entry],
                cwd=scratch,
                env=env,
                input=json.dumps([[argv, str(cwd)] for argv, cwd in cases]),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as hung:
            started = [line for line in (hung.stdout or b"").decode().splitlines() if line.startswith("case: ")]
            raise AssertionError(f"no result after {timeout} s; the last case started: {started[-1:]}") from None
        # what the interpreter writes as it exits (threads, atexit) would follow a case's last line
        assert done.returncode == 0 and results.is_file() and "Traceback" not in done.stderr, done.stderr[-3000:]
        return json.loads(results.read_text())


if __name__ == "__main__":
    entry = sys.argv[2] if len(sys.argv) > 2 else SOUPSEARCH
    cases = json.load(sys.stdin)
    results = []
    for argv, cwd in cases:
        print("case:", json.dumps(argv), flush=True)  # the last such line names a case that hangs
        results.append(run_case(entry, argv, cwd))
    with open(sys.argv[1], "w") as out:
        json.dump(results, out)
