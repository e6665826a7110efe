"""Shared fixtures: a pre-initialised MLflow SQLite store copied per test (creating the
tables takes seconds; copying a file takes milliseconds), and the environment that points
the CLI at it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# The servers that scripts/servers.sh starts (CI: .ci/services), for tests marked postgres.
PG = os.environ.get("CVAE_TEST_PG_URL")
MLFLOW = os.environ.get("CVAE_TEST_MLFLOW_URL")
NEEDS_SERVERS = [
    pytest.mark.postgres,
    pytest.mark.skipif(not (PG and MLFLOW), reason=(
        "CVAE_TEST_PG_URL / CVAE_TEST_MLFLOW_URL are unset: start the servers with "
        "`eval \"$(bash scripts/servers.sh start --auth)\"` (CI does it in .ci/services)")),
]


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_store(tmp_path, mlflow_template_db, monkeypatch) -> str:
    """A fresh MLflow store in tmp_path/mlruns; cwd is tmp_path so reports land there too."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    shutil.copy(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: this checkout importable, one thread (determinism
    and speed on a shared 2-core machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster, and immune to a busy machine's OpenMP stalls."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64(monkeypatch):
    """Run the real training code in float64: frames are scaled to float64 (``to_unit`` is
    the only place that fixes float32); the test builds its models in float64."""
    import torch

    import cvae.packed
    import cvae.train

    def to_unit(x):
        return x.double().div_(255.0) if x.dtype == torch.uint8 else x.double()

    monkeypatch.setattr(cvae.train, "to_unit", to_unit)
    monkeypatch.setattr(cvae.packed, "to_unit", to_unit)
    return torch.float64
