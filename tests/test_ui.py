"""What a user finds in the tracking store and the MLflow UI: experiments marked as model
training and described, the group curves on a study's parent run (equal to the summary, and
replaced when seeds are added), sortable run names, honest parent tags, ``python -m studies
list``, and the report command telling ablation from tuning studies."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pandas as pd
import pytest
from conftest import cli_env
from mlflow.tracking import MlflowClient
from optuna.trial import FixedTrial

from experiments import tracking
from experiments.registry import get_ablation
from experiments.runner import run_name
from studies import __main__ as studies_main
from studies import kl_ablation, queue, summary, tune, tuning, ui
from studies import report as report_module
from studies.grid import Grid, open_study
from studies.results import load_study

SMOKE = ["--profile", "smoke", "--device", "cpu"]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _fake_study(client: MlflowClient, runs: dict[tuple[str, int], list[float]]) -> str:
    """A study "s" with a parent (arms ``a`` and ``b+c``, reference ``a``) and one FINISHED run
    per (arm, seed) whose val/psnr per epoch is ``runs[(arm, seed)]`` (losses derived)."""
    experiment = client.get_experiment_by_name("s")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("s")
    parents = client.search_runs([experiment_id], "tags.study_parent = '1'")
    if parents:
        parent_id = parents[0].info.run_id
    else:
        parent_id = client.create_run(experiment_id, tags={
            "study": "s", "study_parent": "1", "spec_hashes": "aaaa,bbbb",
            "arm_order": "a,b+c", "group_order": "a,b+c", "reference_arm": "a"}).info.run_id
        client.set_terminated(parent_id)
    done = {(r.data.tags["arm"], int(r.data.tags["seed"]))
            for r in client.search_runs([experiment_id]) if "arm" in r.data.tags}
    for (arm, seed), psnr in runs.items():
        if (arm, seed) in done:
            continue
        run = client.create_run(experiment_id, tags={
            "study": "s", "arm": arm, "group": arm, "seed": str(seed),
            "spec_hash": "aaaa" if arm == "a" else "bbbb", "mlflow.parentRunId": parent_id})
        for epoch, value in enumerate(psnr):
            client.log_metric(run.info.run_id, "val/psnr", value, step=epoch)
            client.log_metric(run.info.run_id, "train/loss", 100.0 / value, step=epoch)
            client.log_metric(run.info.run_id, "val/loss", 1.0 / value, step=epoch)
        client.set_terminated(run.info.run_id)
    return parent_id


def _check_group_metrics(client: MlflowClient, parent_id: str) -> pd.DataFrame:
    """Every group metric on the parent equals the tidy table's mean / sd across seeds at
    each epoch, and the headline numbers equal ``summary.summarize``; one value per step."""
    results = load_study("s", client=client, per_frame=False)
    table = summary.summarize(results.metrics, reference="a", by="arm", order=["a", "b+c"])
    stats = results.metrics.groupby(["arm", "metric", "epoch"])["value"].agg(["mean", "std"])
    for arm, key in (("a", "a"), ("b+c", "b.c")):
        for metric, short in ui.CURVES.items():
            rows = stats.loc[(arm, metric)]
            mean, sd = rows["mean"], rows["std"]
            expected = {"mean": mean, "sd": sd, "lo": mean - sd, "hi": mean + sd}
            for stat, series in expected.items():
                history = _history(client, parent_id, f"{key}/{short}_{stat}")
                assert [step for step, _ in history] == list(series.index)  # one per step
                assert [v for _, v in history] == pytest.approx(list(series), abs=1e-9)
        final = _history(client, parent_id, f"{key}/final_val_psnr_mean")
        assert final == [(0, pytest.approx(table.loc[arm, "final_mean"], abs=1e-9))]
        assert _history(client, parent_id, f"{key}/final_val_psnr_sd") == \
            [(0, pytest.approx(table.loc[arm, "final_sd"], abs=1e-9))]
        assert _history(client, parent_id, f"{key}/delta_vs_reference") == \
            [(0, pytest.approx(table.loc[arm, "diff_vs_reference"], abs=1e-9))]
        assert _history(client, parent_id, f"{key}/seeds") == [(0, table.loc[arm, "n"])]
    return table


def test_group_metrics_on_the_parent_equal_the_summary_and_follow_added_seeds(
        tracking_store, tmp_path):
    client = MlflowClient()
    parent_id = _fake_study(client, {("a", 0): [20.0, 21.0, 22.0], ("a", 1): [19.0, 21.5, 23.0],
                                     ("b+c", 0): [18.0, 20.0, 21.0],
                                     ("b+c", 1): [18.5, 19.0, 22.5]})
    client.log_metric(parent_id, "gone_arm/val_psnr_mean", 1.0, step=0)  # an older arm's
    report_module.write_report(load_study("s", client=client, per_frame=False), tmp_path / "r")
    table = _check_group_metrics(client, parent_id)
    assert table.loc["a", "final_mean"] == pytest.approx(22.5)
    assert "gone_arm/val_psnr_mean" not in client.get_run(parent_id).data.metrics

    # A third seed of arm a: the redraw replaces the curves (no old value left at a step).
    _fake_study(client, {("a", 2): [10.0, 11.0, 12.0]})
    report_module.write_report(load_study("s", client=client, per_frame=False), tmp_path / "r")
    table = _check_group_metrics(client, parent_id)
    assert table.loc["a", "n"] == 3
    assert _history(client, parent_id, "a/final_val_psnr_mean") == \
        [(0, pytest.approx((22.0 + 23.0 + 12.0) / 3))]


def test_one_seed_logs_means_but_no_spread():
    metrics = pd.DataFrame({"run_id": ["r"] * 2, "study": "s", "arm": "a", "group": "a",
                            "seed": 0, "epoch": [0, 1], "metric": "val/psnr",
                            "value": [20.0, 21.0]})
    assert ui.curves(metrics) == {"a/val_psnr_mean": [(0, 20.0), (1, 21.0)]}


@pytest.mark.parametrize("name, key", [("tfr_decay+kl_cyclical", "tfr_decay.kl_cyclical"),
                                       ("report_final@1234abcd", "report_final.1234abcd"),
                                       ("a/b:c", "a.b.c"), ("..", "_..")])
def test_metric_key_prefixes_are_keys_mlflow_takes(name, key, tracking_store):
    assert ui.prefix(name) == key
    client = MlflowClient()
    run = client.create_run(client.create_experiment("keys"))
    client.log_metric(run.info.run_id, f"{key}/val_psnr_mean", 1.0)  # raises if refused


def test_a_tracking_server_appends_only_what_changed(tracking_store, monkeypatch):
    """Where the store cannot delete (a tracking server), new values are appended after the
    old ones, and an unchanged redraw writes nothing."""
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("server")).info.run_id
    monkeypatch.setattr(tracking, "_delete_metrics", lambda client, run_id, keys: False)
    assert tracking.replace_metrics(client, run_id, {"a/m": [(0, 1.0), (1, 2.0)]}) is False
    assert tracking.replace_metrics(client, run_id, {"a/m": [(0, 1.0), (1, 2.0)]}) is True
    assert len(client.get_metric_history(run_id, "a/m")) == 2
    tracking.replace_metrics(client, run_id, {"a/m": [(0, 3.0), (1, 4.0)]})
    assert len(client.get_metric_history(run_id, "a/m")) == 4
    assert client.get_run(run_id).data.metrics["a/m"] == 4.0


# ---------------------------------------------------------------------------------------------
# Experiments, parent runs, run names
# ---------------------------------------------------------------------------------------------
def test_experiments_are_model_training_and_described_without_overwriting_edits(
        tracking_store):
    client = MlflowClient()
    experiment_id = tracking.get_or_create_experiment("e", description="What e compares.")
    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == "What e compares."
    client.set_experiment_tag(experiment_id, "mlflow.note.content", "edited in the UI")
    old = client.create_experiment("old")  # made by an earlier version: no tags
    assert tracking.get_or_create_experiment("e", description="What e compares.") == experiment_id
    assert tracking.get_or_create_experiment("old") == old
    assert client.get_experiment(experiment_id).tags["mlflow.note.content"] == "edited in the UI"
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_study_experiment_and_its_parent_say_what_they_are(tracking_store, tmp_path):
    grid = Grid("kl_ablation", get_ablation("kl"), (0,), "smoke", doc=kl_ablation.__doc__)
    client, study = open_study(grid, device="cpu")
    experiment = client.get_experiment(study.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    note = experiment.tags["mlflow.note.content"]
    assert note.startswith("KL annealing ablation (the report's Table 2, Figs. 1 and 3)")
    assert "`kl_cyclical` (reference)" in note and "<arm>/val_psnr_mean" in note
    tags = client.get_run(study.parent_run_id).data.tags
    assert (tags["device"], tags["runner"]) == ("cpu", "local")

    # Through a queue whose workers run elsewhere: no device on the parent; a private
    # (temporary) queue is not named on it, a shared one is.
    journal = tmp_path / "q.journal"
    queue.coordinate(str(journal), "kl_ablation", grid, private=True)
    tags = client.get_run(study.parent_run_id).data.tags
    assert "device" not in tags and tags["runner"] == "queue"
    assert "optuna_storage" not in tags and "optuna_study" not in tags
    queue.coordinate(str(journal), "kl_ablation", grid, device="cuda")
    tags = client.get_run(study.parent_run_id).data.tags
    assert (tags["device"], tags["optuna_storage"]) == ("cuda", str(journal))
    # A tag an older version wrote for its private queue, now deleted, is removed.
    client.set_tag(study.parent_run_id, "optuna_storage", str(tmp_path / "gone" / "queue.log"))
    queue.coordinate(str(journal), "kl_ablation", grid, private=True)
    assert "optuna_storage" not in client.get_run(study.parent_run_id).data.tags


def test_run_names_sort_by_arm_then_seed():
    names = [run_name(arm, seed) for arm in ("kl_cyclical", "kl_constant") for seed in (10, 2, 0)]
    assert sorted(names) == ["kl_constant-s00", "kl_constant-s02", "kl_constant-s10",
                             "kl_cyclical-s00", "kl_cyclical-s02", "kl_cyclical-s10"]


def test_trials_link_their_run_on_a_tracking_server(tracking_store, monkeypatch):
    client = MlflowClient()
    experiment_id = client.create_experiment("tune-x")
    run_id = client.create_run(experiment_id, tags={"spec_hash": "h", "seed": "0"}).info.run_id
    objective = tuning.Objective.__new__(tuning.Objective)
    trial = FixedTrial({})
    objective._mark(trial, experiment_id, None, run_id, "COMPLETE")
    assert "mlflow_run_url" not in trial.user_attrs  # a local store: no server to link
    monkeypatch.setattr(tracking, "tracking_uri",
                        lambda: "https://cvae:hunter2@mlflow.lab:5000/?x=1")
    objective._mark(trial, experiment_id, None, run_id, "COMPLETE")
    assert trial.user_attrs["mlflow_run_url"] == (
        f"https://mlflow.lab:5000/#/experiments/{experiment_id}/runs/{run_id}"
        "?workflowType=machine_learning")


def test_creating_a_store_prints_no_mlflow_info_lines(tmp_path):
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    code = "from experiments import tracking; tracking.configure()"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert done.stderr == "" and done.stdout == ""


# ---------------------------------------------------------------------------------------------
# Finding studies
# ---------------------------------------------------------------------------------------------
TINY = """base = "report_final"
name = "tiny"
[data]
clip_len = 4
partial = 0.25
"""


def test_list_and_report_tell_ablation_from_tuning_studies(tracking_store, tmp_path, capsys,
                                                           one_thread):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    assert kl_ablation.main([*SMOKE, "--epochs", "1", "--seeds", "0", "--arms", "kl_cyclical",
                             "--jobs", "1"]) == 0
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    assert tune.main(["--spec", str(spec), "--n-trials", "2", *SMOKE, "--epochs", "1",
                      "--sampler", "random", "--pruner", "none"]) == 0
    study = optuna.load_study(study_name="tiny-smoke-1ep", storage="sqlite:///mlruns/optuna.db")
    assert study.metric_names == ["val/psnr"]
    client = MlflowClient()
    (run,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("kl_ablation").experiment_id]) if "arm" in r.data.tags]
    assert run.info.run_name == "kl_cyclical-s00"
    # The spec's prose (written for the registered spec: "40 cycles") is the run's note, not
    # a param that disagrees with the params the profile resolved.
    assert "description" not in run.data.params and run.data.params["kl.cycles"] != "40"
    note = run.data.tags["mlflow.note.content"]
    assert "40 cycles" in note and "resolved it under the `smoke` profile" in note
    capsys.readouterr()

    assert studies_main.main(["list"]) == 0
    out = capsys.readouterr().out
    kl_id = client.get_experiment_by_name("kl_ablation").experiment_id
    assert f"kl_ablation (ablation, experiment {kl_id})" in out
    assert "  kl_ablation-smoke-1ep: profile smoke, 1 epochs, arms kl_cyclical, seeds 0" in out
    assert "runs: 1 finished, 0 running, 0 interrupted, 0 failed · last update 20" in out
    assert "report: mlruns/reports/kl_ablation/" in out
    assert "tune-tiny-smoke-1ep (tuning, experiment" in out
    assert "  tiny-smoke-1ep: profile smoke, 1 epochs, spec tiny, 2 trials asked" in out
    assert "trials: 2 complete, 0 pruned, 0 failed, 0 running · best val/psnr" in out
    assert "report: mlruns/reports/tiny-smoke-1ep/" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert f"http://127.0.0.1:5000/#/experiments/{kl_id}/runs?workflowType=machine_learning" \
        in out
    assert studies_main.main(["list", "tune-*"]) == 0
    assert "kl_ablation" not in capsys.readouterr().out
    for name in ("kl_ablation", "tune-tiny-smoke-1ep"):
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == \
            "custom_model_development"
    with pytest.raises(SystemExit) as exit_info:
        studies_main.main(["--help"])
    assert exit_info.value.code == 0 and "python -m studies list" in capsys.readouterr().out

    # The report redraws each study as what it is: no ablation report of the tuning study.
    trials_csv = tmp_path / "mlruns" / "reports" / "tiny-smoke-1ep" / "trials.csv"
    trials_csv.unlink()
    assert report_module.main([]) == 0
    out = capsys.readouterr().out
    assert "kl_ablation: " in out and "[tiny-smoke-1ep] tuning report: " in out
    assert trials_csv.is_file()
    assert not (tmp_path / "mlruns" / "reports" / "tune-tiny-smoke-1ep").exists()
    assert report_module.main(["--study", "tune-tiny-smoke-1ep"]) == 0

    # A misspelt study: one line naming the studies there.
    assert report_module.main(["--study", "kl_ablaton"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: no study 'kl_ablaton' in sqlite:///")
    assert err.endswith("studies there: kl_ablation (ablation), tune-tiny-smoke-1ep (tuning)")
    assert studies_main.main(["list", "nothing*"]) == 2
    assert "no studies matching 'nothing*'" in capsys.readouterr().err


def test_list_on_a_folder_without_a_store_creates_none(tmp_path):
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "studies", "list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: no tracking store sqlite:///mlruns/mlflow.db here")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "mlruns").exists()
    bad = subprocess.run([sys.executable, "-m", "studies", "lsit"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "invalid choice: 'lsit'" in bad.stderr
