"""MLflow plumbing that needs no tracking store: the git_commit tag."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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
