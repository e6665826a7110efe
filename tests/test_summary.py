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
