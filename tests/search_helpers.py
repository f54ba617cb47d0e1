"""Small pico-zoo experiments for the search tests."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml

PICO_SLERP = {
    "name": "pico-slerp",
    "models": {"general": "zoo:pico/general", "math": "zoo:pico/specialist-gsm8k"},
    "base_model": "general",
    "dtype": "float32",
    "space": {"slerp": {"anchors": 2}},
    "warm_starts": [{"slerp/t/self_attn": [0, 1], "slerp/t/mlp": [1, 0], "slerp/t/rest": [0.5, 0.5]}],
    "evaluation": {"tasks": ["tiny_gsm8k"], "fidelity": [8], "select_limit": 8, "test_limit": 8},
    "study": {"sampler": "tpe", "trials": 3},
    "device": "cpu",
}


def write_experiment(folder: Path, experiment: dict = PICO_SLERP, name: str = "exp.yaml", **changes) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({**experiment, **changes}, sort_keys=False))
    return path


def study_in(folder: Path, name: str = "pico-slerp") -> optuna.Study:
    """The study that `soupsearch run` keeps in ``folder``'s default journal."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(folder / ".soupsearch" / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def runs_in(folder: Path, experiment: str = "pico-slerp"):
    """The MLflow client on ``folder``'s default store, and every run of ``experiment``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id])
