"""MLflow records: one parent run per study, one nested run per trial (MLflow is imported lazily)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STUDY_TAG = "soupsearch.study"


class TrackingError(RuntimeError):
    """The tracking URI cannot be reached or written; the message names it."""


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
        if self.uri.startswith("sqlite:///"):
            parent = Path(self.uri.removeprefix("sqlite:///")).parent
            if not parent.is_dir():
                raise TrackingError(f"tracking URI {uri}: folder {parent} does not exist")
        self.experiment = experiment
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            # creates the sqlite schema now, once, before any trial or worker writes to it
            self.client.search_experiments(max_results=1)
        except Exception as problem:  # noqa: BLE001 -- any store failure is the URI's fault here
            raise TrackingError(f"tracking URI {self.uri}: {type(problem).__name__}: {problem}") from None

    @functools.cached_property
    def experiment_id(self) -> str:
        """Created on first use, so a study that fails to start leaves no MLflow experiment."""
        found = self.client.get_experiment_by_name(self.experiment)
        return found.experiment_id if found else self.client.create_experiment(self.experiment)

    def parent_run(self, study: str) -> str:
        """The study's one parent run: found by tag on resume, created otherwise."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}'",
                                       max_results=1, order_by=["attributes.start_time ASC"])
        if runs:
            return runs[0].info.run_id
        return self.client.create_run(self.experiment_id, run_name=study, tags={STUDY_TAG: study}).info.run_id

    def trial_run(self, parent: str, study: str, number: int) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {MLFLOW_PARENT_RUN_ID: parent, "soupsearch.trial": str(number), "soupsearch.trial_of": study}
        return self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags=tags).info.run_id

    def log(self, run: str, params: dict | None = None, metrics: dict | None = None,
            texts: dict[str, str] | None = None, dicts: dict[str, dict] | None = None) -> None:
        from mlflow.entities import Metric, Param

        now = _now_ms()
        self.client.log_batch(run, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                              params=[Param(k, str(v)) for k, v in (params or {}).items()])
        for path, text in (texts or {}).items():
            self.client.log_text(run, text, path)
        for path, record in (dicts or {}).items():
            self.client.log_dict(run, record, path)

    def tag(self, run: str, key: str, value: str) -> None:
        self.client.set_tag(run, key, value)

    def end(self, run: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run, status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def dashboard_command(uri: str | None, port: int) -> list[str]:
    """MLflow's own UI over this store, on 127.0.0.1 only (the store holds local paths)."""
    import sys

    uri = absolute(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(f"tracking URI {uri}: no store there yet; run a study first")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
            "--port", str(port)]
