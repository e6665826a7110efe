"""Faults on one machine: a killed queue worker, unwritable and unreachable stores, a tracking
server that stops answering mid-run. Every failure is one line on stderr with exit code 2
within a bounded time, leaves nothing RUNNING that cannot be resumed, and loses no
checkpoint; rerunning the same command resumes. Plus the code-base checks on checkpoint
loading."""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, run_cli
from mlflow.tracking import MlflowClient

EPOCH_METRICS = ["train/loss", "train/mse", "train/kl", "train/beta", "train/tfr", "train/lr",
                 "val/loss", "val/psnr"]


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def reference_run(tmp_path: Path, template: Path, *args: str) -> tuple[MlflowClient, str]:
    """The same command uninterrupted, in a store of its own: (client, run id)."""
    db = tmp_path / "reference" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(template, db)
    uri = f"sqlite:///{db}"
    done = run_cli("experiments", "run", *args, cwd=db.parent, MLFLOW_TRACKING_URI=uri)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("runs").experiment_id])
    return client, run.info.run_id


def wait_for_epoch(client: MlflowClient, experiment: str, *, timeout: float = 300) -> str:
    """The id of the first run of ``experiment`` that logged an epoch."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = client.get_experiment_by_name(experiment)
        for run in client.search_runs([found.experiment_id]) if found else []:
            if run.data.tags.get("study_parent") != "1" and \
                    client.get_metric_history(run.info.run_id, "train/loss"):
                return run.info.run_id
        time.sleep(0.2)
    raise AssertionError("no run logged an epoch before the deadline")


def kill_after_first_epoch(command: list[str], cwd: Path, experiment: str) -> str:
    """Start ``command``, SIGKILL it once a run of ``experiment`` has logged an epoch; that
    run's id (the run is left RUNNING: nobody cleaned up)."""
    proc = subprocess.Popen(command, cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        run_id = wait_for_epoch(MlflowClient(), experiment)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return run_id


# ---------------------------------------------------------------------------------------------
# A killed tuning command, rerun
# ---------------------------------------------------------------------------------------------
def test_a_killed_tuning_command_leaves_nothing_running_once_rerun(tracking_store, tmp_path):
    """SIGKILL mid-trial leaves the trial and its MLflow run RUNNING (a journal has no
    heartbeats). The same command again finds the trial's process gone at once, enqueues the
    trial again with the same settings, resumes its run into the same id, and ends with
    every run closed."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    (tmp_path / "tiny.toml").write_text('base = "report_final"\nname = "tiny"\n[data]\n'
                                        "clip_len = 4\npartial = 0.25\n")
    journal = tmp_path / "tune.journal"
    command = [sys.executable, "-m", "studies.tune", "--spec", str(tmp_path / "tiny.toml"),
               "--n-trials", "2", "--profile", "smoke", "--epochs", "4", "--storage",
               str(journal), "--study-name", "killed", "--pruner", "none", "--sampler",
               "random"]
    client = MlflowClient()
    run_id = kill_after_first_epoch(command, tmp_path, "tune-killed")
    assert client.get_run(run_id).info.status == "RUNNING"

    again = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True,
                           text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "its process is gone" in again.stdout and f"resuming run {run_id}" in again.stdout
    experiment = client.get_experiment_by_name("tune-killed").experiment_id
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
    assert "RUNNING" not in statuses.values(), statuses
    assert statuses[run_id] == "FINISHED"
    study = optuna.load_study(study_name="killed",
                              storage=JournalStorage(JournalFileBackend(str(journal))))
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]  # the killed one, then its retry
    (killed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert killed.user_attrs["interrupted"] is True


# ---------------------------------------------------------------------------------------------
# A killed queue worker, restarted
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~2.5 min on 2 cores; test_distributed covers kill + retry + resume in CI
def test_killed_queue_worker_restarted_resumes_with_uninterrupted_metrics(
        tracking_store, tmp_path, mlflow_template_db):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    coordinated = run_cli("studies.queue", "coordinate", "--storage", storage, "--study", "kq",
                          "--ablation", "kl", "--seeds", "0", "--profile", "smoke",
                          "--epochs", "4", cwd=tmp_path)
    assert coordinated.returncode == 0, coordinated.stderr
    worker = [sys.executable, "-m", "studies.queue", "worker", "--storage", storage,
              "--study", "kq", "--device", "cpu", "--heartbeat", "1", "--grace", "2"]
    client = MlflowClient()
    run_id = kill_after_first_epoch(worker, tmp_path, "kq")
    assert client.get_run(run_id).info.status == "RUNNING"
    assert len(history(client, run_id, "train/loss")) < 4

    again = subprocess.run(worker, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=600, check=False)  # the same command again
    assert again.returncode == 0, again.stdout + again.stderr
    assert "enqueued for retry" in again.stdout and f"resuming run {run_id}" in again.stdout
    experiment = client.get_experiment_by_name("kq").experiment_id
    runs = [r for r in client.search_runs([experiment]) if "arm" in r.data.tags]
    assert sorted(r.data.tags["arm"] for r in runs) == ["kl_constant", "kl_cyclical",
                                                         "kl_monotonic"]
    assert all(r.info.status == "FINISHED" for r in runs)

    ref_client, ref_id = reference_run(tmp_path, mlflow_template_db, "kl_cyclical",
                                       "--profile", "smoke", "--epochs", "4")
    for key in EPOCH_METRICS:
        ours = history(client, run_id, key)
        assert [s for s, _ in ours] == [0, 1, 2, 3], key  # nothing missing or logged twice
        assert ours == history(ref_client, ref_id, key), key


# ---------------------------------------------------------------------------------------------
# Stores that cannot be written or reached: one line, exit 2, quickly, no run
# ---------------------------------------------------------------------------------------------
RUN = ["experiments", "run", "kl_cyclical", "--profile", "smoke", "--epochs", "1"]


def _queue(storage: str) -> list[str]:
    return ["studies.queue", "coordinate", "--storage", storage, "--study", "q",
            "--ablation", "kl", "--seeds", "0", "--profile", "smoke", "--epochs", "1"]


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unwritable_tracking_store_fails_in_one_line(tmp_path, where):
    (tmp_path / "a_file").write_text("not a folder")
    path = "/proc/forbidden/mlflow.db" if where == "proc" else f"{tmp_path}/a_file/mlflow.db"
    for command in (RUN, _queue(f"sqlite:///{tmp_path}/optuna.db")):
        started = time.time()
        result = run_cli(*command, cwd=tmp_path, timeout=120,
                         MLFLOW_TRACKING_URI=f"sqlite:///{path}")
        assert result.returncode == 2, result.stderr
        (line,) = error_lines(result.stderr)
        assert str(Path(path).parent) in line
        assert time.time() - started < 60


def test_unwritable_default_output_folder_fails_in_one_line(tmp_path):
    (tmp_path / "mlruns").write_text("a file where the output folder should be")
    env = {k: v for k, v in cli_env().items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", *RUN], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "mlruns" in line


def test_unwritable_optuna_storage_fails_in_one_line(tracking_store, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    for storage in (f"sqlite:///{tmp_path}/a_file/optuna.db", f"{tmp_path}/a_file/queue.log"):
        result = run_cli(*_queue(storage), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        (line,) = error_lines(result.stderr)
        assert "a_file" in line
    assert MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_unreachable_tracking_server_fails_fast_with_password_masked(tmp_path):
    url = f"http://lab:hunter2-secret@127.0.0.1:{closed_port()}"
    for command in (RUN, _queue(f"sqlite:///{tmp_path}/optuna.db")):
        started = time.time()
        result = run_cli(*command, cwd=tmp_path, timeout=120, MLFLOW_TRACKING_URI=url)
        assert result.returncode == 2, result.stderr
        (line,) = error_lines(result.stderr)
        assert "unreachable" in line and "lab:***@127.0.0.1" in line
        assert "hunter2" not in result.stdout + result.stderr
        assert time.time() - started < 60  # MLflow's own retries would take minutes


@pytest.mark.parametrize("command", ["coordinate", "worker", "status"])
def test_unreachable_postgres_fails_in_one_line_with_password_masked(tracking_store, tmp_path,
                                                                     command):
    storage = f"postgresql+psycopg2://cvae:hunter2-secret@127.0.0.1:{closed_port()}/optuna"
    args = {"coordinate": ["--ablation", "kl", "--seeds", "0", "--profile", "smoke"],
            "worker": ["--device", "cpu"], "status": []}[command]
    started = time.time()
    result = run_cli("studies.queue", command, "--storage", storage, "--study", "q", *args,
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "optuna storage postgresql+psycopg2://cvae:***@127.0.0.1" in line
    assert "unreachable" in line and "Connection refused" in line
    assert "hunter2" not in result.stdout + result.stderr
    assert time.time() - started < 60
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_bare_postgresql_url_names_the_missing_driver(tracking_store, tmp_path):
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; the project installs psycopg2."""
    pytest.importorskip("psycopg2")
    try:
        import psycopg  # noqa: F401

        pytest.skip("psycopg 3 is installed: bare postgresql:// URLs work")
    except ImportError:
        pass
    result = run_cli(*_queue(f"postgresql://cvae:hunter2@127.0.0.1:{closed_port()}/optuna"),
                     cwd=tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "postgresql+psycopg2://" in line and "hunter2" not in result.stderr


# ---------------------------------------------------------------------------------------------
# A tracking server that stops answering mid-run
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path, mlflow_template_db):
    """A local ``mlflow server`` (SQLite backend, proxied artifacts) in its own process group."""
    port = closed_port()
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template_db, db)
    log = (tmp_path / "server" / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(tmp_path / "server" / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, \
                    (tmp_path / "server" / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_tracking_server_frozen_mid_run_fails_in_one_line_then_resumes(mlflow_server, tmp_path):
    url, server = mlflow_server
    args = ["kl_cyclical", "--profile", "smoke", "--epochs", "4"]
    # MLflow retries a dead server for minutes by default; a bounded test sets it low.
    quick = {"MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments", "run", *args], cwd=tmp_path,
                            env=cli_env(**quick), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    client = MlflowClient(tracking_uri=url)
    try:
        run_id = wait_for_epoch(client, "runs")
        os.killpg(server.pid, signal.SIGSTOP)  # the server hangs: no answer, no refusal
        stopped = time.time()
        _, stderr = proc.communicate(timeout=120)
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, stderr
    assert time.time() - stopped < 60
    (line,) = error_lines(stderr)
    assert f"tracking store {url} failed" in line and "rerun the same command" in line

    # The server is back: the run is still RUNNING with its checkpoint, and the same command
    # resumes it into the same run.
    assert client.get_run(run_id).info.status == "RUNNING"
    assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    resumed = run_cli("experiments", "run", *args, cwd=tmp_path, MLFLOW_TRACKING_URI=url)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run_id}" in resumed.stdout
    runs = client.search_runs([client.get_experiment_by_name("runs").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    for key in EPOCH_METRICS:  # (equal values to an uninterrupted run: test_runner_e2e)
        assert [s for s, _ in history(client, run_id, key)] == [0, 1, 2, 3], key


# ---------------------------------------------------------------------------------------------
# Code-base checks
# ---------------------------------------------------------------------------------------------
def _python_files() -> list[Path]:
    skip = {".venv", "venv", "mlruns", ".git", "build", "data"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


def test_every_torch_load_uses_weights_only():
    """Checkpoints are state_dicts: unpickling arbitrary objects from a shared artifact store
    would run whatever code a checkpoint carries."""
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "load" and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                           and k.value.value is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
