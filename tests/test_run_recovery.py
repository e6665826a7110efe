"""Runs that recover: a full or read-only disk ends a run KILLED and the rerun resumes; an
unreadable ``last.pt`` falls back to ``previous.pt``, none readable fails in one line and the
rerun starts clean; ``best.pt`` after every finished run; a diverging seed is a result, not
the end of the command; no temporary run folder outlives its run.

The real command (``experiments.__main__.main``) in this process, on the smoke profile."""

from __future__ import annotations

import errno
import os
import tempfile
import urllib.parse
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import cvae.train
from experiments import runner
from experiments.__main__ import main

RUN = ["run", "kl_cyclical", "--profile", "smoke", "--device", "cpu"]


@pytest.fixture
def run_tmp(tmp_path, monkeypatch) -> Path:
    """This test's system temporary folder: where the runs make their ``cvae-run-*``."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("cvae-run-*"))


def runs(client: MlflowClient, study: str = "runs") -> list:
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def checkpoints(client: MlflowClient, run_id: str) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")}


def stored(client: MlflowClient, run_id: str, path: str) -> Path:
    """Where an artifact of a run lies in the local store."""
    uri = client.get_run(run_id).info.artifact_uri
    return Path(urllib.parse.urlparse(uri).path) / path


def interrupt_after(monkeypatch, epochs_done: int, error: type[BaseException] = KeyboardInterrupt):
    """Raise ``error`` right after the epoch end that completes ``epochs_done`` epochs
    (checkpoints uploaded and metrics logged, as a Ctrl-C there would find them)."""
    real = runner.MlflowHooks.on_epoch_end

    def on_epoch_end(self, state):
        real(self, state)
        if state.epoch == epochs_done:
            raise error("stopped by the test")

    monkeypatch.setattr(runner.MlflowHooks, "on_epoch_end", on_epoch_end)


def interrupted_run(monkeypatch, capsys, args: list[str], epochs_done: int
                    ) -> tuple[MlflowClient, str]:
    """The command, Ctrl-C'd after ``epochs_done`` epochs: (client, its KILLED run's id)."""
    with monkeypatch.context() as patch:
        interrupt_after(patch, epochs_done)
        assert main(args) == 130
    capsys.readouterr()
    client = MlflowClient()
    (run,) = runs(client)
    assert run.info.status == "KILLED"
    return client, run.info.run_id


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


# ---------------------------------------------------------------------------------------------
# A full or read-only disk
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, code", [("checkpoint", errno.ENOSPC), ("upload", errno.EROFS)])
def test_full_disk_ends_the_run_killed_in_one_line_and_the_rerun_resumes(
        tracking_store, run_tmp, monkeypatch, capsys, one_thread, where, code):
    """The write of epoch 2's ``last.pt`` fails: the run is KILLED at its epoch-1 checkpoint
    (not FAILED with a traceback), and the same command resumes it there."""
    args = [*RUN, "--epochs", "3"]
    failure = OSError(code, os.strerror(code), "/data/full/last.pt")
    with monkeypatch.context() as patch:
        if where == "checkpoint":
            real_save = runner.save_training_checkpoint

            def save(state_dict, path):
                if Path(path).name == "last.pt" and state_dict["epoch"] == 3:
                    raise failure
                return real_save(state_dict, path)

            patch.setattr(runner, "save_training_checkpoint", save)
        else:
            real_log = MlflowClient.log_artifact
            uploads = []

            def log_artifact(self, run_id, local_path, artifact_path=None):
                if Path(local_path).name == "last.pt":
                    uploads.append(local_path)
                    if len(uploads) == 3:
                        raise failure
                return real_log(self, run_id, local_path, artifact_path)

            patch.setattr(MlflowClient, "log_artifact", log_artifact)
        assert main(args) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert os.strerror(code) in line and "KILLED" in line and "rerun the same command" in line
    client = MlflowClient()
    (run,) = runs(client)
    run_id = run.info.run_id
    assert run.info.status == "KILLED" and os.strerror(code) in run.data.tags["stop_reason"]
    assert steps(client, run_id) == [0, 1]
    assert leftovers(run_tmp) == []

    assert main(args) == 0
    assert f"resuming run {run_id} at epoch 2" in capsys.readouterr().out
    (run,) = runs(client)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in ("train/loss", "val/psnr"):
        assert steps(client, run_id, key) == [0, 1, 2], key  # none missing, none twice
    assert not [k for k in run.data.tags if k.startswith("lease_")]  # released
    assert leftovers(run_tmp) == []


# ---------------------------------------------------------------------------------------------
# Checkpoints that cannot be read
# ---------------------------------------------------------------------------------------------
def test_unreadable_last_checkpoint_falls_back_to_the_previous_one(
        tracking_store, run_tmp, monkeypatch, capsys, one_thread):
    args = [*RUN, "--epochs", "3"]
    client, run_id = interrupted_run(monkeypatch, capsys, args, 2)
    assert checkpoints(client, run_id) >= {"last.pt", "previous.pt"}
    last = stored(client, run_id, "checkpoints/last.pt")
    last.write_bytes(last.read_bytes()[:1000])  # truncated

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "checkpoints/last.pt is unreadable" in out and "falling back to " \
        "checkpoints/previous.pt" in out
    assert f"resuming run {run_id} at epoch 1" in out
    (run,) = runs(client)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert steps(client, run_id) == [0, 1, 2]  # epoch 1 trained again, logged once
    assert leftovers(run_tmp) == []


def test_no_readable_checkpoint_fails_in_one_line_and_the_rerun_starts_clean(
        tracking_store, run_tmp, monkeypatch, capsys, one_thread):
    args = [*RUN, "--epochs", "2"]
    client, bad_id = interrupted_run(monkeypatch, capsys, args, 1)
    assert "previous.pt" not in checkpoints(client, bad_id)  # one epoch: last.pt alone
    stored(client, bad_id, "checkpoints/last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")

    for _ in range(2):  # the same line once, not on every rerun
        code = main(args)
        err = capsys.readouterr().err
        if code == 0:
            break
        assert code == 2 and "Traceback" not in err
        (line,) = error_lines(err)
        assert f"run {bad_id} (kl_cyclical seed 0) has no readable checkpoint" in line
        assert "last.pt is unreadable" in line and "marked FAILED" in line
        assert client.get_run(bad_id).info.status == "FAILED"
        assert "no readable checkpoint" in client.get_run(bad_id).data.tags["stop_reason"]
    assert code == 0
    by_status = {r.info.status: r.info.run_id for r in runs(client)}
    assert by_status.keys() == {"FAILED", "FINISHED"} and by_status["FAILED"] == bad_id
    assert steps(client, by_status["FINISHED"]) == [0, 1]  # a clean run from epoch 0
    assert leftovers(run_tmp) == []


def test_load_training_checkpoint_names_what_is_wrong(tmp_path):
    from cvae.checkpoints import CheckpointError, load_training_checkpoint

    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="last.pt is unreadable"):
        load_training_checkpoint(path)
    import torch

    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_training_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_training_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------
# best.pt after every finished run
# ---------------------------------------------------------------------------------------------
def test_a_run_resumed_after_its_last_epoch_finishes_with_best_checkpoint(
        tracking_store, run_tmp, monkeypatch, capsys, one_thread):
    args = [*RUN, "--epochs", "2"]
    # after the last epoch's checkpoint, before the finish
    client, run_id = interrupted_run(monkeypatch, capsys, args, 2)
    assert main(args) == 0
    assert f"resuming run {run_id} at epoch 2" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"best.pt", "last.pt", "previous.pt", "lab_format.ckpt"} <= \
        checkpoints(client, run.info.run_id)
    assert leftovers(run_tmp) == []


# ---------------------------------------------------------------------------------------------
# Seeds are independent; divergence is a result
# ---------------------------------------------------------------------------------------------
def test_every_seed_runs_and_a_diverging_one_is_one_line(tracking_store, run_tmp, capsys,
                                                         one_thread):
    code = main([*RUN, "--epochs", "2", "--seeds", "0", "1", "--set", "optim.lr=1e9"])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    for seed in (0, 1):
        assert f"run kl_cyclical seed {seed} FAILED at epoch 0: non-finite loss (lr 1e9); " \
            "try a lower learning rate" in captured.out.splitlines()
    client = MlflowClient()
    found = runs(client)
    assert sorted(r.data.tags["seed"] for r in found) == ["0", "1"]  # seed 1 ran too
    for run in found:
        assert run.info.status == "FAILED" and "non-finite" in run.data.tags["stop_reason"]
    assert leftovers(run_tmp) == []


def test_a_nan_seed_next_to_a_good_seed(tracking_store, run_tmp, monkeypatch, capsys,
                                        one_thread):
    real = cvae.train.train_epoch

    def seed_0_diverges_at_epoch_1(state, *args, **kwargs):
        if state.data_generator.initial_seed() == 0 and state.epoch == 1:
            raise cvae.train.NonFiniteLossError("non-finite training loss at epoch 1: loss=nan",
                                                epoch=1)
        return real(state, *args, **kwargs)

    monkeypatch.setattr(cvae.train, "train_epoch", seed_0_diverges_at_epoch_1)
    assert main([*RUN, "--epochs", "2", "--seeds", "0", "1", "--set", "optim.lr=2e-3"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "run kl_cyclical seed 0 FAILED at epoch 1: non-finite loss (lr 0.002); try a lower " \
        "learning rate" in out
    assert any(line.startswith("kl_cyclical seed 1: run ") and " FINISHED " in line
               for line in out)
    client = MlflowClient()
    assert sorted((r.data.tags["seed"], r.info.status) for r in runs(client)) == [
        ("0", "FAILED"), ("1", "FINISHED")]
    assert leftovers(run_tmp) == []


# ---------------------------------------------------------------------------------------------
# Temporary folders
# ---------------------------------------------------------------------------------------------
def test_temporary_run_folders_are_removed_however_the_run_ends(
        tracking_store, run_tmp, monkeypatch, capsys, one_thread):
    assert main([*RUN, "--epochs", "1"]) == 0  # finished
    assert leftovers(run_tmp) == []
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1, RuntimeError)  # a bug: FAILED, the exception goes on
        with pytest.raises(RuntimeError, match="stopped by the test"):
            main([*RUN, "--epochs", "1", "--seeds", "1"])
    assert leftovers(run_tmp) == []
    client = MlflowClient()
    assert sorted(r.info.status for r in runs(client)) == ["FAILED", "FINISHED"]
