"""One owner per run: the lease (``experiments.tracking.Lease``) and the runner's claim.

Two processes started together make one run; a run whose owner is alive is refused in one
line; it is taken over once the owner is gone (its pid, on this host) or silent beyond the
grace (another host); an owner that finds its run taken over stops without writing to it;
of two runs created together for one (spec, seed), the earliest started wins and the other
is deleted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import cli_env, run_cli
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from experiments import runner, tracking
from experiments.registry import resolve
from experiments.runner import RunContext, run_experiment
from experiments.spec import spec_hash
from experiments.tracking import Lease, LeaseTiming, RunBusyError

RUN = ["experiments", "run", "kl_cyclical", "--profile", "smoke", "--device", "cpu"]


def runs(client: MlflowClient, study: str = "runs", view: int = ViewType.ACTIVE_ONLY) -> list:
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id], run_view_type=view) \
        if experiment else []


def steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def lease_tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    return {k: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith("lease_")}


def foreign_lease(*, age: float = 0.0) -> dict[str, str]:
    """The lease of a process on another machine whose last heartbeat is ``age`` s old."""
    return {"lease_owner": "elsewhere:4242", "lease_since": "2026-12-01 10:00:00 UTC",
            "lease_heartbeat": f"{time.time() - age:.3f}", "lease_token": "theirs"}


def wait_for(condition, *, timeout: float = 300, what: str = "the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} before the deadline")


# ---------------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------------
def test_lease_is_live_while_its_owner_beats_and_lives():
    timing = LeaseTiming(heartbeat=1, grace=10)
    assert tracking.lease_is_live(foreign_lease(), timing)
    assert not tracking.lease_is_live(foreign_lease(age=11), timing)  # silent beyond the grace
    assert not tracking.lease_is_live({}, timing)  # released, or never held
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    here = {**foreign_lease(), "lease_owner": f"{socket.gethostname()}:{dead.stdout.strip()}"}
    assert not tracking.lease_is_live(here, timing)  # this host, and the pid is gone
    mine = {**foreign_lease(), "lease_owner": f"{socket.gethostname()}:{os.getpid()}"}
    assert tracking.lease_is_live(mine, timing)
    assert tracking.lease_holder(foreign_lease()) == \
        "pid 4242 on host elsewhere since 2026-12-01 10:00:00 UTC"


@pytest.mark.parametrize("env, message", [
    ({"CVAE_LEASE_GRACE": "soon"}, "CVAE_LEASE_GRACE='soon': a positive number of seconds"),
    ({"CVAE_LEASE_HEARTBEAT": "0"}, "CVAE_LEASE_HEARTBEAT='0': a positive number"),
    ({"CVAE_LEASE_HEARTBEAT": "5", "CVAE_LEASE_GRACE": "5"}, "must exceed"),
])
def test_lease_timing_from_the_environment_is_checked(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(tracking.TrackingError, match=message):
        tracking.lease_timing()


def test_lease_timing_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("CVAE_LEASE_HEARTBEAT", raising=False)
    monkeypatch.delenv("CVAE_LEASE_GRACE", raising=False)
    assert tracking.lease_timing() == LeaseTiming(heartbeat=10, grace=60)
    monkeypatch.setenv("CVAE_LEASE_HEARTBEAT", "0.5")
    monkeypatch.setenv("CVAE_LEASE_GRACE", "3")
    assert tracking.lease_timing() == LeaseTiming(heartbeat=0.5, grace=3)


def test_heartbeat_thread_beats_until_another_process_holds_the_run(tracking_store):
    client = MlflowClient()
    experiment_id = tracking.get_or_create_experiment("leases")
    lease = Lease(LeaseTiming(heartbeat=0.05, grace=1))
    lease.run_id = client.create_run(experiment_id, tags=lease.tags()).info.run_id
    first = lease_tags(client, lease.run_id)["lease_heartbeat"]
    lease.start()
    try:
        wait_for(lambda: lease_tags(client, lease.run_id)["lease_heartbeat"] != first,
                 timeout=30, what="heartbeat")
        for key, value in foreign_lease().items():
            client.set_tag(lease.run_id, key, value)
        wait_for(lambda: lease.lost, timeout=30, what="lost lease")
        assert lease.lost.startswith("pid 4242 on host elsewhere")
        theirs = lease_tags(client, lease.run_id)
        time.sleep(0.3)
        assert lease_tags(client, lease.run_id) == theirs  # no beat for another's lease
    finally:
        lease.release(client)
    assert lease_tags(client, lease.run_id)["lease_token"] == "theirs"  # not released either


# ---------------------------------------------------------------------------------------------
# The claim, with a rival written while the claim settles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rival", ["started_first", "started_later", "finished"])
def test_of_two_runs_claimed_together_the_earliest_wins(tracking_store, monkeypatch, capsys,
                                                        one_thread, rival):
    spec = resolve("kl_cyclical", profile="smoke", epochs=1)
    client = MlflowClient()
    tracking.configure()
    experiment_id = tracking.get_or_create_experiment("runs")
    rivals = []

    def settle(timing):  # another process created the same (spec, seed) meanwhile
        start = {"started_first": 1, "finished": 1,
                 "started_later": int(time.time() * 1000) + 3_600_000}[rival]
        made = client.create_run(experiment_id, start_time=start, tags={
            "spec_hash": spec_hash(spec), "seed": "0", **foreign_lease()})
        if rival == "finished":
            client.set_terminated(made.info.run_id, "FINISHED")
        rivals.append(made.info.run_id)

    monkeypatch.setattr(runner, "_settle", settle)
    context = RunContext(study="runs", profile="smoke")
    if rival == "started_first":
        with pytest.raises(RunBusyError) as raised:
            run_experiment(spec, context=context)
        assert str(raised.value) == (
            f"run {rivals[0]} (kl_cyclical seed 0) is being trained by pid 4242 on host "
            "elsewhere since 2026-12-01 10:00:00 UTC; rerun when it stops")
    else:
        outcome = run_experiment(spec, context=context)
    (ours,) = [r for r in runs(client, view=ViewType.ALL) if r.info.run_id not in rivals]
    active = [r.info.run_id for r in runs(client)]
    if rival == "started_later":  # ours ranks first: it trains; the rival is left alone
        assert outcome.status == "FINISHED" and not outcome.skipped
        assert ours.info.status == "FINISHED" and sorted(active) == sorted([ours.info.run_id,
                                                                           *rivals])
        assert lease_tags(client, rivals[0])["lease_token"] == "theirs"
        return
    # ours lost: it is deleted (reports ignore it), not left RUNNING
    assert active == rivals
    assert ours.info.lifecycle_stage == "deleted" and ours.info.status == "KILLED"
    if rival == "finished":
        assert outcome.skipped and outcome.run_id == rivals[0]
        assert f"already finished as run {rivals[0]}" in capsys.readouterr().out


def test_an_owner_whose_run_was_taken_over_stops_without_writing(tracking_store, monkeypatch,
                                                                 one_thread):
    """A paused owner (beyond the grace) whose run another process took over: at its next
    epoch end it finds another lease on the run and stops, leaving the run to the new owner."""
    spec = resolve("kl_cyclical", profile="smoke", epochs=3)
    client = MlflowClient()
    real = runner.MlflowHooks.on_epoch_end

    def taken_over_after_epoch_0(self, state):
        real(self, state)
        if state.epoch == 1:
            for key, value in foreign_lease().items():
                client.set_tag(self.run_id, key, value)

    monkeypatch.setattr(runner.MlflowHooks, "on_epoch_end", taken_over_after_epoch_0)
    with pytest.raises(RunBusyError, match=r"was taken over by pid 4242 on host elsewhere .* "
                                           "stopped without writing to it"):
        run_experiment(spec, context=RunContext(study="runs", profile="smoke"))
    (run,) = runs(client)
    assert run.info.status == "RUNNING" and "stop_reason" not in run.data.tags
    assert lease_tags(client, run.info.run_id)["lease_token"] == "theirs"
    assert steps(client, run.info.run_id) == [0]


# ---------------------------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------------------------
def test_two_processes_started_together_make_one_run(tracking_store, tmp_path):
    """On a fresh store (no experiment yet): one run trains and finishes; the other process
    refuses in one line, or reuses the finished run."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = cli_env(TMPDIR=str(system_tmp))
    procs = [subprocess.Popen([sys.executable, "-m", *RUN, "--epochs", "2"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    client = MlflowClient()
    (run,) = runs(client)
    assert run.info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in runs(client, view=ViewType.ALL))
    assert sorted(code for code, _, _ in results) in ([0, 0], [0, 2]), results
    for code, out, err in results:
        if code == 2:
            (line,) = error_lines(err)
            assert f"run {run.info.run_id} (kl_cyclical seed 0) is being trained by pid" in line
            assert line.endswith("; rerun when it stops")
        else:
            assert run.info.run_id in out
    assert list(system_tmp.glob("cvae-run-*")) == []


def test_a_live_run_is_refused_and_taken_over_once_its_owner_is_gone(tracking_store, tmp_path):
    args = [*RUN, "--epochs", "3"]
    owner = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient()
    try:
        (run,) = wait_for(lambda: [r for r in runs(client) if steps(client, r.info.run_id)],
                          what="epoch")
        owner.send_signal(signal.SIGSTOP)  # alive, silent: within the grace, still the owner
        run_id = run.info.run_id
        refused = run_cli(*args, cwd=tmp_path, CVAE_LEASE_GRACE="600")
        assert refused.returncode == 2, refused.stderr
        (line,) = error_lines(refused.stderr)
        assert f"run {run_id} (kl_cyclical seed 0) is being trained by pid {owner.pid} on " \
            f"host {socket.gethostname()} since " in line and "rerun when it stops" in line
        assert [r.info.run_id for r in runs(client, view=ViewType.ALL)] == [run_id]
    finally:
        owner.kill()  # SIGKILL: no clean-up, the run stays RUNNING with its lease
        owner.wait()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert lease_tags(client, run_id)["lease_owner"] == f"{socket.gethostname()}:{owner.pid}"

    # An owner on another machine: live within the grace (60 s by default), taken over
    # after it (15 s here).
    for age in (0, 30):
        for key, value in foreign_lease(age=age).items():
            client.set_tag(run_id, key, value)
        if age == 0:
            refused = run_cli(*args, cwd=tmp_path)
            assert refused.returncode == 2 and "by pid 4242 on host elsewhere" in refused.stderr
    resumed = run_cli(*args, cwd=tmp_path, CVAE_LEASE_HEARTBEAT="1", CVAE_LEASE_GRACE="15")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run_id} at epoch" in resumed.stdout
    (run,) = runs(client)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in ("train/loss", "val/psnr"):
        assert steps(client, run_id, key) == [0, 1, 2], key  # none twice
    assert lease_tags(client, run_id) == {}
