"""The servers that ``scripts/servers.sh start --auth`` runs (CI: ``.ci/services``): the MLflow
server refuses requests without valid credentials, no password is on any process's command
line, and the state folder (settings, logs, artifacts) is readable by its owner only.

    eval "$(bash scripts/servers.sh start --auth)"
    python -m pytest tests/test_servers.py -q
"""

from __future__ import annotations

import base64
import os
import stat
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import MLFLOW, NEEDS_SERVERS, PG

USER = os.environ.get("MLFLOW_TRACKING_USERNAME")
PASSWORD = os.environ.get("MLFLOW_TRACKING_PASSWORD")
STATE = os.environ.get("CVAE_SERVICES_DIR")

pytestmark = NEEDS_SERVERS


@pytest.fixture(autouse=True)
def _locked():
    """Servers that run are checked: started without --auth, these tests fail, not skip."""
    assert USER and PASSWORD and STATE, (
        "no MLflow credentials or state folder in the environment: the servers were started "
        "without --auth (or by an older scripts/servers.sh)")


def _status(url: str, credentials: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials is not None:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mlflow_server_refuses_requests_without_valid_credentials():
    url = f"{MLFLOW}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(url) == 401
    assert _status(url, (USER, f"not-{PASSWORD}")) == 401
    assert _status(url, (USER, PASSWORD)) == 200
    assert _status(f"{MLFLOW}/health") == 200  # what clients probe before they start


def _command_lines() -> dict[int, str]:
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:  # the process ended while we looked
                continue
    return {pid: line.decode(errors="replace") for pid, line in lines.items()}


def test_no_password_on_any_command_line():
    lines = _command_lines()
    servers = [line for line in lines.values() if STATE in line]
    # The MLflow server (--artifacts-destination) and PostgreSQL (-D pgdata) name the folder.
    assert any("mlflow server" in line for line in servers), servers
    assert any("pgdata" in line for line in servers), servers
    for secret in (PASSWORD, urlsplit(PG).password):
        assert secret and len(secret) >= 12
        leaking = sorted(pid for pid, line in lines.items() if secret in line)
        assert leaking == [], "a password is on these processes' command lines"  # not shown


def test_state_folder_and_artifacts_are_readable_by_their_owner_only():
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=MLFLOW)  # credentials from the environment
    experiment = client.create_experiment(f"test-modes-{uuid.uuid4().hex[:8]}")
    try:
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "weights", "checkpoints/last.txt")
        client.set_terminated(run.info.run_id)
        state = Path(STATE)
        assert stat.S_IMODE(state.stat().st_mode) == 0o711  # postgres traverses it to pgdata
        files = [state / name for name in ("settings", "env", "basic_auth.ini", "mlflow.log")]
        artifacts = [state / "artifacts", *(state / "artifacts").rglob("*")]
        assert any(path.name == "last.txt" for path in artifacts)
        for path in files + artifacts:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    finally:
        client.delete_experiment(experiment)
