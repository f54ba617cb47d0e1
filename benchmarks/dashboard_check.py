"""Does `soupsearch dashboard` open a study on its runs table? A check in a real browser.

    .venv/bin/python benchmarks/dashboard_check.py                       # writes docs/dashboard.png
    .venv/bin/python benchmarks/dashboard_check.py --folder DIR --screenshot /tmp/dashboard.png

Runs a small study on the pico zoo in a scratch folder (or uses the finished study in --folder),
starts `soupsearch dashboard` there, loads the experiment URL that it prints in headless Chromium
(Debian's `chromium`: `apt-get install chromium`), checks that the page is MLflow's runs table and
lists the study's parent run, every trial and every baseline, and keeps a screenshot of it.
tests/test_run_output.py runs it (marked slow).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.search_helpers import runs_in, write_experiment  # noqa: E402

SOUPSEARCH = str(Path(sys.executable).parent / "soupsearch")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
# a fresh profile and no background traffic: the page sees only the dashboard
CHROMIUM = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1800,900",
    "--virtual-time-budget=60000",
]  # MLflow's page reads the shared view after the runs


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _chromium(url: str, profile: Path, *what: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    done = subprocess.run(
        [browser, *CHROMIUM, f"--user-data-dir={profile}", *what, url], capture_output=True, text=True, timeout=300
    )
    return done.stdout


def check(folder: Path, screenshot: Path) -> list[str]:
    """The names of the runs that the runs table links to, once every run of the study is among them."""
    _, runs = runs_in(folder)
    expected = {run.info.run_id: run.info.run_name for run in runs}
    dashboard = subprocess.Popen(
        [SOUPSEARCH, "dashboard", "--port", str(_free_port())],
        cwd=folder,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = None
        while url is None:
            line = dashboard.stdout.readline()
            if not line:
                raise SystemExit(f"the dashboard exited with code {dashboard.wait()} before printing a URL")
            if line.startswith("pico-slerp: "):
                url = line.removeprefix("pico-slerp: ").strip()
        with tempfile.TemporaryDirectory() as profile:
            page = _chromium(url, Path(profile), "--dump-dom")
        with tempfile.TemporaryDirectory() as profile:
            _chromium(url, Path(profile), f"--screenshot={screenshot}")
    finally:
        os.killpg(dashboard.pid, signal.SIGTERM)
        dashboard.wait(timeout=60)
    linked = dict(re.findall(r'href="#/experiments/\d+/runs/([0-9a-f]{32})"[^>]*>(?:<[^>]+>)*([^<]*)<', page))
    if "Run Name" not in page or linked != expected:
        raise SystemExit(
            f"the runs table lists {sorted(linked.values())}, not the study's runs {sorted(expected.values())}"
        )
    return sorted(linked.values())


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument(
        "--folder",
        type=Path,
        help="a folder where `soupsearch run` finished the pico study (default: run one in a scratch folder)",
    )
    options.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = options.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch)
        if args.folder is None:
            # bare sums, where pico's models differ, and halving, so that the table shows a pruned trial too
            path = write_experiment(
                folder,
                evaluation={"tasks": ["tiny_addition"], "fidelity": [4, 8], "select_limit": 8, "test_limit": 8},
                study={"sampler": "tpe", "pruner": "successive_halving", "trials": 5},
            )
            subprocess.run([SOUPSEARCH, "run", str(path)], cwd=folder, env=ENV, check=True, stdout=subprocess.DEVNULL)
        started = time.monotonic()
        shown = check(folder, args.screenshot.resolve())
    print(f"runs table lists {', '.join(shown)} ({time.monotonic() - started:.0f} s); screenshot {args.screenshot}")


if __name__ == "__main__":
    main()
