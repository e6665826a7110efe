"""studies.summary against scipy.stats and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from studies import summary


def test_describe_matches_hand_computed_t_interval():
    # mean 2, sd 1 (ddof=1), n=3: half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051
    est = summary.describe([1.0, 2.0, 3.0])
    assert (est.mean, est.sd, est.n) == (2.0, 1.0, 3)
    assert est.ci_low == pytest.approx(2 - 2.4841377, abs=1e-6)
    assert est.ci_high == pytest.approx(2 + 2.4841377, abs=1e-6)


def test_describe_matches_scipy_t_interval():
    x = np.array([31.2, 33.9, 32.4, 30.8, 33.1])
    est = summary.describe(x, confidence=0.9)
    low, high = stats.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (est.ci_low, est.ci_high) == pytest.approx((low, high), abs=1e-12)


def test_describe_one_seed_has_no_spread_or_interval():
    est = summary.describe([30.0])
    assert est.mean == 30.0 and est.n == 1
    assert math.isnan(est.sd) and math.isnan(est.ci_low) and math.isnan(est.ci_high)


@pytest.mark.parametrize("a, b", [
    ([1.0, 2.0, 3.5], [0.0, 1.0, 1.2, 0.3]),
    ([33.1, 34.0], [31.0, 31.5, 30.2]),
    ([36.2, 36.9, 37.4, 36.0, 36.8], [33.3, 32.8, 33.9, 33.0, 33.5]),
])
def test_welch_matches_scipy_ttest_ind_unequal_variances(a, b):
    c = summary.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert c.difference == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
    assert c.statistic == pytest.approx(ref.statistic, abs=1e-10)
    assert c.p_value == pytest.approx(ref.pvalue, abs=1e-10)
    assert c.df == pytest.approx(ref.df, abs=1e-10)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high), abs=1e-10)


def test_welch_satterthwaite_df_by_hand():
    # a = [1, 2, 3]: var 1, n 3; b = [2, 4, 6, 8]: var 20/3, n 4
    # va/na = 1/3, vb/nb = 5/3; df = (2)^2 / ((1/9)/2 + (25/9)/3) = 4 / (1/18 + 25/27)
    expected = 4 / (1 / 18 + 25 / 27)
    assert summary.welch_df(1.0, 3, 20 / 3, 4) == pytest.approx(expected, abs=1e-12)
    assert summary.welch([1, 2, 3], [2, 4, 6, 8]).df == pytest.approx(expected, abs=1e-12)


def test_welch_with_one_seed_falls_back_to_nan_and_not_enough_seeds():
    c = summary.welch([33.0], [31.0, 32.0])
    assert c.difference == pytest.approx(1.5)
    assert math.isnan(c.ci_low) and math.isnan(c.ci_high) and math.isnan(c.p_value)
    assert summary.verdict(c) == "not enough seeds"


def test_welch_without_spread_is_untestable_and_ignores_rounding_noise():
    same = summary.welch([9.31, 9.31 + 1e-15], [9.31 - 1e-15, 9.31])
    assert same.difference == 0.0 and math.isnan(same.ci_low) and math.isnan(same.p_value)
    assert summary.verdict(same) == "no difference at 2 seeds"
    shifted = summary.welch([10.0, 10.0], [9.0, 9.0])
    assert shifted.difference == 1.0 and math.isnan(shifted.ci_low)
    assert summary.verdict(shifted) == "cannot test: no spread across 2 seeds"


def test_verdicts():
    better = summary.welch([36.2, 36.9, 37.4, 36.0], [33.3, 32.8, 33.9, 33.0])
    worse = summary.welch([33.3, 32.8, 33.9, 33.0], [36.2, 36.9, 37.4, 36.0])
    same = summary.welch([33.0, 34.0, 33.5], [33.2, 33.9, 33.4])
    assert summary.verdict(better) == "better"
    assert summary.verdict(worse) == "worse"
    assert summary.verdict(same) == "no detectable difference at 3 seeds"
    assert summary.verdict(summary.welch([1, 2], [1, 2, 3])) == \
        "no detectable difference at 2 vs 3 seeds"
    assert summary.verdict(better, higher_is_better=False) == "worse"


def _tidy(rows):
    return pd.DataFrame(rows, columns=["run_id", "study", "arm", "group", "seed", "epoch",
                                       "metric", "value"])


def test_per_run_and_summarize_by_hand():
    rows = []
    # val/psnr curves (epoch -> value): final = last epoch, best = max
    curves = {("a0", "ref", 0): [10, 14, 12], ("a1", "ref", 1): [11, 12, 16],
              ("b0", "new", 0): [12, 18, 17], ("b1", "new", 1): [13, 15, 19]}
    for (run, arm, seed), values in curves.items():
        for epoch, value in enumerate(values):
            rows.append([run, "s", arm, arm, seed, epoch, "val/psnr", value])
        rows.append([run, "s", arm, arm, seed, 0, "val/psnr_copy_first", 9.0])
        rows.append([run, "s", arm, arm, seed, 0, "train/loss", 1.0])
    runs = summary.per_run(_tidy(rows)).set_index("run_id")
    assert runs.loc["a0", ["final", "best", "best_epoch", "floor"]].tolist() == [12, 14, 1, 9.0]
    assert runs.loc["b1", ["final", "best", "best_epoch"]].tolist() == [19, 19, 2]

    table = summary.summarize(_tidy(rows), reference="ref", order=["ref", "new"])
    assert list(table.index) == ["ref", "new"]
    ref, new = table.loc["ref"], table.loc["new"]
    assert ref["final_mean"] == 14 and new["final_mean"] == 18
    assert ref["final_sd"] == pytest.approx(math.sqrt(8)) and new["final_sd"] == pytest.approx(
        math.sqrt(2))
    assert new["best_mean"] == 18.5 and new["best_epoch_mean"] == 1.5
    assert new["copy_first"] == 9.0 and new["seeds"] == "0 1"
    assert ref["verdict"] == "reference" and ref["diff_vs_reference"] == 0
    expected = stats.ttest_ind([17, 19], [12, 16], equal_var=False)
    assert new["diff_vs_reference"] == 4
    assert new["p_value"] == pytest.approx(expected.pvalue)
    ci = expected.confidence_interval(0.95)
    assert (new["diff_ci_low"], new["diff_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert new["verdict"] == "no detectable difference at 2 seeds"

    text = summary.to_markdown(table, reference="ref")
    assert text.count("\n") == 3 and "`new`" in text and "18.00 ± 1.41" in text


def test_markdown_numbers_print_no_negative_zero():
    from studies.summary import _ci, _num, _signed

    assert (_num(-0.001), _signed(-0.004), _ci(-0.002, 0.3)) == ("0.00", "+0.00", "[0.00, 0.30]")
    assert (_num(-0.5), _signed(-0.006), _ci(-1.234, -0.004)) == ("-0.50", "-0.01", "[-1.23, 0.00]")


def test_group_replicates_are_seeds_not_runs():
    """A group's arms share each seed (initialisation, clip order, noise), so its runs are
    not independent: each seed counts once, as the mean of its runs, in the sd, interval and
    Welch test (pooling 3 arms x 2 seeds as 6 runs gave a far too narrow interval)."""
    rows = []
    finals = {("tf", 0): [20.0, 20.2, 19.9], ("tf", 1): [24.0, 24.3, 23.8],
              ("off", 0): [20.5, 20.4, 20.9], ("off", 1): [24.9, 24.4, 24.8]}
    for (group, seed), values in finals.items():
        for k, value in enumerate(values):
            run = f"{group}-{seed}-{k}"
            rows.append([run, "s", f"{group}+kl{k}", group, seed, 0, "val/psnr", value])
            rows.append([run, "s", f"{group}+kl{k}", group, seed, 0, "val/psnr_copy_first", 9.0])
    table = summary.summarize(_tidy(rows), reference="tf", by="group", order=["tf", "off"])
    tf = [np.mean(finals["tf", s]) for s in (0, 1)]
    off = [np.mean(finals["off", s]) for s in (0, 1)]
    low, high = stats.t.interval(0.95, 1, loc=np.mean(tf), scale=stats.sem(tf))
    assert (table.loc["tf", "final_ci_low"], table.loc["tf", "final_ci_high"]) == \
        pytest.approx((low, high))
    assert table.loc["tf", ["n", "runs", "seeds"]].tolist() == [2, 6, "0 1"]
    ci = stats.ttest_ind(off, tf, equal_var=False).confidence_interval(0.95)
    assert (table.loc["off", "diff_ci_low"], table.loc["off", "diff_ci_high"]) == \
        pytest.approx((ci.low, ci.high))
    assert table.loc["off", "verdict"] == "no detectable difference at 2 seeds"
    assert "| `tf` | 6 (0 1) |" in summary.to_markdown(table, reference="tf")


def test_paired_by_seed_matches_scipy_ttest_rel_and_drives_the_verdict():
    """Seeds shift every arm together (shared initialisation, clips, noise): Welch sees that
    as noise and finds nothing, the per-seed differences show a steady gain."""
    rows = []
    finals = {"ref": {0: 20.0, 1: 24.0, 2: 22.0, 3: 26.0},
              "new": {0: 20.4, 1: 24.5, 2: 22.3, 3: 26.5},
              "few": {0: 30.0, 7: 31.0, 8: 29.0}}  # shares one seed with ref
    for arm, by_seed in finals.items():
        for seed, value in by_seed.items():
            rows.append([f"{arm}{seed}", "s", arm, arm, seed, 0, "val/psnr", value])
            rows.append([f"{arm}{seed}", "s", arm, arm, seed, 0, "val/psnr_copy_first", 9.0])
    table = summary.summarize(_tidy(rows), reference="ref", order=["ref", "new", "few"])
    new, ref = [finals["new"][s] for s in range(4)], [finals["ref"][s] for s in range(4)]
    expected = stats.ttest_rel(new, ref)
    ci = expected.confidence_interval(0.95)
    row = table.loc["new"]
    assert row["paired_n"] == 4 and row["paired_diff"] == pytest.approx(0.425)
    assert (row["paired_ci_low"], row["paired_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert row["paired_p_value"] == pytest.approx(expected.pvalue)
    welch_ci = stats.ttest_ind(new, ref, equal_var=False).confidence_interval(0.95)
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((welch_ci.low, welch_ci.high))
    assert welch_ci.low < 0 < welch_ci.high  # Welch alone would find nothing
    assert (row["verdict"], row["verdict_basis"]) == ("better", "paired by seed")
    # One shared seed cannot be paired: the verdict falls back to Welch, and says so.
    few = table.loc["few"]
    assert few["paired_n"] == 1 and math.isnan(few["paired_ci_low"])
    assert (few["verdict"], few["verdict_basis"]) == ("better", "Welch")
    text = summary.to_markdown(table, reference="ref")
    assert "| better (Welch) |" in text and "(4) | better |" in text
    assert table.loc["ref", "verdict_basis"] == ""


def test_paired_without_spread_is_untestable():
    same = summary.paired(pd.Series([20.0, 24.0]), pd.Series([20.0, 24.0 + 1e-13]))
    assert same.difference == 0.0 and summary.verdict(same) == "no difference at 2 seeds"
    shifted = summary.paired(pd.Series([21.0, 25.0]), pd.Series([20.0, 24.0]))
    assert summary.verdict(shifted) == "cannot test: no spread across 2 seeds"


# ---------------------------------------------------------------------------------------------
# Readouts: mean val PSNR over training, epochs to the floor + 1 dB, train-loss AUC
# ---------------------------------------------------------------------------------------------
def _run_rows(run, arm, seed, psnr, *, floor=None, losses=(), group=None):
    """Tidy rows of one run: ``psnr`` maps evaluated epoch -> val PSNR."""
    rows = [[run, "s", arm, group or arm, seed, epoch, "val/psnr", value]
            for epoch, value in psnr.items()]
    if floor is not None:
        rows.append([run, "s", arm, group or arm, seed, 0, "val/psnr_copy_first", floor])
    rows += [[run, "s", arm, group or arm, seed, epoch, "train/loss", value]
             for epoch, value in enumerate(losses)]
    return rows


def test_per_run_readouts_by_hand():
    rows = (_run_rows("uneven", "a", 0, {1: 10.0, 3: 14.0, 4: 12.0}, floor=12.5,
                      losses=[5, 4, 3, 2, 1])
            + _run_rows("once", "a", 1, {4: 11.0}, floor=12.5, losses=[2, 2, 2, 2, 1])
            + _run_rows("no-floor", "a", 2, {0: 9.0, 1: 20.0}))
    runs = summary.per_run(_tidy(rows)).set_index("run_id")
    # Trapezoid over epochs 1-3-4: (2·(10+14)/2 + 1·(14+12)/2) / 3 = 37/3, not the plain
    # mean 12 (the 2-epoch stretch weighs twice the 1-epoch one).
    assert runs.loc["uneven", "auc"] == pytest.approx(37 / 3)
    assert runs.loc["once", "auc"] == 11.0 and runs.loc["no-floor", "auc"] == 14.5
    # Floor 12.5 + 1 dB = 13.5: first reached at epoch 3; never reached: last epoch + 1.
    assert runs.loc["uneven", ["epochs_to_floor", "censored"]].tolist() == [3.0, False]
    assert runs.loc["once", ["epochs_to_floor", "censored"]].tolist() == [5.0, True]
    assert math.isnan(runs.loc["no-floor", "epochs_to_floor"])
    assert not runs.loc["no-floor", "censored"]
    assert runs.loc["uneven", "train_loss_auc"] == 3.0 and runs.loc["once", "train_loss_auc"] == 1.8
    assert math.isnan(runs.loc["no-floor", "train_loss_auc"])
    assert list(summary.per_run(_tidy([])).columns) == ["run_id", "arm", "group", "seed",
                                                       *summary.RUN_COLUMNS]


# ref and fast over seeds 0-2: (val PSNR at epochs 0-3, copy-first floor, train loss per epoch)
CURVES = {
    ("ref", 0): ([10.0, 12.0, 13.2, 14.0], 12.0, [4.0, 3.0, 2.5, 2.0]),
    ("ref", 1): ([11.0, 12.5, 13.1, 14.6], 12.5, [4.2, 3.1, 2.6, 2.2]),
    ("ref", 2): ([10.5, 11.0, 12.0, 12.4], 12.0, [4.1, 3.3, 2.7, 2.3]),  # never floor + 1
    ("fast", 0): ([12.0, 13.5, 14.0, 14.2], 12.0, [3.0, 2.0, 1.6, 1.4]),
    ("fast", 1): ([12.6, 13.6, 14.1, 14.5], 12.5, [3.3, 2.2, 1.8, 1.5]),
    ("fast", 2): ([12.0, 13.1, 13.0, 12.9], 12.0, [3.1, 2.1, 1.7, 1.45]),
}


def _readout_metrics():
    rows = []
    for (arm, seed), (psnr, floor, losses) in CURVES.items():
        rows += _run_rows(f"{arm}{seed}", arm, seed, dict(enumerate(psnr)), floor=floor,
                          losses=losses)
    return _tidy(rows)


def test_readouts_summary_respects_each_direction():
    table = summary.summarize_readouts(_readout_metrics(), reference="ref",
                                       order=["ref", "fast"])
    assert list(table.columns) == ["arm", *summary.READOUT_COLUMNS]
    assert list(table["readout"].unique()) == list(summary.READOUT_NAMES)
    rows = table.set_index(["readout", "arm"])
    # Train loss: lower is better, and fast is lower at every seed.
    loss = {arm: [np.mean(CURVES[arm, s][2]) for s in range(3)] for arm in ("ref", "fast")}
    expected = stats.ttest_rel(loss["fast"], loss["ref"])
    ci = expected.confidence_interval(0.95)
    fast = rows.loc["train_loss_auc", "fast"]
    assert fast["mean"] == pytest.approx(np.mean(loss["fast"]))
    assert fast["sd"] == pytest.approx(np.std(loss["fast"], ddof=1))
    assert (fast["paired_ci_low"], fast["paired_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert fast["paired_p_value"] == pytest.approx(expected.pvalue)
    assert ci.high < 0 and (fast["better_when"], fast["verdict"]) == ("lower", "better")
    assert math.isnan(fast["seeds_needed"]) and fast["seeds_used"] == 3
    # Epochs to floor + 1 dB: fast 1, 1, 1 against ref 2, 3, censored 4: d = -1, -2, -3.
    epochs = rows.loc["epochs_to_floor"]
    assert epochs.loc["ref", "mean"] == 3.0 and epochs.loc["ref", "censored"] == 1
    assert epochs.loc["fast", "censored"] == 0 and epochs.loc["fast", "paired_diff"] == -2.0
    assert epochs.loc["fast", "verdict"] == "no detectable difference at 3 seeds"
    assert epochs.loc["fast", "seeds_needed"] == summary.seeds_needed(-2.0, 1.0)
    # The mean val PSNR over training is higher for fast: better.
    assert rows.loc[("auc", "fast"), "paired_diff"] > 0
    assert rows.loc[("auc", "fast"), "verdict"] == "better"
    # Against fast as the reference, ref's lower-is-better readouts read "worse".
    flipped = summary.summarize_readouts(_readout_metrics(), reference="fast") \
        .set_index(["readout", "arm"])
    assert flipped.loc[("train_loss_auc", "ref"), "verdict"] == "worse"
    assert flipped.loc[("auc", "ref"), "verdict"] == "worse"
    assert flipped.loc[("train_loss_auc", "fast"), "verdict"] == "reference"
    # final is the same number as summarize's
    wide = summary.summarize(_readout_metrics(), reference="ref")
    assert rows.loc[("final", "fast"), "paired_ci_low"] == wide.loc["fast", "paired_ci_low"]


def test_readouts_leave_out_what_no_run_has():
    rows = _run_rows("r0", "ref", 0, {0: 10.0, 1: 12.0}) + _run_rows("r1", "ref", 1, {0: 11.0})
    table = summary.summarize_readouts(_tidy(rows), reference="ref")
    assert list(table["readout"]) == ["final", "best", "auc"]  # no floor, no train loss


def test_readouts_markdown_says_direction_and_censoring():
    table = summary.summarize_readouts(_readout_metrics(), reference="ref",
                                       order=["ref", "fast"])
    text = summary.readouts_to_markdown(table, reference="ref")
    assert text.count("| `fast` |") == len(summary.READOUTS)
    assert "**Epochs to the copy-first floor + 1 dB** (epoch; lower is better)" in text
    assert "**Mean val PSNR over training** (dB; higher is better)" in text
    assert "| 3.0 ± 1.0 (censored: 1 of 3 runs never reached it) |" in text
    needed = int(summary.seeds_needed(-2.0, 1.0))
    assert f"| no detectable difference at 3 seeds; {needed} seeds for 80% power |" in text
    assert "| `fast` | 3 (0 1 2) | 2.0958 ± 0.1003 |" in text  # loss prints 4 digits
    assert "| -2.0 | [-4.5, 0.5] |" in text  # epochs: one decimal, Δ paired by seed


# ---------------------------------------------------------------------------------------------
# Sequential verdicts in the summary, and the terminal form
# ---------------------------------------------------------------------------------------------
REFERENCE_FINALS = [20.0, 24.0, 22.0, 26.0, 21.0, 23.0]
DIFFERENCES = {
    "tfr_decay+kl_monotonic": [1.0, 1.01, 0.99, 1.0, 1.02, 0.98],  # decided at 4 seeds
    "borderline": [0.5, 0.1, 0.9, -0.1, 0.6, 0.3],  # fixed p 0.048 at 6 seeds
    "a_really_long_arm_name_for_the_terminal_columns": [0.3, -0.2, 0.1, 0.4, -0.3, 0.2],
}


def _final_metrics(differences=DIFFERENCES):
    rows = []
    for seed, value in enumerate(REFERENCE_FINALS):
        rows += _run_rows(f"ref{seed}", "kl_cyclical", seed, {0: value}, floor=9.0)
        for arm, d in differences.items():
            rows += _run_rows(f"{arm}{seed}", arm, seed, {0: value + d[seed]}, floor=9.0)
    return _tidy(rows)


def test_summary_with_sequential_boundaries():
    boundaries = summary.sequential_boundaries([2, 4, 6], 6)
    order = ["kl_cyclical", *DIFFERENCES]
    table = summary.summarize(_final_metrics(), reference="kl_cyclical", order=order,
                              boundaries=boundaries)
    fixed = summary.summarize(_final_metrics(), reference="kl_cyclical", order=order)
    decided = table.loc["tfr_decay+kl_monotonic"]
    assert (decided["verdict"], decided["seeds_used"]) == ("better", 4)
    assert decided["verdict_basis"] == summary.SEQUENTIAL_BASIS
    assert math.isnan(decided["seeds_needed"])
    # At 6 seeds the fixed test calls "borderline" better (p 0.048); the sequential test's
    # last look (level 0.0336, part of alpha spent on earlier looks) does not.
    assert fixed.loc["borderline", "verdict"] == "better"
    assert 0.0336 < table.loc["borderline", "paired_p_value"] < 0.05
    assert table.loc["borderline", ["verdict", "seeds_used"]].tolist() == \
        ["no detectable difference at 6 seeds", 6]
    d = DIFFERENCES["borderline"]
    assert table.loc["borderline", "seeds_needed"] == summary.seeds_needed(
        np.mean(d), np.std(d, ddof=1), alpha=0.05)
    assert table.loc["kl_cyclical", "verdict"] == "reference"
    text = summary.to_markdown(table, reference="kl_cyclical")
    assert "| better (decided at 4 seeds) |" in text


def test_fixed_summary_reports_seeds_used_and_needed():
    table = summary.summarize(_final_metrics(), reference="kl_cyclical")
    row = table.loc["a_really_long_arm_name_for_the_terminal_columns"]
    d = DIFFERENCES["a_really_long_arm_name_for_the_terminal_columns"]
    assert row["verdict"] == "no detectable difference at 6 seeds" and row["seeds_used"] == 6
    assert row["seeds_needed"] == summary.seeds_needed(np.mean(d), np.std(d, ddof=1))
    assert f"; {int(row['seeds_needed'])} seeds for 80% power |" in \
        summary.to_markdown(table, reference="kl_cyclical")


@pytest.mark.parametrize("sequential", [False, True])
def test_terminal_summary_fits_100_columns(sequential):
    boundaries = summary.sequential_boundaries([2, 4, 6], 6) if sequential else None
    order = ["kl_cyclical", *DIFFERENCES]
    table = summary.summarize(_final_metrics(), reference="kl_cyclical", order=order,
                              boundaries=boundaries)
    text = summary.to_terminal(table, reference="kl_cyclical")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, text
    print("\n" + text)
    assert any(line.startswith("tfr_decay+kl_monotonic  ") for line in lines)
    # A name too long for its column is cut; summary.md has it whole.
    assert "a_really_long_arm_name_fo…" in text and "terminal_columns" not in text
    row = table.loc["tfr_decay+kl_monotonic"]
    assert f"{row['final_mean']:.2f} ± {row['final_sd']:.2f}" in text
    assert f"+1.00 [{row['paired_ci_low']:.2f}, {row['paired_ci_high']:.2f}]" in text
    words = " ".join(text.split())
    verdict = "better (decided at 4 seeds)" if sequential else "better"
    assert f"+1.00 [0.99, 1.01] {verdict} " in words
    needed = int(table.loc["a_really_long_arm_name_for_the_terminal_columns", "seeds_needed"])
    assert f"no detectable difference at 6 seeds; {needed} seeds for 80% power" in words
    assert any(line.startswith("kl_cyclical ") and line.endswith("  reference")
               for line in lines)


def test_terminal_summary_narrower_and_with_welch():
    rows = []
    for seed, value in enumerate(REFERENCE_FINALS[:3]):
        rows += _run_rows(f"ref{seed}", "ref", seed, {0: value}, floor=9.0)
    for seed, value in [(2, 30.0), (7, 31.0), (8, 29.0)]:  # shares one seed with ref
        rows += _run_rows(f"few{seed}", "few", seed, {0: value}, floor=9.0)
    table = summary.summarize(_tidy(rows), reference="ref", by="group")
    text = summary.to_terminal(table, reference="ref", width=72)
    assert max(len(line) for line in text.splitlines()) <= 72, text
    assert any(line.startswith("group ") and line.endswith("verdict")
               for line in text.splitlines())
    assert "better (Welch)" in text
