"""The real CLI into a temporary tracking store: tags, metrics, artifacts, skip, resume, NaN."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from mlflow.tracking import MlflowClient

EPOCH_METRICS = ["train/loss", "train/mse", "train/kl", "train/beta", "train/tfr", "train/lr",
                 "val/loss", "val/psnr", "val/psnr_prior_mean"]


def _runs(client: MlflowClient, study: str = "runs"):
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_smoke_run_records_tags_metrics_artifacts_then_skips(tracking_store, tmp_path):
    result = run_cli("experiments", "run", "kl_cyclical", "--profile", "smoke", "--epochs", "2",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Output to a pipe, not a terminal: one progress line per epoch, no bar.
    lines = [line for line in result.stdout.splitlines() if line.startswith("[kl_cyclical-s00]")]
    epochs = [line for line in lines if " epoch " in line]
    assert len(epochs) == 2, result.stdout
    assert re.fullmatch(r"\[kl_cyclical-s00\] epoch 1/2 · train loss \S+ · β \S+ · tfr 0\.00 · "
                        r"(val PSNR \d+\.\d\d dB · )?\d+\.\d s/epoch · run ETA \d+ s", epochs[0])
    assert epochs[1].startswith("[kl_cyclical-s00] epoch 2/2 ") and "val PSNR" in epochs[1]
    assert epochs[1].endswith("run ETA 0 s") and "\r" not in result.stdout + result.stderr
    client = MlflowClient()
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    for key in ("study", "arm", "group", "seed", "spec_hash", "profile", "device", "git_commit"):
        assert tags.get(key), key
    assert (tags["arm"], tags["seed"], tags["profile"], tags["device"]) == (
        "kl_cyclical", "0", "smoke", "cpu")
    assert run.data.params["kl.kind"] == "cyclical" and run.data.params["train.epochs"] == "2"
    for key in EPOCH_METRICS:
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [0, 1], key
    assert len(_history(client, run.info.run_id, "val/psnr_copy_first")) == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"psnr_per_frame.csv", "psnr_per_frame.png", "prediction.gif", "spec.json",
            "val_prediction.npz", "checkpoints"} <= artifacts
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/last.pt", "checkpoints/best.pt"} <= ckpts
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    spec_path = client.download_artifacts(run.info.run_id, "spec.json", str(downloads))
    assert json.loads(Path(spec_path).read_text())["name"] == "kl_cyclical"
    csv = client.download_artifacts(run.info.run_id, "psnr_per_frame.csv", str(downloads))
    rows = Path(csv).read_text().strip().splitlines()
    assert rows[0] == "frame,psnr,psnr_copy_first" and len(rows) == 1 + 47  # smoke val: 48 frames
    mean_csv = sum(float(r.split(",")[1]) for r in rows[1:]) / 47
    assert mean_csv == pytest.approx(_history(client, run.info.run_id, "val/psnr")[-1][1], abs=1e-4)

    again = run_cli("experiments", "run", "kl_cyclical", "--profile", "smoke", "--epochs", "2",
                    cwd=tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert len(_runs(client)) == 1


def test_sigkill_then_rerun_resumes_into_same_run_with_same_metrics(tracking_store, tmp_path):
    args = ["experiments", "run", "tfr_decay", "--profile", "smoke", "--epochs", "4",
            "--set", "teacher_forcing.mode=batch"]
    # Reference: the same run uninterrupted, in a separate store.
    ref_db = tmp_path / "ref" / "mlflow.db"
    ref_db.parent.mkdir()
    import shutil

    shutil.copy(tmp_path / "mlruns" / "mlflow.db", ref_db)
    ref = run_cli(*args, cwd=tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{ref_db}")
    assert ref.returncode == 0, ref.stderr

    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient()
    deadline = time.time() + 300
    run_id = None
    while time.time() < deadline:
        runs = _runs(client)
        if runs and _history(client, runs[0].info.run_id, "train/loss"):
            run_id = runs[0].info.run_id
            break
        time.sleep(0.2)
    assert run_id, "no epoch was logged before the deadline"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert client.get_run(run_id).info.status == "RUNNING"  # killed hard: nobody cleaned up
    logged = len(_history(client, run_id, "train/loss"))
    assert logged < 4

    resumed = run_cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run_id}" in resumed.stdout
    assert len(_runs(client)) == 1 and client.get_run(run_id).info.status == "FINISHED"
    ref_client = MlflowClient(tracking_uri=f"sqlite:///{ref_db}")
    (ref_run,) = _runs(ref_client)
    for key in EPOCH_METRICS:
        ours = _history(client, run_id, key)
        theirs = _history(ref_client, ref_run.info.run_id, key)
        assert [s for s, _ in ours] == [0, 1, 2, 3], key  # no duplicated or missing steps
        assert ours == theirs, key


def test_non_finite_loss_ends_failed_with_reason(tracking_store, tmp_path):
    result = run_cli("experiments", "run", "kl_constant", "--profile", "smoke", "--epochs", "2",
                     "--set", "optim.lr=1e12", "--set", "model.output_activation=identity",
                     cwd=tmp_path)
    assert result.returncode != 0
    (run,) = _runs(MlflowClient())
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["stop_reason"]


@pytest.mark.parametrize("args, message", [
    (["run", "nope", "--profile", "smoke"], "unknown spec 'nope'"),
    (["run", "kl_cyclical", "--profile", "smoke", "--set", "optim.lrr=1"], "unknown key"),
    (["run", "kl_cyclical", "--profile", "smoke", "--set", "kl.ratio=0"], "kl.ratio=0.0"),
    (["run", "kl_cyclical", "--profile", "smoke", "--data", "/no/such/dir"], "/no/such/dir"),
    (["run", "kl_cyclical", "--profile", "galaxy"], "invalid choice"),
    (["show", "kl_cyclical", "--set", "train.epochs=0"], "train.epochs=0 must be >= 1"),
])
def test_bad_input_exits_2_with_one_line_and_no_run(tracking_store, tmp_path, args, message):
    result = run_cli("experiments", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1
    assert _runs(MlflowClient()) == []


def test_list_and_show(tmp_path):
    listed = run_cli("experiments", "list", "kl_*", cwd=tmp_path)
    assert listed.returncode == 0 and "kl_monotonic" in listed.stdout
    shown = run_cli("experiments", "show", "report_final", "--profile", "cpu", cwd=tmp_path)
    assert shown.returncode == 0
    spec = json.loads(shown.stdout)
    assert spec["optim"]["kind"] == "adamw" and spec["train"]["epochs"] <= 400
