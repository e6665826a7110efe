"""The ablation studies end to end on the smoke profile: runs, tidy table, figures, summary,
reuse on rerun, resume of an interrupted run, and the report redrawn from MLflow alone."""

from __future__ import annotations

import itertools
import re

import pandas as pd
import pytest
from conftest import run_cli
from mlflow.tracking import MlflowClient

from studies import calibration, kl_ablation, prior_ablation, sigmoid_ablation, tfr_ablation
from studies import report as report_module
from studies.queue import cpu_count
from studies.results import COLUMNS, FRAME_COLUMNS, load_study

SMOKE = ["--profile", "smoke", "--epochs", "2", "--device", "cpu"]
EPOCH_METRICS = ["train/loss", "train/mse", "train/kl", "train/beta", "train/tfr", "train/lr",
                 "val/loss", "val/psnr"]
FIGURES = ["beta.png", "teacher_forcing.png", "train_loss.png", "val_loss.png", "val_psnr.png",
           "psnr_per_frame.png", "filmstrip.png"]
TABLES = ["metrics.csv", "metrics.parquet", "psnr_per_frame.csv", "psnr_per_frame.parquet",
          "summary.csv", "summary_readouts.csv", "summary.md"]
SMOKE_VAL_FRAMES = 48
KL_FLAT = ("teacher_forcing.png",)  # the KL arms train without teacher forcing: 0 throughout


def _experiment_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    return list(client.search_runs([experiment.experiment_id])) if experiment else []


def _split(runs):
    parents = [r for r in runs if r.data.tags.get("study_parent") == "1"]
    return parents, [r for r in runs if r.data.tags.get("study_parent") != "1"]


def _check_report(out, summary_arms: list[str], client: MlflowClient, children, *,
                  flat: tuple[str, ...] = ()) -> pd.DataFrame:
    """The report's files; the figures in ``flat`` (a metric with one value in every run and
    epoch) are left out."""
    for name in FIGURES + TABLES:
        if name in flat:
            assert not (out / name).exists(), name
        else:
            assert (out / name).stat().st_size > 0, name
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert list(summary.index) == summary_arms
    # The summary agrees with MLflow: mean of each arm's runs' last val/psnr.
    for arm in summary_arms:
        last = [client.get_run(r.info.run_id).data.metrics["val/psnr"]
                for r in children if r.data.tags["arm"] == arm]
        assert summary.loc[arm, "final_mean"] == pytest.approx(sum(last) / len(last), abs=1e-9)
        assert summary.loc[arm, "n"] == len(last)
    return summary


def test_kl_study_runs_reports_reuses_resumes_and_redraws(tracking_store, tmp_path):
    arms = ["kl_cyclical", "kl_monotonic", "kl_constant"]
    # The default on a CPU: one single-threaded worker process per core share the six runs.
    first = run_cli("studies.kl_ablation", *SMOKE, "--seeds", "0", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = min(cpu_count(), 6)
    if jobs > 1:
        assert f"{jobs} worker process(es) here, {cpu_count() // jobs} thread(s) each" \
            in first.stdout
        assert first.stdout.count("done: val/psnr") == 6
        workers = {line.split(":")[1] for line in first.stdout.splitlines()
                   if "done: val/psnr" in line}
        assert len(workers) > 1  # the runs were shared
        # Not a terminal: the workers' per-epoch lines and the study's ETA lines, relayed.
        assert first.stdout.count("[kl_cyclical-s01] epoch ") == 2
        assert re.search(r"study kl_ablation: \d/6 complete, \d running, \d waiting, 0 failed · "
                         r"\d+% of the epochs · study ETA \d+ (s|min)", first.stdout), first.stdout
    else:
        assert first.stdout.count(": start") == 6
    # The short summary: the study's readouts (auc first), each within 100 columns.
    printed = first.stdout[first.stdout.index("kl_ablation: profile smoke"):
                           first.stdout.index("report: ")]
    assert max(len(line) for line in printed.splitlines()) <= 100, printed
    assert "| `" not in printed and "auc (dB)" in printed and "final (dB)" in printed
    assert printed.index("auc (dB)") < printed.index("epochs_to_floor") < \
        printed.index("final (dB)")
    assert any(line.startswith("kl_monotonic ") for line in printed.splitlines())

    client = MlflowClient()
    names = {e.name for e in client.search_experiments()}
    assert names == {"Default", "kl_ablation"}
    parents, children = _split(_experiment_runs(client, "kl_ablation"))
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["study"] == "kl_ablation" and parent.data.tags["profile"] == "smoke"
    assert sorted((r.data.tags["arm"], int(r.data.tags["seed"])) for r in children) == \
        sorted(itertools.product(arms, [0, 1]))
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["study"], tags["group"], tags["profile"]) == (
            "kl_ablation", tags["arm"], "smoke")

    # The tidy table: one row per run x epoch x metric, as MLflow holds them.
    results = load_study("kl_ablation", client=client)
    metrics, per_frame = results.metrics, results.per_frame
    assert list(metrics.columns) == COLUMNS and list(per_frame.columns) == FRAME_COLUMNS
    assert not metrics.duplicated(["run_id", "epoch", "metric"]).any()
    assert set(metrics["run_id"]) == {r.info.run_id for r in children}
    for run in children:
        mine = metrics[metrics["run_id"] == run.info.run_id]
        for key in EPOCH_METRICS:
            assert sorted(mine.loc[mine["metric"] == key, "epoch"]) == [0, 1], key
        assert len(mine) == sum(len(client.get_metric_history(run.info.run_id, k))
                                for k in run.data.metrics)
    assert len(per_frame) == len(children) * (SMOKE_VAL_FRAMES - 1) * 2
    assert set(per_frame["frame"]) == set(range(2, SMOKE_VAL_FRAMES + 1))
    # Fig. 4 and the curves agree: each run's per-frame PSNR averages to its last val/psnr.
    frame_means = per_frame[per_frame["metric"] == "val/psnr_per_frame"] \
        .groupby("run_id")["value"].mean()
    for run in children:
        assert frame_means[run.info.run_id] == pytest.approx(
            run.data.metrics["val/psnr"], abs=1e-4)

    out = tmp_path / "mlruns" / "reports" / "kl_ablation"
    summary = _check_report(out, arms, client, children, flat=KL_FLAT)
    assert summary.loc["kl_cyclical", "verdict"] == "reference"
    csv = pd.read_csv(out / "metrics.csv")
    assert len(csv) == len(metrics) and len(pd.read_parquet(out / "metrics.parquet")) == len(csv)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{name}" for name in FIGURES + TABLES if name not in KL_FLAT} <= logged

    # Rerun after "interrupting" one run: the others are reused, that one resumes into the
    # same run id, and no run is added.
    interrupted = next(r for r in children if r.data.tags["arm"] == "kl_monotonic")
    client.update_run(interrupted.info.run_id, status="KILLED")
    again = run_cli("studies.kl_ablation", *SMOKE, "--seeds", "0", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "worker process" not in again.stdout  # one run left to do: no workers for it
    assert again.stdout.count("reused run") == 5
    assert f"resuming run {interrupted.info.run_id}" in again.stdout
    parents2, children2 = _split(_experiment_runs(client, "kl_ablation"))
    assert [p.info.run_id for p in parents2] == [parent.info.run_id]
    assert {r.info.run_id for r in children2} == {r.info.run_id for r in children}
    assert client.get_run(interrupted.info.run_id).info.status == "FINISHED"
    again_metrics = load_study("kl_ablation", client=client, per_frame=False).metrics
    assert not again_metrics.duplicated(["run_id", "epoch", "metric"]).any()
    assert len(again_metrics) == len(metrics)

    # The report from MLflow alone regenerates every file.
    for path in out.iterdir():
        path.unlink()
    redraw = run_cli("studies.report", "--study", "kl_ablation", cwd=tmp_path)
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert "| `kl_constant` |" in redraw.stdout
    assert "kl_ablation: no teacher_forcing.png: train/tfr is 0 for every run at every epoch" \
        in redraw.stdout
    redrawn = _check_report(out, arms, client, children, flat=KL_FLAT)
    pd.testing.assert_frame_equal(redrawn, summary)


def test_bad_arms_exit_2_listing_the_valid_ones(tracking_store, capsys):
    assert kl_ablation.main(["--arms", "kl_cyclical", "nope", *SMOKE]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "kl_cyclical, kl_monotonic, kl_constant" in err
    assert tfr_ablation.main(["--report-groups", "--arms", "tfr_off", *SMOKE]) == 2
    assert "tfr_off+kl_cyclical" in capsys.readouterr().err


@pytest.mark.parametrize("module", [kl_ablation, tfr_ablation, sigmoid_ablation, prior_ablation,
                                    calibration])
def test_help_names_the_hyperparameters_and_the_command(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("Scientific", "Nuisance", "Fixed", f"python -m {module.__name__}", "--seeds",
                 "--arms", "--profile", "--epochs", "--data", "--device", "--until-decided",
                 "--max-seeds", "--seed-step", "Readout"):
        assert word in text, word


@pytest.mark.parametrize("module, arms", [(sigmoid_ablation, ["identity", "sigmoid"]),
                                          (prior_ablation, ["prior_standard", "prior_learned"])])
def test_two_arm_studies_in_process(module, arms, tracking_store, tmp_path):
    name = module.STUDY.name
    assert module.main([*SMOKE, "--epochs", "1", "--seeds", "0"]) == 0
    client = MlflowClient()
    parents, children = _split(_experiment_runs(client, name))
    assert len(parents) == 1 and sorted(r.data.tags["arm"] for r in children) == sorted(arms)
    # One epoch: β is one value, the same for both arms (and teacher forcing is off).
    summary = _check_report(tmp_path / "mlruns" / "reports" / name, arms, client, children,
                            flat=("beta.png", "teacher_forcing.png"))
    assert summary.loc[arms[1], "verdict"] == "not enough seeds"

    # A configuration holds its runs by spec hash: a later parent listing the same arms (say,
    # after a code change that left these specs alone) counts them although they point at
    # the first parent; the most recently used parent is the default.
    (parent,) = parents
    later = client.create_run(parent.info.experiment_id, tags={
        "study": name, "study_parent": "1", "spec_hashes": parent.data.tags["spec_hashes"]})
    client.set_terminated(later.info.run_id)
    results = load_study(name, client=client, per_frame=False)
    assert results.meta.parent_run_id == later.info.run_id
    assert {r.info.run_id for r in results.runs} == {r.info.run_id for r in children}


def test_tfr_report_groups_pools_kl_arms_per_group(tracking_store, tmp_path, capsys):
    arms = ["tfr_decay+kl_cyclical", "tfr_decay+kl_constant", "tfr_off+kl_cyclical",
            "tfr_off+kl_constant"]
    assert tfr_ablation.main(["--report-groups", *SMOKE, "--epochs", "1", "--seeds", "0",
                              "--arms", *arms]) == 0
    client = MlflowClient()
    assert client.get_experiment_by_name("tfr_ablation") is None
    parents, children = _split(_experiment_runs(client, "tfr_report_groups"))
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["arm"]: r.data.tags["group"] for r in children} == {
        a: a.split("+")[0] for a in arms}
    out = tmp_path / "mlruns" / "reports" / "tfr_report_groups"
    # One epoch: the cyclical arms end it at β = 1, as the constant ones do.
    _check_report(out, arms, client, children, flat=("beta.png",))
    assert "tfr_report_groups: no beta.png: train/beta is 1 for every run at every epoch" \
        in capsys.readouterr().out
    groups = pd.read_csv(out / "summary_groups.csv", index_col=0)
    assert list(groups.index) == ["tfr_decay", "tfr_off"] and list(groups["runs"]) == [2, 2]
    assert list(groups["n"]) == [1, 1]  # one seed: the two KL arms' runs are not replicates
    assert list(groups["verdict"]) == ["reference", "not enough seeds"]
    assert "## By group" in (out / "summary.md").read_text()

    capsys.readouterr()
    assert report_module.main([]) == 0  # every study in the store
    assert "tfr_report_groups: " in capsys.readouterr().out


def test_sigterm_on_a_parallel_study_leaves_nothing_running_and_it_resumes(tracking_store,
                                                                           tmp_path):
    """SIGTERM to the study while its two worker processes train: every run ends KILLED
    (none RUNNING), the workers exit, and the same command then finishes the grid, resuming
    the interrupted runs in place."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import cli_env

    argv = [sys.executable, "-m", "studies.kl_ablation", "--profile", "smoke", "--epochs", "4",
            "--device", "cpu", "--seeds", "0", "--arms", "kl_cyclical", "kl_monotonic",
            "--jobs", "2"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    client = MlflowClient()
    deadline = time.time() + 300
    while time.time() < deadline:  # until both runs have logged their first epoch
        runs = _split(_experiment_runs(client, "kl_ablation"))[1]
        if len(runs) == 2 and all(client.get_metric_history(r.info.run_id, "train/loss")
                                  for r in runs):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    parents, children = _split(_experiment_runs(client, "kl_ablation"))
    assert len(children) == 2
    statuses = {r.info.status for r in children} | {parents[0].info.status}
    assert "RUNNING" not in statuses and "KILLED" in statuses, statuses
    import os
    import re

    pids = {int(p) for p in re.findall(r"worker [^:\s]+:(\d+):", out)}
    assert len(pids) == 2, out[-3000:]
    for pid in pids:  # the workers went with it
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    again = run_cli("studies.kl_ablation", *argv[3:], cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    killed = [r for r in children if r.info.status == "KILLED"]
    for run in killed:
        assert f"resuming run {run.info.run_id}" in again.stdout
    children2 = _split(_experiment_runs(client, "kl_ablation"))[1]
    assert {r.info.run_id for r in children2} == {r.info.run_id for r in children}
    assert {r.info.status for r in children2} == {"FINISHED"}
    for run in children2:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == [0, 1, 2, 3]


def test_runs_of_one_arm_with_different_settings_are_not_pooled_as_seeds(tracking_store):
    """Runs filed without a study's parent (``experiments run`` with different ``--set``,
    tuning trials) may hold several configurations of one arm: each is its own group
    (``arm@hash``), never seeds of one, and runs of one configuration still pool."""
    client = MlflowClient()
    experiment = client.create_experiment("runs")
    for seed, spec, psnr in ((0, "aaaaaaaa1111", 20.0), (1, "aaaaaaaa1111", 21.0),
                             (0, "bbbbbbbb2222", 9.0), (0, "cccccccc3333", 30.0)):
        arm = "report_final" if spec != "cccccccc3333" else "kl_constant"
        run = client.create_run(experiment, tags={"study": "runs", "arm": arm,
                                                  "seed": str(seed), "spec_hash": spec})
        client.log_metric(run.info.run_id, "val/psnr", psnr, step=0)
        client.set_terminated(run.info.run_id)
    results = load_study("runs", per_frame=False)
    assert sorted(results.meta.arms) == ["kl_constant", "report_final@aaaaaaaa",
                                         "report_final@bbbbbbbb"]
    seeds = results.metrics.groupby("arm")["seed"].apply(sorted).to_dict()
    assert seeds == {"kl_constant": [0], "report_final@aaaaaaaa": [0, 1],
                     "report_final@bbbbbbbb": [0]}
    assert set(results.metrics["group"]) == set(results.metrics["arm"])


def test_summary_names_the_runs_it_leaves_out(tracking_store, tmp_path):
    """A FAILED run (a diverged loss is a result) or an unfinished one is not averaged, but
    the summary says which (arm, seed) it lacks and why, unless a FINISHED run replaced it."""
    client = MlflowClient()
    experiment = client.create_experiment("s")
    parent = client.create_run(experiment, tags={"study": "s", "study_parent": "1",
                                                 "spec_hashes": "aaaa,bbbb", "arm_order": "a,b",
                                                 "reference_arm": "a"})
    client.set_terminated(parent.info.run_id)
    for arm, spec, seed, status, psnr in (("a", "aaaa", 0, "FINISHED", 20.0),
                                          ("a", "aaaa", 1, "FINISHED", 21.0),
                                          ("b", "bbbb", 0, "FINISHED", 22.0),
                                          ("b", "bbbb", 1, "FAILED", None),
                                          ("b", "bbbb", 2, "KILLED", None)):
        run = client.create_run(experiment, tags={"study": "s", "arm": arm, "seed": str(seed),
                                                  "spec_hash": spec})
        if psnr is not None:
            client.log_metric(run.info.run_id, "val/psnr", psnr, step=0)
        if status == "FAILED":
            client.set_tag(run.info.run_id, "stop_reason", "non-finite loss at epoch 3")
        client.set_terminated(run.info.run_id, status)
    replaced = client.create_run(experiment, tags={"study": "s", "arm": "a", "seed": "0",
                                                   "spec_hash": "aaaa"})
    client.set_terminated(replaced.info.run_id, "KILLED")  # seed 0 of a has a FINISHED run
    results = load_study("s", per_frame=False)
    assert [(r.data.tags["arm"], r.data.tags["seed"]) for r in results.unfinished] == \
        [("b", "1"), ("b", "2")]
    text = report_module.write_report(results, tmp_path / "out", log_to_parent=False).markdown
    assert "Not in the table (no FINISHED run of this arm and seed): `b` seed 1: FAILED " \
           "(non-finite loss at epoch 3); `b` seed 2: KILLED." in text
