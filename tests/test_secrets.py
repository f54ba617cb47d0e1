"""Passwords in storage and tracking URLs: read from the environment, masked in every message and
MLflow record."""

from pathlib import Path

import pytest
import yaml

from search.cli import main
from search.experiment import load_experiment
from search.urls import driver_hint, masked
from tests.search_helpers import write_experiment

PASSWORD = "s3cr%40t-hunter2"  # percent-encoded "@": drivers may print either form


@pytest.mark.parametrize(
    "url, shown",
    [
        (f"postgresql://soup:{PASSWORD}@db.example:5432/soup", "postgresql://soup:***@db.example:5432/soup"),
        (
            f"postgresql+psycopg://soup:{PASSWORD}@db/soup?sslmode=require",
            "postgresql+psycopg://soup:***@db/soup?sslmode=require",
        ),
        (f"https://me:{PASSWORD}@mlflow.example/", "https://me:***@mlflow.example/"),
        ("postgresql://soup@db/soup", "postgresql://soup@db/soup"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        (".soupsearch/journal.log", ".soupsearch/journal.log"),
    ],
)
def test_urls_show_no_password(url, shown):
    assert masked(url) == shown


def test_a_message_loses_the_password_in_either_form():
    url = f"postgresql://soup:{PASSWORD}@db/soup"
    said = masked(url, "password authentication failed for soup (s3cr@t-hunter2) at " + url)
    assert "hunter2" not in said and said.endswith("postgresql://soup:***@db/soup")


def test_a_missing_postgresql_driver_names_the_extra():
    try:
        try:
            raise ModuleNotFoundError("No module named 'psycopg'", name="psycopg")
        except ImportError as missing:
            raise ImportError("Failed to import DB access module for the specified storage URL.") from missing
    except ImportError as wrapped:  # how Optuna reports it
        assert driver_hint(wrapped) == " (install the PostgreSQL driver with `pip install soupsearch[postgres]`)"
    assert driver_hint(ModuleNotFoundError("No module named 'numpy'", name="numpy")) == ""


def test_urls_come_from_the_environment_and_are_masked_in_every_dump(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUP_TEST_STORAGE", f"postgresql://soup:{PASSWORD}@db/soup")
    monkeypatch.setenv("SOUP_TEST_DIR", str(tmp_path))
    experiment = load_experiment(
        write_experiment(tmp_path, storage="${SOUP_TEST_STORAGE}", tracking_uri="sqlite:///${SOUP_TEST_DIR}/mlflow.db")
    )
    assert experiment.storage == f"postgresql://soup:{PASSWORD}@db/soup"
    assert experiment.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    dumped = experiment.model_dump(mode="json", by_alias=True)
    assert dumped["storage"] == "postgresql://soup:***@db/soup" and PASSWORD not in yaml.safe_dump(dumped)


def test_a_study_records_no_password_anywhere(pico_zoo, tmp_path, monkeypatch, capsys):
    """The experiment names a PostgreSQL storage with a password (from the environment); the run
    itself uses a journal. No param, tag, metric name or artifact of any run holds the password."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOUP_TEST_PASSWORD", PASSWORD)
    path = write_experiment(
        tmp_path, storage="postgresql://soup:${SOUP_TEST_PASSWORD}@127.0.0.1:1/soup", study={"trials": 1}
    )
    assert main(["run", str(path), "--storage", str(tmp_path / "journal.log")]) == 0
    assert main(["run", str(path)]) == 2  # the experiment's own storage: refused, password masked
    said = capsys.readouterr()
    assert "soup:***@127.0.0.1:1" in said.err and PASSWORD not in said.out + said.err

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pico-slerp").experiment_id])
    assert len(runs) >= 4  # the study, 2 baselines, 1 trial
    seen = []
    for run in runs:
        record = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
        assert not [item for item in record if PASSWORD in str(item)], run.info.run_name
        folders = [None]
        while folders:
            for artifact in client.list_artifacts(run.info.run_id, folders.pop()):
                if artifact.is_dir:
                    folders.append(artifact.path)
                    continue
                data = Path(
                    client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path / "dl"))
                ).read_bytes()
                assert PASSWORD.encode() not in data and b"s3cr@t" not in data, artifact.path
                seen.append(artifact.path)
    assert "experiment.yaml" in seen
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    logged = yaml.safe_load(
        Path(client.download_artifacts(parent.info.run_id, "experiment.yaml", str(tmp_path / "dl"))).read_text()
    )
    assert logged["storage"] == "postgresql://soup:***@127.0.0.1:1/soup"
