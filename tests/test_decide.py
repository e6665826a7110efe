"""Studies that decide: readouts in the report, the terminal summary, seeds until decided
(rounds, their stopping rule, the design on the parent run and the report that replays it),
and the calibration study's A/A copy (its replicate salt)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.registry import get_ablation, resolve
from experiments.runner import build_state, rng_seed
from experiments.spec import spec_hash
from studies import calibration, cli, kl_ablation, summary
from studies import report as report_module
from studies.grid import Grid, StudyRun
from studies.results import SEQUENTIAL_TAGS, load_study

# ---------------------------------------------------------------------------------------------
# The report of a study with readouts and a sequential design, from a hand-made store
# ---------------------------------------------------------------------------------------------
REFERENCE = [20.0, 24.0, 22.0, 26.0, 21.0, 23.0]
DIFFERENCES = {
    "decided": [1.0, 1.01, 0.99, 1.0, 1.02, 0.98],  # crosses the look at 4 seeds
    "borderline": [0.5, 0.1, 0.9, -0.1, 0.6, 0.3],  # fixed test: p 0.048 at 6 seeds
}
DESIGN = {"sequential_readout": "auc", "sequential_looks": "2,4,6",
          "sequential_max_seeds": "6", "sequential_seeds": "0 1 2 3 4 5"}


def _store(client: MlflowClient, *, design: bool) -> str:
    """Study ``s``: arms ref, decided, borderline over seeds 0-5 (the design's) and seed 9 (run
    otherwise, far off); each run's val PSNR flat over 2 epochs, so auc == final."""
    experiment = client.create_experiment("s")
    tags = {"study": "s", "study_parent": "1", "spec_hashes": "h-ref,h-decided,h-borderline",
            "arm_order": "ref,decided,borderline", "reference_arm": "ref", "profile": "smoke",
            "readouts": "auc,final", **(DESIGN if design else {})}
    parent = client.create_run(experiment, tags=tags)
    client.set_terminated(parent.info.run_id)
    for arm in ("ref", *DIFFERENCES):
        for seed in [*range(6), 9]:
            value = REFERENCE[seed] if seed < 6 else 40.0
            if arm != "ref":
                value += DIFFERENCES[arm][seed] if seed < 6 else 5.0
            run = client.create_run(experiment, tags={
                "study": "s", "arm": arm, "group": arm, "seed": str(seed), "spec_hash": f"h-{arm}",
                "mlflow.parentRunId": parent.info.run_id})
            for epoch in (0, 1):
                client.log_metric(run.info.run_id, "val/psnr", value, step=epoch)
                client.log_metric(run.info.run_id, "train/loss", 50.0 - value, step=epoch)
            client.log_metric(run.info.run_id, "val/psnr_copy_first", 10.0, step=0)
            client.set_terminated(run.info.run_id)
    return parent.info.run_id


def test_report_reads_the_sequential_design_from_the_parent(tracking_store, tmp_path):
    client = MlflowClient()
    parent = _store(client, design=True)
    report = report_module.write_report(load_study("s", per_frame=False), tmp_path / "out",
                                        log_to_parent=False)
    out = tmp_path / "out"
    # summary.csv keeps its columns; summary_readouts.csv is the long table, the study's own
    # readouts first.
    assert list(pd.read_csv(out / "summary.csv").columns) == ["arm", *summary.SUMMARY_COLUMNS]
    long = pd.read_csv(out / "summary_readouts.csv")
    assert list(long.columns) == ["arm", *summary.READOUT_COLUMNS]
    assert list(long["readout"].unique()) == ["auc", "final", "best", "epochs_to_floor",
                                              "train_loss_auc"]
    rows = long.set_index(["readout", "arm"])
    # The design's seeds only (seed 9 was run otherwise), read with its boundaries.
    assert set(rows["n"]) == {6}
    for readout in ("auc", "final"):
        assert rows.loc[(readout, "decided"), ["verdict", "seeds_used"]].tolist() == \
            ["better", 4]
        assert rows.loc[(readout, "borderline"), "verdict"] == \
            "no detectable difference at 6 seeds"
        assert rows.loc[(readout, "borderline"), "verdict_basis"] == summary.SEQUENTIAL_BASIS
    d = DIFFERENCES["borderline"]
    assert rows.loc[("auc", "borderline"), "seeds_needed"] == \
        summary.seeds_needed(np.mean(d), np.std(d, ddof=1))

    text = (out / "summary.md").read_text()
    assert text == report.markdown
    assert "looks at 2, 4, 6 of at most 6 seeds" in text and "Lan & DeMets 1983" in text
    assert "seeds 9 of this configuration, run otherwise, are not in the summary" in text
    # Verdicts on the other readouts are not corrected for multiplicity: the report says so.
    assert "5% chance of a \"better\" or \"worse\" on each of the 4 others" in text
    sections = [text.index(f"### `{name}`") for name in
                ("auc", "final", "best", "epochs_to_floor", "train_loss_auc")]
    assert sections == sorted(sections)
    assert "### `auc` (primary" in text and "### `final` (answers the study's question)" in text
    # the final / best table, then auc, final, best and train loss (lower: 50 - PSNR)
    assert text.count("| better (decided at 4 seeds) |") == 5

    # The terminal form: the study's readouts, short, within 100 columns.
    lines = report.terminal.splitlines()
    assert max(len(line) for line in lines) <= 100, report.terminal
    assert "| `" not in report.terminal
    assert report.terminal.count("better (decided at 4 seeds)") == 2  # auc and final
    assert any(line.startswith("arm ") and "auc (dB)" in line for line in lines)
    assert lines[-1] == f"  {out / 'summary.md'}"

    # Without the design the same runs are read with the fixed-seed test, over every seed.
    for key in SEQUENTIAL_TAGS:
        client.delete_tag(parent, key)
    fixed = report_module.write_report(load_study("s", per_frame=False), tmp_path / "fixed",
                                       log_to_parent=False).readouts.set_index(["readout", "arm"])
    assert set(fixed["n"]) == {7}
    assert fixed.loc[("final", "decided"), "verdict_basis"] == "paired by seed"


# ---------------------------------------------------------------------------------------------
# Rounds of seeds, with the runs and the test replaced by a script
# ---------------------------------------------------------------------------------------------
def _rounds(monkeypatch, script, *, max_seeds, step, seeds=(0, 1)):
    """Run ``cli.run_until_decided`` on the calibration grid with ``script`` (one dict of
    verdicts per round) standing in for the runs and their test; returns the grids run and
    the designs recorded."""
    grids, designs, answers = [], [], iter(script)

    def fake_run(grid, args, device):
        grids.append(grid)
        return StudyRun(grid.study, "1", "parent", failures=[f"round {len(grids)}"])

    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.setattr(cli, "record_design", lambda run_id, study, design: designs.append(
        design))
    monkeypatch.setattr(cli, "verdicts", lambda study, run_id: next(answers))
    grid = Grid("calibration", get_ablation("calibration"), seeds, "smoke")
    args = argparse.Namespace(max_seeds=max_seeds, seed_step=step)
    ran = cli.run_until_decided(calibration.STUDY, grid, args, "cpu")
    assert ran.failures == [f"round {n}" for n in range(1, len(grids) + 1)]
    return grids, designs


UNDECIDED = "no detectable difference at 2 seeds"


def test_rounds_add_seeds_drop_decided_arms_and_stop_at_max(monkeypatch, capsys):
    script = [{"calibration_copy": UNDECIDED, "calibration_low_lr": UNDECIDED},
              {"calibration_copy": UNDECIDED, "calibration_low_lr": "worse"},
              {"calibration_copy": UNDECIDED, "calibration_low_lr": "worse"}]
    grids, designs = _rounds(monkeypatch, script, max_seeds=6, step=2)
    assert [g.seeds for g in grids] == [(0, 1), (2, 3), (4, 5)]
    assert [g.arms for g in grids] == [(), (), ("calibration_reference", "calibration_copy")]
    assert [d.seeds for d in designs] == [(0, 1), (0, 1, 2, 3), (0, 1, 2, 3, 4, 5)]
    assert {(d.readout, d.looks, d.max_seeds) for d in designs} == {("final", (2, 4, 6), 6)}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("round")]
    assert lines == [
        ("round 1: seeds 0 1 (2 of at most 6); decided: none; undecided: calibration_copy, "
        "calibration_low_lr"),
        ("round 2: seeds 2 3 (4 of at most 6); decided: calibration_low_lr worse; undecided: "
        "calibration_copy"),
        ("round 3: seeds 4 5 of calibration_reference, calibration_copy (6 of at most 6); "
        "decided: calibration_low_lr worse; undecided: calibration_copy")]


def test_rounds_stop_once_every_comparison_is_decided(monkeypatch):
    decided = {"calibration_copy": "better", "calibration_low_lr": "worse"}
    grids, _ = _rounds(monkeypatch, [{"calibration_copy": UNDECIDED,
                                      "calibration_low_lr": "worse"}, decided],
                       max_seeds=10, step=3, seeds=(0,))
    assert [g.seeds for g in grids] == [(0,), (1, 2, 3)]
    # The last round is capped at --max-seeds; looks every 3 seeds from 2 on, and the last.
    grids, designs = _rounds(monkeypatch, [{"calibration_copy": UNDECIDED}] * 2,
                             max_seeds=4, step=3)
    assert [g.seeds for g in grids] == [(0, 1), (2, 3)] and designs[0].looks == (3, 4)


@pytest.mark.parametrize("argv, message", [
    (["--max-seeds", "4"], "--max-seeds: only with --until-decided"),
    (["--until-decided"], "--until-decided needs --max-seeds N"),
    (["--until-decided", "--max-seeds", "1"], "--max-seeds=1 must be >= 2"),
    (["--until-decided", "--max-seeds", "4", "--seed-step", "0"], "--seed-step=0 must be >= 1"),
    (["--until-decided", "--max-seeds", "2", "--seeds", "0", "1", "2"],
     "--seeds gives 3 seeds, more than --max-seeds 2"),
    (["--until-decided", "--max-seeds", "4", "--arms", "kl_monotonic"],
     "reference arm kl_cyclical: keep it in --arms"),
])
def test_until_decided_bad_flags_fail_in_one_line(argv, message, tracking_store, capsys):
    assert kl_ablation.main([*argv, "--profile", "smoke", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert MlflowClient().get_experiment_by_name("kl_ablation") is None


# ---------------------------------------------------------------------------------------------
# The calibration study end to end at smoke size, until decided
# ---------------------------------------------------------------------------------------------
CALIBRATION = ["--profile", "smoke", "--epochs", "1", "--device", "cpu", "--jobs", "1",
               "--seeds", "0", "--until-decided", "--max-seeds", "2", "--seed-step", "1"]
ARMS = ["calibration_reference", "calibration_copy", "calibration_low_lr"]


def _children(client: MlflowClient) -> dict[tuple[str, int], object]:
    experiment = client.get_experiment_by_name("calibration")
    return {(r.data.tags["arm"], int(r.data.tags["seed"])): r
            for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("study_parent") != "1"}


def test_calibration_until_decided_end_to_end(tracking_store, tmp_path, capsys):
    assert calibration.main(CALIBRATION) == 0
    out = capsys.readouterr().out
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert [line.split(";")[0] for line in rounds] == [
        "round 1: seeds 0 (1 of at most 2)", "round 2: seeds 1 (2 of at most 2)"]
    terminal = out[out.index("calibration: profile smoke"):out.index("report: ")]
    assert max(len(line) for line in terminal.splitlines()) <= 100, terminal
    assert "seeds until decided: `final` tested at 2 of at most 2 seeds" in terminal

    client = MlflowClient()
    runs = _children(client)
    assert sorted(runs) == sorted((arm, seed) for arm in ARMS for seed in (0, 1))
    for seed in (0, 1):
        reference, copy = runs["calibration_reference", seed], runs["calibration_copy", seed]
        # The same science: every param but the names and the salt; spec hashes differ by it.
        differ = {k for k in reference.data.params
                  if reference.data.params[k] != copy.data.params.get(k)}
        assert differ == {"name", "train.replicate"}
        assert copy.data.params["train.replicate"] == "1"
        assert reference.data.tags["spec_hash"] != copy.data.tags["spec_hash"]
        # ... and other random numbers: other losses.
        losses = [[m.value for m in client.get_metric_history(r.info.run_id, "train/loss")]
                  for r in (reference, copy)]
        assert losses[0] != losses[1]
    low = runs["calibration_low_lr", 0]
    lr = [client.get_metric_history(r.info.run_id, "train/lr")[0].value
          for r in (runs["calibration_reference", 0], low)]
    assert lr[1] == pytest.approx(0.1 * lr[0])

    parent = client.get_run(runs["calibration_reference", 0].data.tags["mlflow.parentRunId"])
    assert {k: parent.data.tags.get(k) for k in (*SEQUENTIAL_TAGS, "readouts")} == {
        "sequential_readout": "final", "sequential_looks": "2", "sequential_max_seeds": "2",
        "sequential_seeds": "0 1", "readouts": "final"}
    written = tmp_path / "mlruns" / "reports" / "calibration" / "summary_readouts.csv"
    first = pd.read_csv(written)
    compared = first[first["verdict"] != "reference"]
    assert set(compared["verdict_basis"]) == {summary.SEQUENTIAL_BASIS}
    assert set(compared["seeds_used"]) == {2}
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/summary_readouts.csv" in logged

    # Rerun after an interruption: every finished run is reused, the interrupted one resumes,
    # the rounds replay to the same lines, and no run is added.
    client.update_run(runs["calibration_copy", 1].info.run_id, status="KILLED")
    assert calibration.main(CALIBRATION) == 0
    again = capsys.readouterr().out
    assert again.count("reused run") == 5 and "resuming run" in again
    assert [line for line in again.splitlines() if line.startswith("round ")] == rounds
    assert set(_children(client)) == set(runs)

    # The report redrawn from MLflow alone reads the same design: the same verdicts.
    written.unlink()
    assert report_module.main(["--study", "calibration"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(written), first)


# ---------------------------------------------------------------------------------------------
# The replicate salt
# ---------------------------------------------------------------------------------------------
def _arm_spec(name: str, profile: str = "smoke", seed: int = 0):
    arms = {a.name: a for a in get_ablation("calibration").arms}
    return resolve(arms[name].spec, profile=profile, seed=seed)


def test_the_replicate_salt_changes_every_random_stream_and_only_that(one_thread):
    reference, copy = _arm_spec("calibration_reference"), _arm_spec("calibration_copy")
    assert rng_seed(reference) == 0 and rng_seed(copy) != 0
    assert rng_seed(copy) == rng_seed(_arm_spec("calibration_copy"))  # deterministic
    assert rng_seed(copy) != rng_seed(_arm_spec("calibration_copy", seed=1))
    for profile in ("smoke", "cpu", "full"):
        unsalted = _arm_spec("calibration_copy", profile)
        unsalted = replace(unsalted, train=replace(unsalted.train, replicate=0))
        assert spec_hash(unsalted) == spec_hash(_arm_spec("calibration_reference", profile))
    a, b, a_again = (build_state(s, "cpu") for s in (reference, copy, reference))
    weights = [torch.cat([p.flatten() for p in s.model.parameters()]) for s in (a, b, a_again)]
    assert torch.equal(weights[0], weights[2]) and not torch.equal(weights[0], weights[1])
    for stream in ("data_generator", "noise_generator"):
        states = [getattr(s, stream).get_state() for s in (a, b, a_again)]
        assert torch.equal(states[0], states[2]) and not torch.equal(states[0], states[1])
