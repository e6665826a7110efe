"""Several workers on one Optuna study in PostgreSQL, logging to an MLflow server.

Needs the servers that ``scripts/servers.sh`` starts (CI: ``.ci/services``), which export
CVAE_TEST_PG_URL and CVAE_TEST_MLFLOW_URL. Each test uses its own study and experiment name.

    eval "$(bash scripts/servers.sh start)"
    python -m pytest tests/test_distributed.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import MLFLOW, NEEDS_SERVERS, PG, ROOT, cli_env, run_cli

pytestmark = NEEDS_SERVERS

ARMS = ("kl_cyclical", "kl_monotonic", "kl_constant")


@pytest.fixture
def study(request, monkeypatch, tmp_path):
    """A unique study name; the MLflow client in this process on the server; cleanup after."""
    import mlflow

    name = f"test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", MLFLOW)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(MLFLOW)
    yield name
    import optuna
    from mlflow.tracking import MlflowClient

    try:
        optuna.delete_study(study_name=name, storage=PG)
    except KeyError:
        pass
    client = MlflowClient(tracking_uri=MLFLOW)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        client.delete_experiment(experiment.experiment_id)


def queue(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli("studies.queue", *args, cwd=cwd, timeout=timeout, MLFLOW_TRACKING_URI=MLFLOW)


def start_worker(study: str, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "studies.queue", "worker", "--storage", PG, "--study", study,
         "--device", "cpu", *extra],
        cwd=log.parent, env=cli_env(MLFLOW_TRACKING_URI=MLFLOW),
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def wait_all(workers: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    for proc in workers:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    return [proc.returncode for proc in workers]


def child_runs(client, study: str) -> list:
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("study_parent") != "1"]


def parent_run(client, study: str):
    experiment = client.get_experiment_by_name(study)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.study_parent = '1'")
    return parent


def assert_tidy_grid(client, study: str, seeds: tuple[int, ...], epochs: int) -> list:
    """Exactly one FINISHED run per (arm, seed), filed under the study's parent run, with one
    value per epoch and its checkpoints behind the server's artifact proxy."""
    runs = child_runs(client, study)
    pairs = Counter((r.data.tags["arm"], int(r.data.tags["seed"])) for r in runs)
    assert pairs == Counter({(arm, seed): 1 for arm in ARMS for seed in seeds})
    parent = parent_run(client, study)
    experiment_id = client.get_experiment_by_name(study).experiment_id
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags["arm"]
        assert run.info.experiment_id == experiment_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["study"] == study
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(epochs)), steps  # none missing, none twice
        ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert "checkpoints/last.pt" in ckpts
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    return runs


def password() -> str:
    return urlsplit(PG).password or "no-password-in-url"


def test_three_workers_run_each_pair_exactly_once(study, tmp_path):
    from mlflow.tracking import MlflowClient

    seeds = (0, 1)
    coordinated = queue("coordinate", "--storage", PG, "--study", study, "--ablation", "kl",
                        "--seeds", *map(str, seeds), "--profile", "smoke", "--epochs", "2",
                        cwd=tmp_path)
    assert coordinated.returncode == 0, coordinated.stderr
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = [start_worker(study, log) for log in logs]
    # The same coordinate command again (idempotent), waiting with a progress line.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "studies.queue", "coordinate", "--storage", PG, "--study", study,
         "--ablation", "kl", "--seeds", *map(str, seeds), "--profile", "smoke", "--epochs", "2",
         "--wait", "--poll", "1"], cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=MLFLOW),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes = wait_all(workers, timeout=600)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0, 0], texts
    progress, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "6/6 complete, 0 running, 0 waiting" in progress

    client = MlflowClient()
    runs = assert_tidy_grid(client, study, seeds, epochs=2)

    import optuna

    trials = optuna.load_study(study_name=study, storage=PG).get_trials()
    assert len(trials) == 6 and {t.state.name for t in trials} == {"COMPLETE"}
    by_run = {r.info.run_id: r for r in runs}
    for trial in trials:
        run = by_run[trial.user_attrs["mlflow_run_id"]]
        assert (run.data.tags["arm"], int(run.data.tags["seed"])) == \
            (trial.params["arm"], trial.params["seed"])
        assert trial.value == pytest.approx(run.data.metrics["val/psnr"])
    assert sum(text.count("done: val/psnr") for text in texts) == 6  # one per pair, in all

    # The storage password is in no log line, parameter or tag.
    secret = password()
    assert secret not in coordinated.stdout + coordinated.stderr + progress + "".join(texts)
    services = os.environ.get("CVAE_SERVICES_DIR")
    if services and (Path(services) / "mlflow.log").exists():  # the server's own log too
        assert secret not in (Path(services) / "mlflow.log").read_text()
    for run in [*runs, parent_run(client, study)]:
        assert secret not in repr(run.data.params) + repr(run.data.tags)
    assert "cvae:***@" in parent_run(client, study).data.tags["optuna_storage"]


def test_concurrent_coordinators_enqueue_each_pair_once(study, tmp_path):
    import optuna

    args = [sys.executable, "-m", "studies.queue", "coordinate", "--storage", PG, "--study",
            study, "--ablation", "kl", "--seeds", "0", "1", "--profile", "smoke"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=MLFLOW),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    trials = optuna.load_study(study_name=study, storage=PG).get_trials()
    pairs = Counter((t.system_attrs["fixed_params"]["arm"], t.system_attrs["fixed_params"]["seed"])
                    for t in trials)
    assert pairs == Counter({(arm, seed): 1 for arm in ARMS for seed in (0, 1)})
    from mlflow.tracking import MlflowClient

    parent_run(MlflowClient(), study)  # exactly one parent run


def _running_pair(client, study: str, workers: list[subprocess.Popen]):
    """(worker process, run id) of a worker whose run has logged 1..3 of its 4 epochs."""
    import optuna

    by_pid = {proc.pid: proc for proc in workers}
    for trial in optuna.load_study(study_name=study, storage=PG).get_trials():
        if trial.state.name != "RUNNING" or "worker" not in trial.user_attrs:
            continue
        pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
        for run in child_runs(client, study):
            if run.data.tags.get("optuna_trial") != str(trial.number):
                continue
            logged = len(client.get_metric_history(run.info.run_id, "train/loss"))
            if 1 <= logged < 4 and pid in by_pid:
                return by_pid[pid], run.info.run_id
    return None


def test_killed_worker_pair_is_retried_and_resumed(study, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    coordinated = queue("coordinate", "--storage", PG, "--study", study, "--ablation", "kl",
                        "--seeds", "0", "--profile", "smoke", "--epochs", "4", cwd=tmp_path)
    assert coordinated.returncode == 0, coordinated.stderr
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = [start_worker(study, log, "--heartbeat", "1", "--grace", "3") for log in logs]
    client = MlflowClient()
    try:
        deadline, found = time.time() + 300, None
        while found is None and time.time() < deadline:
            found = _running_pair(client, study, workers)
            time.sleep(0.2)
        assert found, "no run reached its first epoch before the deadline"
        victim, run_id = found
        victim.send_signal(signal.SIGKILL)
        killed = time.time()
        victim.wait()
        # The survivors are busy with pairs of their own: they look on every heartbeat, so
        # the dead worker's pair is back in the queue within about grace + heartbeat (at once
        # here: its process, on this host, is gone), not when a survivor is free again.
        while not any("failed_trial" in t.system_attrs for t in
                      optuna.load_study(study_name=study, storage=PG).get_trials()):
            assert time.time() - killed < 3 + 1 + 10, "the pair was not retried in time"
            time.sleep(0.2)
        print(f"retried {time.time() - killed:.1f} s after the kill (grace 3 s, heartbeat 1 s)")
        assert client.get_run(run_id).info.status == "RUNNING"  # nobody cleaned up
        survivors = [w for w in workers if w is not victim]
        assert wait_all(survivors, timeout=600) == [0, 0], [log.read_text() for log in logs]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    runs = assert_tidy_grid(client, study, (0,), epochs=4)
    assert run_id in {r.info.run_id for r in runs}  # the same run, resumed
    texts = "".join(log.read_text() for i, log in enumerate(logs)
                    if workers[i] is not victim)
    assert "lost its worker process (killed)" in texts and "enqueued for retry" in texts
    assert "(retry of trial" in texts
    assert f"resuming run {run_id}" in texts
    for line in texts.splitlines():  # shown with `pytest -s`: the retry and the resume
        if any(k in line for k in ("lost its worker", "enqueued for retry", "(retry of trial",
                                   "resuming run", "done: val/psnr")):
            print(line)

    import optuna

    trials = optuna.load_study(study_name=study, storage=PG).get_trials()
    states = Counter(t.state.name for t in trials)
    assert states == Counter({"COMPLETE": 3, "FAIL": 1})
    (retried,) = [t for t in trials if "failed_trial" in t.system_attrs]
    assert retried.state.name == "COMPLETE" and retried.user_attrs["mlflow_run_id"] == run_id


def test_servers_listen_on_loopback_only():
    """Every listening socket on the servers' ports is bound to 127.0.0.1."""
    ports = {urlsplit(PG).port, urlsplit(MLFLOW).port}
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                listening.append(address)
    assert listening and set(listening) == {"0100007F"}, listening  # 127.0.0.1, little-endian
    script = (ROOT / "scripts" / "servers.sh").read_text()
    assert "0.0.0.0" not in script and "HOST=127.0.0.1" in script


def test_study_command_coordinates_and_its_workers_finish_the_grid(study, tmp_path):
    """`python -m studies.kl_ablation --storage PG` queues the grid and waits; two
    `... --storage PG --worker` processes take the pairs; the coordinator then writes the
    report from the server's runs."""
    from mlflow.tracking import MlflowClient

    flags = ["--profile", "smoke", "--epochs", "2", "--seeds", "0", "--device", "cpu",
             "--storage", PG, "--queue-name", study]
    env = cli_env(MLFLOW_TRACKING_URI=MLFLOW)
    # The queue is named `study` (--queue-name); the runs go to the experiment kl_ablation.
    client = MlflowClient()
    old = client.get_experiment_by_name("kl_ablation")  # this test's experiment on the server:
    for run in client.search_runs([old.experiment_id], max_results=1000) if old else []:
        client.delete_run(run.info.run_id)  # no finished runs from an earlier run to reuse
    coordinator = subprocess.Popen([sys.executable, "-m", "studies.kl_ablation", *flags],
                                   cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    import optuna

    deadline = time.time() + 120
    while time.time() < deadline:  # until the queue holds the plan (experiment, parent run)
        try:
            if "parent_run_id" in optuna.load_study(study_name=study, storage=PG).user_attrs:
                break
        except KeyError:
            pass
        time.sleep(0.5)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "studies.kl_ablation", *flags,
                                 "--worker"], cwd=tmp_path, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, text=True) for log in logs]
    try:
        assert wait_all(workers, timeout=600) == [0, 0], [log.read_text() for log in logs]
        out, _ = coordinator.communicate(timeout=300)
    finally:
        for proc in [*workers, coordinator]:
            if proc.poll() is None:
                proc.kill()
    assert coordinator.returncode == 0, out[-3000:]
    assert "waiting for workers" in out
    assert any(line.startswith("kl_constant ") for line in out.splitlines()), out[-3000:]
    assert password() not in out + "".join(log.read_text() for log in logs)
    texts = "".join(log.read_text() for log in logs)
    assert texts.count("done: val/psnr") == 3
    experiment = client.get_experiment_by_name("kl_ablation")
    tagged = client.search_runs([experiment.experiment_id],
                                f"tags.optuna_study = '{study}'", max_results=100)
    runs = [r for r in tagged if r.data.tags.get("study_parent") != "1"]
    assert sorted(r.data.tags["arm"] for r in runs) == sorted(ARMS)
    assert {r.info.status for r in runs} == {"FINISHED"}
    parent_id = runs[0].data.tags["mlflow.parentRunId"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent_id}
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert "report/summary.md" in logged
    for run in tagged:  # a rerun against the same server starts afresh
        client.delete_run(run.info.run_id)


def test_tune_worker_joins_the_coordinators_study(study, tmp_path):
    """`studies.tune --storage PG` (coordinator) and `... --worker` share the trials: exactly
    --n-trials in all, every one an MLflow run under the coordinator's parent run."""
    import optuna
    from mlflow.tracking import MlflowClient

    flags = ["--spec", "report_final", "--profile", "smoke", "--epochs", "1", "--n-trials", "4",
             "--pruner", "none", "--device", "cpu", "--storage", PG, "--study-name", study]
    env = cli_env(MLFLOW_TRACKING_URI=MLFLOW)
    refused = run_cli("studies.tune", *flags, "--worker", cwd=tmp_path,
                      MLFLOW_TRACKING_URI=MLFLOW)
    assert refused.returncode == 2 and "without --worker first" in refused.stderr
    coordinator = subprocess.Popen([sys.executable, "-m", "studies.tune", *flags], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
    client = MlflowClient()
    deadline = time.time() + 120
    while time.time() < deadline:
        experiment = client.get_experiment_by_name(f"tune-{study}")
        if experiment and client.search_runs([experiment.experiment_id],
                                             "tags.study_parent = '1'"):
            break
        time.sleep(0.5)
    worker = run_cli("studies.tune", *flags, "--worker", cwd=tmp_path, timeout=600,
                     MLFLOW_TRACKING_URI=MLFLOW)
    out, _ = coordinator.communicate(timeout=600)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    assert coordinator.returncode == 0, out[-3000:]
    trials = optuna.load_study(study_name=study, storage=PG).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, [
        (t.number, t.state.name, t.user_attrs) for t in trials]
    experiment = client.get_experiment_by_name(f"tune-{study}")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("study_parent") == "1"]
    children = [r for r in runs if r.data.tags.get("study_parent") != "1"]
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert "best:" in out
    client.delete_experiment(experiment.experiment_id)
