import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pico_zoo():
    """The pico zoo, built once into the user's cache (about 30 s) and verified on every run."""
    from zoo.build import open_zoo

    return open_zoo("pico", progress=False)
