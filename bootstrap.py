#!/usr/bin/env python3
"""Set up a virtual environment from the project's own files, then run the main job or the tests.

    python3 bootstrap.py run    # install, then search and export experiments/tiny_slerp.yaml (tiny zoo)
    python3 bootstrap.py test   # install, check format and lint (ruff), then run the test suite (what .ci/run runs)

Needs only Python >= 3.10 and pip. On a machine without an NVIDIA GPU the CPU build of torch is
installed first, so that the project's plain ``torch>=`` requirement does not pull a CUDA build.

pip writes no bytecode (``--no-compile``): compiling every installed module costs more than the
job's own first imports, which write the bytecode of the modules the job uses. So the job runs with
bytecode writing on, whatever PYTHONDONTWRITEBYTECODE says (docs/performance.md, start-up).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SOUPSEARCH_VENV", ROOT / ".venv"))
CPU_TORCH = "torch==2.13.0"  # the CPU wheel these machines carry on local disk


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def venv_python() -> Path:
    if not (VENV / "bin" / "python").exists():
        sh(sys.executable, "-m", "venv", VENV)
    return VENV / "bin" / "python"


def install(python: Path, extras: str) -> None:
    pip = (python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile")
    has_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch and shutil.which("nvidia-smi") is None:
        sh(*pip, CPU_TORCH)
    sh(*pip, "-e", f".[{extras}]")


def main() -> int:
    job = sys.argv[1] if len(sys.argv) > 1 else ""
    if job not in ("run", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    python = venv_python()
    # the tests also drive a PostgreSQL storage and tracking store, through psycopg 3
    install(python, "dev,postgres" if job == "test" else "dev")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the first imports write the bytecode pip did not
    soupsearch = VENV / "bin" / "soupsearch"
    try:
        if job == "run":  # builds the tiny zoo on first use, searches, then exports the winner
            sh(soupsearch, "run", "experiments/tiny_slerp.yaml")
            # a rerun resumes the finished study, so the winner and its export are the same again
            shutil.rmtree(ROOT / "exports" / "tiny-slerp", ignore_errors=True)
            sh(soupsearch, "export", "experiments/tiny_slerp.yaml", "--out", "exports/tiny-slerp")
        else:  # the tree must be clean under the formatter and the linter before the tests run
            sh(VENV / "bin" / "ruff", "format", "--check", ".")
            sh(VENV / "bin" / "ruff", "check", ".")
            sh(python, "-m", "pytest", *sys.argv[2:])
    except subprocess.CalledProcessError as failure:
        return failure.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
