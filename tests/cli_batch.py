"""Run several soupsearch command lines in one interpreter, one after another, as the console script
runs one: ``search.cli.main(argv)``, its return value or ``SystemExit`` as the exit code. Each case
gets its own working folder and its own stderr at the file-descriptor level, so that what libraries
write there directly is caught too. It saves the interpreter's start and the imports of torch,
lm-eval and MLflow for every case but the first.

    python tests/cli_batch.py RESULTS.json < CASES.json    # CASES: [[argv, cwd], ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def run_case(argv: list[str], cwd: str) -> dict:
    from search.cli import main

    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's refusals
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return {"code": code, "stderr": err.read().decode(errors="replace"), "seconds": time.monotonic() - started}


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    results = []
    for argv, cwd in cases:
        print("case:", json.dumps(argv), flush=True)  # the last such line names a case that hangs
        results.append(run_case(argv, cwd))
    with open(sys.argv[1], "w") as out:
        json.dump(results, out)
