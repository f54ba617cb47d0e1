"""MLflow records: one parent run per study, one nested run per trial and per baseline parent
(MLflow is imported lazily)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from atomic import created_once
from search.urls import driver_hint, masked
from user_input import UserError

if TYPE_CHECKING:
    from evals.results import EvalResult

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS = "mlartifacts"  # beside a sqlite store, one folder per experiment: copy the two together
STUDY_TAG = "soupsearch.study"
BASELINE_TAG = "soupsearch.baseline"
STATE_TAG = "soupsearch.state"  # COMPLETE, PRUNED, FAIL (Optuna's words) or BASELINE
VIEW = "soupsearch"  # the runs-table view every experiment carries; ``runs_url`` opens it
VIEW_TAG = f"mlflow.sharedViewState.{VIEW}"  # where MLflow's UI reads a shared view
# MLflow 3's experiment kind for model training (its UI lists runs, not GenAI traces), and a view
# of the runs table in MLflow's shared-view format: the default columns and the best first
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    VIEW_TAG: json.dumps(
        {
            "selectedColumns": [
                "metrics.`search/objective`",
                "metrics.`fidelity`",
                "params.`method`",
                f"tags.`{STATE_TAG}`",
            ],
            "orderByKey": "metrics.`search/objective`",
            "orderByAsc": False,
        }
    ),
}


class TrackingError(UserError):
    """The tracking URI cannot be reached or written; the message names it, password masked."""


def absolute(uri: str | None) -> str:
    """MLflow caches a store per URI string: a relative sqlite path would stick to the first folder."""
    uri = uri or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


class Tracker:
    """MlflowClient calls only: explicit run ids stay correct across threads and worker processes."""

    def __init__(self, uri: str | None, experiment: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri = absolute(uri)
        store = Path(self.uri.removeprefix("sqlite:///")) if self.uri.startswith("sqlite:///") else None
        if store is not None:
            _check_sqlite(store, self.uri)
        self.experiment = experiment
        try:
            if store is not None and not store.exists():
                # MLflow builds its schema in dozens of commits: a kill midway would leave a store that
                # no later run can open, so it is built beside the target and linked into place whole
                with created_once(store) as partial:
                    MlflowClient(tracking_uri=f"sqlite:///{partial}").search_experiments(max_results=1)
            self.client = MlflowClient(tracking_uri=self.uri)
            # one quick try: MLflow retries a server it cannot reach for minutes before it gives up
            with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
                # creates the sqlite schema now, once, before any trial or worker writes to it
                self.client.search_experiments(max_results=1)
        except Exception as problem:  # noqa: BLE001 -- any store failure is the URI's fault here
            said = masked(self.uri, " ".join(str(problem).split()))
            raise TrackingError(
                f"tracking URI {masked(self.uri)}: {type(problem).__name__}: {said}{driver_hint(problem)}"
            ) from None

    @functools.cached_property
    def experiment_id(self) -> str:
        """Created on first use, so a study that fails to start leaves no MLflow experiment; with a
        sqlite store its artifacts go to ``mlartifacts/EXPERIMENT`` beside it."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found:
            experiment_id = found.experiment_id
        else:
            store = self.uri.removeprefix("sqlite:///")
            artifacts = str(Path(store).parent / ARTIFACTS / self.experiment) if store != self.uri else None
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=artifacts)
        for key, value in EXPERIMENT_TAGS.items():  # also on experiments that an older soupsearch created
            self.client.set_experiment_tag(experiment_id, key, value)
        return experiment_id

    def parent_run(self, study: str) -> str:
        """The study's one parent run: found by tag on resume, created otherwise."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{study}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if runs:
            return runs[0].info.run_id
        return self.client.create_run(self.experiment_id, run_name=study, tags={STUDY_TAG: study}).info.run_id

    def trial_run(self, parent: str, study: str, number: int, name: str | None = None) -> str:
        """``name`` (default ``trial-NUMBER``) is what the runs table shows."""
        return self._child(
            parent, name or f"trial-{number}", {"soupsearch.trial": str(number), "soupsearch.trial_of": study}
        )

    def baseline_run(self, parent: str, study: str, alias: str) -> str:
        """A parent model scored as it is, beside the trials."""
        return self._child(
            parent, f"baseline-{alias}", {BASELINE_TAG: alias, "soupsearch.baseline_of": study, STATE_TAG: "BASELINE"}
        )

    def _child(self, parent: str, name: str, tags: dict[str, str]) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        return self.client.create_run(
            self.experiment_id, run_name=name, tags={MLFLOW_PARENT_RUN_ID: parent, **tags}
        ).info.run_id

    def log(
        self,
        run: str,
        params: dict | None = None,
        metrics: dict | None = None,
        texts: dict[str, str] | None = None,
        dicts: dict[str, dict] | None = None,
        step: int = 0,
    ) -> None:
        """``step``: the x axis of the metrics' history in MLflow (a trial's: items scored per task)."""
        from mlflow.entities import Metric, Param

        now = _now_ms()
        self.client.log_batch(
            run,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
        )
        for path, text in (texts or {}).items():
            self.client.log_text(run, text, path)
        for path, record in (dicts or {}).items():
            self.client.log_dict(run, record, path)

    def tag(self, run: str, key: str, value: str) -> None:
        self.client.set_tag(run, key, value)

    def end(self, run: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run, status)

    def end_if_running(self, run: str, status: str = "FINISHED") -> None:
        """``end`` for a run that a killed process left RUNNING; nothing for an ended one."""
        if self.client.get_run(run).info.status == "RUNNING":
            self.end(run, status)

    def reopen(self, run: str) -> None:
        """A finished parent run back to RUNNING while a resumed study works; ``end`` closes it again."""
        if self.client.get_run(run).info.status != "RUNNING":
            self.client.update_run(run, status="RUNNING")


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """``values`` set in os.environ inside the block; each variable as it was (or unset) after it.
    MLflow reads its HTTP settings from the environment at each request."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_sqlite(path: Path, uri: str) -> None:
    """MLflow retries a sqlite store it cannot open for about 100 s: refuse at once a missing or
    read-only folder or file, or a file that is no database."""
    import contextlib
    import sqlite3
    import tempfile

    if not path.parent.is_dir():
        raise TrackingError(f"tracking URI {masked(uri)}: folder {path.parent} does not exist")
    try:
        tempfile.TemporaryFile(dir=path.parent).close()  # sqlite writes its journal beside the store
        if path.exists():
            if not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is read-only")
            with contextlib.closing(sqlite3.connect(path)) as store:
                store.execute("PRAGMA schema_version")  # reads the header: "file is not a database"
    except (OSError, sqlite3.Error) as problem:
        raise TrackingError(f"tracking URI {masked(uri)}: {type(problem).__name__}: {problem}") from None


def split_metrics(split: str, objective: float, result: EvalResult) -> dict[str, float]:
    """One split's scores as every run names them: ``SPLIT/objective`` and ``SPLIT/TASK/METRIC...``."""
    return {f"{split}/objective": objective} | {f"{split}/{key}": value for key, value in result.metrics().items()}


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def runs_url(ui: str, experiment_id: str) -> str:
    """An experiment's runs table in MLflow's UI, in our view; MLflow 3.17 opens every experiment on
    its GenAI overview, whatever the experiment's kind, unless the link asks for model training."""
    return f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW}"


def dashboard(uri: str | None, port: int, server_logs: bool = False) -> int:
    """MLflow's own UI over this store, on 127.0.0.1 only (the store holds local paths), until it
    stops: says what it does while MLflow starts, then prints each experiment's runs-table URL.
    MLflow's own messages go to a log file unless ``server_logs``."""
    import subprocess
    import sys
    import tempfile
    import time

    from search import output

    uri = absolute(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(f"tracking URI {masked(uri)}: no store there yet; run a study first")
    ui = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]  # MLflow's default of four workers starts four times slower
    if not server_logs:
        command += ["--uvicorn-opts", "--log-level warning"]
    # MLflow's job runner and its queues, seven processes, serve GenAI features that a search never uses
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (
        None
        if server_logs
        else tempfile.NamedTemporaryFile("w", prefix="soupsearch-mlflow-", suffix=".log", delete=False)
    )
    output.say(
        f"starting MLflow's UI on {ui} for {masked(uri)} (seconds; a minute on a busy machine)"
        + (f"; its messages go to {log.name}" if log else "")
    )
    started = time.monotonic()
    server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        while not _answers(f"{ui}/health"):
            if server.poll() is not None:
                said = Path(log.name).read_text().strip().splitlines()[-5:] if log else ["(above)"]
                print(
                    f"soupsearch: MLflow's UI exited with code {server.returncode} before it answered; "
                    f"it said: {' | '.join(said)}",
                    file=sys.stderr,
                )
                return server.returncode or 1
            time.sleep(0.25)
        output.say(f"MLflow answered after {time.monotonic() - started:.0f} s; Ctrl-C stops it")
        print(f"MLflow UI: {ui}")
        for name, experiment_id in _experiments(ui):
            print(f"{name}: {runs_url(ui, experiment_id)}")
        sys.stdout.flush()
        return server.wait()
    except KeyboardInterrupt:
        server.wait()  # Ctrl-C reached MLflow too, in the same process group: let it shut down
        raise


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _experiments(ui: str) -> list[tuple[str, str]]:
    """(name, id) of every experiment in the store that soupsearch made, through the UI's own API."""
    import urllib.request

    request = urllib.request.Request(
        f"{ui}/api/2.0/mlflow/experiments/search",
        data=json.dumps({"max_results": 1000}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        found = json.load(answer).get("experiments", [])
    return [(e["name"], e["experiment_id"]) for e in found if any(t["key"] == VIEW_TAG for t in e.get("tags", []))]
