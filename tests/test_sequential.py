"""Seeds until decided (the group-sequential paired t-test), seeds needed for 80% power, and
the calibration of every verdict and interval on simulated studies (pytest -s prints the
measured rates; ``python -m studies.summary --simulate`` prints the same table)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from studies import summary

STUDIES = 20_000  # simulated studies per calibration check (MC error ~0.0015 at 5%)


def _bound(rate: summary.Rate, target: float) -> float:
    """3 Monte-Carlo errors of a rate of ``target`` over ``rate.studies`` studies."""
    return 3 * math.sqrt(target * (1 - target) / rate.studies)


def _show(rate: summary.Rate) -> None:
    print(f"\n{rate.check}: {rate.rate:.4f} ± {rate.mc_error:.4f} (expected {rate.expected:.4f},"
          f" {rate.studies} studies)")


# ---------------------------------------------------------------------------------------------
# Boundaries
# ---------------------------------------------------------------------------------------------
def test_obrien_fleming_spending_by_hand():
    # alpha(t) = 2 - 2 Phi(1.959964 / sqrt(t)): t = 1/2 -> 2 - 2 Phi(2.771808) = 0.005575
    spent = summary.obrien_fleming_spending(np.array([0.0, 0.5, 1.0, 1.5]))
    assert spent == pytest.approx([0.0, 0.0055746, 0.05, 0.05], abs=1e-7)


def test_boundaries_spend_alpha_once_over_the_looks():
    b = summary.sequential_boundaries([2, 4, 6], 6)
    assert b.information == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert b.spent == pytest.approx((0.00068689, 0.01637467, 0.05), abs=1e-8)
    assert b.nominal == pytest.approx(np.diff(b.spent, prepend=0.0))
    assert sum(b.nominal) == pytest.approx(0.05)
    # |t| boundaries: the t quantile of each look's nominal level on n-1 df
    assert b.critical_t == pytest.approx(
        [stats.t.isf(level / 2, n - 1) for n, level in zip(b.looks, b.nominal)])
    # A study stopped early has spent only part of alpha; a look past max_seeds spends nothing.
    assert sum(summary.sequential_boundaries([2, 4], 6).nominal) == pytest.approx(0.01637467)
    late = summary.sequential_boundaries([4, 8], 6)
    assert late.nominal[1] == pytest.approx(0.05 - late.spent[0]) and late.spent[1] == 0.05
    assert summary.sequential_boundaries([6, 8], 6).critical_t[1] == math.inf


def test_one_look_at_max_seeds_is_the_fixed_seed_test():
    b = summary.sequential_boundaries([6], 6)
    assert b.nominal == pytest.approx((0.05,))
    rng = np.random.default_rng(0)
    seeds = pd.Index(range(6))
    for shift in np.linspace(-0.8, 0.8, 25):
        ref = pd.Series(rng.normal(0, 1, 6), index=seeds)
        arm = ref + shift + pd.Series(rng.normal(0, 0.5, 6), index=seeds)
        c = summary.paired(arm, ref)
        fixed = summary.verdict(c)
        expected = fixed if fixed in ("better", "worse") else "undecided"
        assert summary.sequential_decision(c, 0, b) == expected


@pytest.mark.parametrize("looks, max_seeds", [([1, 2], 4), ([4, 2], 6), ([], 6), ([2, 2], 4),
                                              ([2, 4], 1)])
def test_boundaries_reject_impossible_looks(looks, max_seeds):
    with pytest.raises(ValueError, match="looks|max_seeds"):
        summary.sequential_boundaries(looks, max_seeds)


@pytest.mark.parametrize("max_seeds, step, looks", [(6, 2, [2, 4, 6]), (5, 2, [2, 4, 5]),
                                                     (6, 1, [2, 3, 4, 5, 6]), (7, 3, [3, 6, 7]),
                                                     (2, 4, [2])])
def test_planned_looks_are_the_rounds(max_seeds, step, looks):
    assert summary.planned_looks(max_seeds, seed_step=step) == looks


def test_sequential_decision_respects_direction_and_the_look():
    b = summary.sequential_boundaries([2, 4, 6], 6)
    ref = pd.Series([20.0, 24.0, 22.0, 26.0])
    arm = ref + pd.Series([1.0, 1.1, 0.9, 1.05])  # p ~ 1e-4 at 4 seeds: below 0.0154
    c = summary.paired(arm, ref)
    assert c.p_value < b.nominal[1]
    assert summary.sequential_decision(c, 1, b) == "better"
    assert summary.sequential_decision(c, 1, b, higher_is_better=False) == "worse"
    assert summary.sequential_decision(summary.paired(ref, arm), 1, b) == "worse"
    with pytest.raises(ValueError, match="look 2 is at 6 seeds; the comparison has 4"):
        summary.sequential_decision(c, 2, b)
    flat = summary.paired(ref + 1.0, ref)  # no spread: untestable, never decided
    assert summary.sequential_decision(flat, 1, b) == "undecided"


def test_sequential_test_keeps_the_first_crossing():
    """Seeds 0-3 cross at the 4-seed look; seeds 4-5 would pull the 6-seed test back to
    undecided. The study stopped at 4 seeds, and a report replayed later must agree."""
    b = summary.sequential_boundaries([2, 4, 6], 6)
    ref = pd.Series([20.0, 24.0, 22.0, 26.0, 21.0, 23.0])
    arm = ref + pd.Series([1.0, 1.1, 0.9, 1.05, -3.0, -2.5])
    assert summary.paired(arm, ref).p_value > 0.05  # all six seeds: nothing
    outcome = summary.sequential_test(arm, ref, boundaries=b)
    assert (outcome.decision, outcome.look, outcome.seeds) == ("better", 1, 4)
    assert outcome.comparison == summary.paired(arm.iloc[:4], ref.iloc[:4])
    # Undecided: the last look taken; looks past the seeds held are not taken.
    undecided = summary.sequential_test(arm.iloc[[0, 1, 2, 4, 5]], ref, boundaries=b)
    assert (undecided.decision, undecided.look, undecided.seeds) == ("undecided", None, 4)
    none = summary.sequential_test(arm.iloc[:1], ref, boundaries=b)
    assert (none.decision, none.seeds, none.comparison.n) == ("undecided", 1, 1)


def test_sequential_test_replays_each_look_in_seed_order():
    """The replay equals looking by hand: paired over the first n common seeds (sorted) at
    each look, first crossing wins; seeds only one arm ran are ignored."""
    b = summary.sequential_boundaries([2, 4, 6, 8], 8)
    rng = np.random.default_rng(5)
    for _ in range(40):
        seeds = rng.permutation(10)[:8]
        ref = pd.Series(rng.normal(20, 1, 8), index=seeds)
        arm = ref + rng.normal(0.6, 0.5, 8)
        arm[99] = 50.0  # the reference never ran seed 99
        common = np.sort(seeds)
        by_hand = ("undecided", None)
        for k, n in enumerate(b.looks):
            decision = summary.sequential_decision(
                summary.paired(arm.loc[common[:n]], ref.loc[common[:n]]), k, b)
            if decision != "undecided":
                by_hand = (decision, k)
                break
        outcome = summary.sequential_test(arm, ref, boundaries=b)
        assert (outcome.decision, outcome.look) == by_hand


# ---------------------------------------------------------------------------------------------
# Seeds needed
# ---------------------------------------------------------------------------------------------
def test_paired_power_matches_the_noncentral_t_by_hand():
    # n = 6, effect 1 sd: T ~ nct(5, sqrt 6), critical t_{0.975, 5} = 2.570582
    critical, nc = 2.5705818, math.sqrt(6)
    expected = stats.nct.sf(critical, 5, nc) + stats.nct.cdf(-critical, 5, nc)
    assert summary.paired_power(6, 1.0) == pytest.approx(expected, abs=1e-6)
    assert summary.paired_power(6, -1.0) == summary.paired_power(6, 1.0)
    assert summary.paired_power(6, 0.0) == pytest.approx(0.05)


@pytest.mark.parametrize("difference, sd", [(1.0, 1.0), (0.3, 0.28), (-0.5, 1.0), (2.0, 0.5),
                                            (0.05, 1.0)])
def test_seeds_needed_is_the_fewest_with_the_power(difference, sd):
    n = summary.seeds_needed(difference, sd)
    effect = abs(difference) / sd
    assert summary.paired_power(int(n), effect) >= 0.8
    if n > 2:
        assert summary.paired_power(int(n) - 1, effect) < 0.8


def test_seeds_needed_known_values_and_edges():
    # One-sample / paired t-test, d = 1, alpha 0.05, power 0.8: 10 (power 0.803; 9: 0.748).
    assert summary.seeds_needed(1.0, 1.0) == 10
    assert summary.seeds_needed(5.0, 1.0) == 3  # two seeds (1 df) are too few even here
    assert summary.seeds_needed(20.0, 1.0) == 2
    # noncentrality 30 on 1 df (scipy's far tail is nan there): E_V[Φ(30 - t_c sqrt V)],
    # V ~ chi2(1), integrated numerically = 0.981416 (4e6 draws: 0.98146)
    assert summary.paired_power(2, 30 / math.sqrt(2)) == pytest.approx(0.981416, abs=1e-5)
    assert summary.seeds_needed(0.0, 1.0) == math.inf
    assert math.isnan(summary.seeds_needed(1.0, 0.0))
    assert math.isnan(summary.seeds_needed(math.nan, 1.0))
    assert summary.seeds_needed(1e-4, 1.0) == math.inf  # beyond the 100,000-seed limit
    assert summary.seeds_needed(1.0, 1.0, power=0.9) > 10


# ---------------------------------------------------------------------------------------------
# Calibration on simulated studies
# ---------------------------------------------------------------------------------------------
def test_simulated_verdicts_are_the_summary_functions():
    """The vectorised verdicts the simulations count are those of ``paired`` + ``verdict``
    and of ``sequential_test``, study by study."""
    rng = np.random.default_rng(11)
    reference, arm = summary.simulate_seeds(rng, studies=300, seeds=6,
                                            difference=1.5 * summary.PAIRED_SD)
    fixed = summary._fixed_decisions(reference, arm)
    b = summary.sequential_boundaries([2, 4, 6], 6)
    sequential = summary._sequential_decisions(reference, arm, b)
    words = {1: "better", -1: "worse", 0: "undecided"}
    for i in range(300):
        ref, mine = pd.Series(reference[i]), pd.Series(arm[i])
        one = summary.verdict(summary.paired(mine, ref))
        assert words[fixed[i]] == (one if one in ("better", "worse") else "undecided")
        assert words[sequential[i]] == summary.sequential_test(mine, ref, boundaries=b).decision
    assert 0 < (fixed != 0).mean() < 1 and 0 < (sequential != 0).mean() < 1


def test_shared_seed_effect_makes_pairing_matter():
    reference, arm = summary.simulate_seeds(np.random.default_rng(1), studies=4000, seeds=6)
    assert np.corrcoef(reference.ravel(), arm.ravel())[0, 1] > 0.8
    assert (arm - reference).std() == pytest.approx(summary.PAIRED_SD, rel=0.03)


@pytest.mark.parametrize("seeds", [2, 6])
def test_fixed_seed_verdict_false_positive_rate(seeds):
    rate = summary.false_positive_rate(np.random.default_rng(100 + seeds), studies=STUDIES,
                                       seeds=seeds)
    _show(rate)
    assert rate.rate <= 0.05 + _bound(rate, 0.05)


@pytest.mark.parametrize("looks", summary.SEQUENTIAL_DESIGNS)
def test_sequential_false_positive_rate(looks):
    b = summary.sequential_boundaries(looks, looks[-1])
    rate = summary.sequential_false_positive_rate(np.random.default_rng(200 + len(looks)),
                                                  studies=STUDIES, boundaries=b)
    _show(rate)
    assert rate.rate <= 0.05 + _bound(rate, 0.05)


def test_looking_at_the_fixed_level_after_every_round_inflates_false_positives():
    """Why the boundaries exist: testing at 5% after each round of 2 seeds up to 10 (no
    spending) decides far more A/A studies than 5%. The check above can fail."""
    b = summary.sequential_boundaries([2, 4, 6, 8, 10], 10)
    naive = summary.SequentialBoundaries(b.looks, b.max_seeds, b.alpha, b.information,
                                         b.spent, (0.05,) * 5, b.critical_t)
    rate = summary.sequential_false_positive_rate(np.random.default_rng(3), studies=STUDIES,
                                                  boundaries=naive)
    _show(rate)
    assert rate.rate > 0.05 + _bound(rate, 0.05)


def test_power_against_one_paired_sd_matches_the_noncentral_t():
    rate = summary.power(np.random.default_rng(7), studies=STUDIES, seeds=6)
    _show(rate)
    assert rate.expected == pytest.approx(summary.paired_power(6, 1.0))
    assert abs(rate.rate - rate.expected) <= _bound(rate, rate.expected)


def test_sequential_power_lies_between_its_analytic_bounds():
    """At least the power of the last look alone (crossing there decides), at most the sum
    of each look's power at its level (a union bound)."""
    b = summary.sequential_boundaries([2, 4, 6], 6)
    rate = summary.sequential_power(np.random.default_rng(8), studies=STUDIES, boundaries=b)
    _show(rate)
    upper = sum(summary.paired_power(n, 1.0, alpha=level) for n, level in zip(b.looks,
                                                                               b.nominal))
    assert rate.expected - _bound(rate, rate.expected) <= rate.rate <= upper + _bound(rate, upper)


def test_seeds_needed_gives_the_power_in_simulation():
    n = int(summary.seeds_needed(summary.PAIRED_SD, summary.PAIRED_SD))
    rate = summary.power(np.random.default_rng(9), studies=STUDIES, seeds=n)
    _show(rate)
    assert rate.rate >= 0.8 - _bound(rate, 0.8)


@pytest.mark.parametrize("interval", ["mean", "paired"])
def test_coverage_of_t_intervals(interval):
    rate = summary.coverage(np.random.default_rng(300 + len(interval)), studies=STUDIES,
                            seeds=6, interval=interval)
    _show(rate)
    assert abs(rate.rate - 0.95) <= _bound(rate, 0.95)


def test_coverage_of_welch_interval():
    rate = summary.welch_coverage(np.random.default_rng(12), studies=STUDIES)
    _show(rate)
    assert abs(rate.rate - 0.95) <= _bound(rate, 0.95)


def test_welch_over_covers_when_arms_share_seeds():
    """Welch counts the seed effect both arms share as noise: far wider than needed, which
    is why the verdict reads the paired interval."""
    rate = summary.coverage(np.random.default_rng(13), studies=STUDIES, seeds=6,
                            interval="welch shared seeds")
    _show(rate)
    assert rate.rate > 0.99
    with pytest.raises(ValueError, match="interval='median'"):
        summary.coverage(np.random.default_rng(0), studies=10, seeds=6, interval="median")


def test_simulate_command_prints_the_calibration_table(capsys):
    assert summary.main(["--simulate", "--studies", "2000", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 + len(summary.calibration(studies=100))
    assert "| A/A false positives, sequential looks 2,4,6 of 6 | 0." in out
    assert "2,000 |" in out
    for argv in ([], ["--simulate", "--studies", "5"]):
        with pytest.raises(SystemExit) as exit_info:
            summary.main(argv)
        assert exit_info.value.code == 2
    assert "nothing to do" in capsys.readouterr().err
