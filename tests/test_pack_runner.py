"""Members of an ablation trained as packs by the studies (``--pack K``): one MLflow run per
member with the metrics it has when trained alone, FAILED alone on a NaN, resumed per pack."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

import cvae.packed
from studies import kl_ablation

SMOKE = ["--profile", "smoke", "--epochs", "2", "--device", "cpu", "--seeds", "0", "--jobs", "1"]
KEYS = ["train/loss", "train/mse", "train/kl", "train/beta", "val/psnr", "val/loss",
        "val/psnr_prior_mean"]


def _histories(client: MlflowClient) -> dict[str, dict[str, list[tuple[int, float]]]]:
    experiment = client.get_experiment_by_name("kl_ablation")
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("study_parent") != "1"]
    out = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags["arm"]
        out[run.data.tags["arm"]] = {
            k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in KEYS}
    return out


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for arm in a:
        for key in KEYS:
            steps_a, values_a = zip(*a[arm][key])
            steps_b, values_b = zip(*b[arm][key])
            assert steps_a == steps_b, (arm, key)
            assert list(values_a) == pytest.approx(list(values_b), rel=rel, abs=1e-6), (arm, key)


def test_packed_members_log_what_they_log_alone(tracking_store, tmp_path, monkeypatch, capsys,
                                                mlflow_template_db):
    assert kl_ablation.main([*SMOKE, "--pack", "3"]) == 0
    out = capsys.readouterr().out
    assert "packs of up to 3" in out and "packed: kl_cyclical-s00, kl_monotonic-s00, " \
        "kl_constant-s00 train together from epoch 0" in out
    client = MlflowClient()
    packed = _histories(client)
    assert set(packed) == {"kl_cyclical", "kl_monotonic", "kl_constant"}
    betas = {arm: [v for _, v in packed[arm]["train/beta"]] for arm in packed}
    assert betas["kl_monotonic"] != betas["kl_constant"]  # own KL schedules inside the pack

    # The same study, unpacked, in a second store: the same metrics, step for step (fp32:
    # a vmapped grouped convolution sums in another order, so not bit for bit).
    import shutil

    other = tmp_path / "alone"
    (other / "mlruns").mkdir(parents=True)
    shutil.copy(mlflow_template_db, other / "mlruns" / "mlflow.db")
    uri = f"sqlite:///{other / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(other)
    import mlflow

    mlflow.set_tracking_uri(uri)
    assert kl_ablation.main([*SMOKE, "--pack", "1"]) == 0
    alone = _histories(MlflowClient(tracking_uri=uri))
    _close(packed, alone, rel=1e-3)


def test_an_interrupted_pack_resumes_as_a_pack(tracking_store, monkeypatch, capsys):
    """Ctrl-C in the second epoch: every member ends KILLED with its epoch-1 checkpoint; the
    same command resumes the three runs together from there, logging no epoch twice."""
    real = cvae.packed.PackedTrainer.train_epoch
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cvae.packed.PackedTrainer, "train_epoch", interrupted)
    assert kl_ablation.main([*SMOKE, "--pack", "3"]) == 130
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kl_ablation")
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("study_parent") != "1"]
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [0]
    monkeypatch.setattr(cvae.packed.PackedTrainer, "train_epoch", real)
    capsys.readouterr()
    assert kl_ablation.main([*SMOKE, "--pack", "3"]) == 0
    out = capsys.readouterr().out
    assert "train together from epoch 1" in out
    for run in runs:
        assert f"resuming run {run.info.run_id} at epoch 1" in out
    resumed = _histories(client)
    for arm, history in resumed.items():
        assert [s for s, _ in history["train/loss"]] == [0, 1], arm  # none twice


def test_pack_flag_checks(tracking_store, capsys):
    assert kl_ablation.main([*SMOKE[:-2], "--pack", "0"]) == 2
    assert "--pack=0 must be >= 1" in capsys.readouterr().err
    assert kl_ablation.main([*SMOKE[:-2], "--pack", "3", "--jobs", "2"]) == 2
    assert "choose one" in capsys.readouterr().err


@pytest.mark.parametrize("free_gb, expected", [(200, 15), (80, 15), (20, 4), (1, 1)])
def test_default_pack_fits_the_gpus_free_memory(monkeypatch, free_gb, expected):
    import torch

    from studies import cli

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free_gb * 1e9, 80e9))
    assert cli.default_pack("cuda") == expected
    assert cli.default_pack("cpu") == 1


def test_default_jobs_one_single_threaded_process_per_core(monkeypatch):
    from studies import cli, queue

    monkeypatch.setattr(queue, "cpu_count", lambda: 2)
    assert cli.default_jobs("cpu", 6) == 2
    assert cli.default_jobs("cpu", 1) == 1
    assert cli.default_jobs("cuda", 6) == 1
    monkeypatch.setattr(queue, "cpu_count", lambda: 16)
    assert cli.default_jobs("cpu", 6) == 6
