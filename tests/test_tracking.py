"""MLflow plumbing: the git_commit tag, and creating a new local store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

import experiments
from experiments import tracking


def _code_commit() -> str:
    repo = Path(experiments.__file__).resolve().parents[1]
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("the project is not a git checkout here")
    return out.stdout.strip()


def test_git_commit_is_the_codes_commit_from_any_working_directory(tmp_path, monkeypatch):
    """The tag names the commit of the code that ran, wherever the run was started from (a
    results folder, another repository), not that folder's repository."""
    expected = _code_commit()
    elsewhere = tmp_path / "other_repo"
    elsewhere.mkdir()
    subprocess.run(["git", "init", "-q", str(elsewhere)], check=True)
    subprocess.run(["git", "-C", str(elsewhere), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "other"], check=True)
    for cwd in (tmp_path, elsewhere):
        monkeypatch.chdir(cwd)
        assert tracking.git_commit() == expected


def test_runs_started_together_on_a_new_store_all_get_it(tmp_path):
    """MLflow builds a new SQLite store's tables on first use, without a lock: four runs
    started at once on a new store all died in its migrations (and broke the store) before
    ``configure`` took a file lock around it."""
    code = ("from experiments import tracking; tracking.configure(); "
            "from mlflow.tracking import MlflowClient; "
            "print(len(MlflowClient().search_experiments()))")
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default: ./mlruns/mlflow.db
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for returncode, out, err in results:
        assert returncode == 0, err[-2000:]
        assert out.strip() == "1"  # the Default experiment, in a working store
