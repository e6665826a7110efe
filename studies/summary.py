"""Statistics for a study's summary table: pure functions over seeds, no MLflow.

Each arm's runs differ only in the seed, so the seeds are the replicates:
- ``describe``: mean, sample sd (ddof=1) and a t-interval for the mean over seeds.
- ``welch``: the difference in means of an arm and the reference arm with a confidence
  interval from Welch's t (unequal variances, Welch–Satterthwaite degrees of freedom),
  the same test as ``scipy.stats.ttest_ind(a, b, equal_var=False)``.
- ``paired``: the same difference over the seeds both arms ran, as the mean of the per-seed
  differences with a t interval on n-1 df (``scipy.stats.ttest_rel``). Runs of one seed share
  its initialisation, clip order and noise draws, so an arm and the reference are matched
  pairs; the pairing removes what the seed does to both, which Welch counts as noise.
- ``verdict``: "better" / "worse" when the interval excludes 0 (higher PSNR is better),
  "no detectable difference at N seeds" otherwise, "not enough seeds" with one seed, and
  "cannot test: no spread across N seeds" when every seed gives the same value.
- ``seeds_needed``: the seeds a paired difference of the observed size would need for 80%
  power, shown for undecided comparisons.
- ``sequential_boundaries`` / ``sequential_decision`` / ``sequential_test``: "run seeds until
  decided" as a group-sequential test with O'Brien-Fleming-type alpha spending, whose overall
  false-positive rate stays at or below alpha however many looks are taken.
- ``per_run`` turns the tidy metrics table (``studies.results``) into one row per run with
  its readouts (``READOUTS``: final, best and mean val PSNR, epochs to the copy-first floor
  + 1 dB, mean train loss); ``summarize`` makes one row per arm (or per group) for the final
  and best val PSNR, ``summarize_readouts`` one row per (arm, readout) for every readout, with
  the direction each readout counts as better. ``to_markdown`` / ``readouts_to_markdown``
  print them for ``summary.md``; ``to_terminal`` prints the short form that fits 100 columns.
  A group holding several arms has one replicate per seed (the mean of that seed's runs),
  never one per run: runs of one seed share its initialisation, clip order and noise, so
  pooling them as independent runs would narrow every interval (a 95% interval covered the
  mean 60-70% of the time in simulation).
- ``calibration`` checks all of it by simulation (false-positive rates, power, coverage):
  ``python -m studies.summary --simulate`` prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # two-sided false-positive rate of every verdict
POWER = 0.8  # the power ``seeds_needed`` plans for
THRESHOLD_DB = 1.0  # epochs-to-threshold: the first epoch at copy-first floor + 1 dB


@dataclass(frozen=True)
class Estimate:
    """Mean over ``n`` seeds with its sample sd and a t confidence interval (nan when n < 2)."""

    mean: float
    sd: float
    n: int
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Comparison:
    """``difference`` = mean(arm) - mean(reference), with Welch's interval and test."""

    difference: float
    ci_low: float
    ci_high: float
    df: float
    statistic: float
    p_value: float
    n: int
    n_reference: int


# ---------------------------------------------------------------------------------------------
# t intervals, on arrays: the last axis holds the seeds, any leading axes are separate samples
# (one study each in the simulations below; none for the functions a summary calls)
# ---------------------------------------------------------------------------------------------
def _t_intervals(difference: np.ndarray, se: np.ndarray, df: np.ndarray, *, scale: np.ndarray,
                 confidence: float) -> tuple[np.ndarray, ...]:
    """(difference, ci_low, ci_high, df, statistic, p) of ``difference`` with standard error
    ``se`` on ``df`` degrees of freedom, elementwise. With no spread (``se`` at rounding level
    for values of size ``scale``) t is undefined: nan interval, df, statistic and p, and a
    difference that is itself rounding noise becomes exactly 0."""
    difference, se, df, scale = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (difference, se, df, scale)))
    tolerance = 1e-9 * np.maximum(1.0, scale)
    flat = se <= tolerance
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = np.where(flat, np.nan, difference / se)
    half = stats.t.ppf((1 + confidence) / 2, df) * se
    low = np.where(flat, np.nan, difference - half)
    high = np.where(flat, np.nan, difference + half)
    p_value = np.where(flat, np.nan, 2 * stats.t.sf(np.abs(statistic), df))
    difference = np.where(flat & (np.abs(difference) <= tolerance), 0.0, difference)
    return difference, low, high, np.where(flat, np.nan, df), statistic, p_value


def _paired_arrays(d: np.ndarray, *, scale: np.ndarray | float,
                   confidence: float = CONFIDENCE) -> tuple[np.ndarray, ...]:
    """``_t_intervals`` of the mean of per-seed differences ``d`` (..., n), n >= 2."""
    n = d.shape[-1]
    se = d.std(axis=-1, ddof=1) / math.sqrt(n)
    return _t_intervals(d.mean(axis=-1), se, n - 1, scale=scale, confidence=confidence)


def _welch_df_arrays(var_a: np.ndarray, n_a: int, var_b: np.ndarray, n_b: int) -> np.ndarray:
    a, b = np.asarray(var_a, dtype=float) / n_a, np.asarray(var_b, dtype=float) / n_b
    denominator = a**2 / (n_a - 1) + b**2 / (n_b - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, (a + b) ** 2 / denominator, np.nan)


def _welch_arrays(a: np.ndarray, b: np.ndarray, *,
                  confidence: float = CONFIDENCE) -> tuple[np.ndarray, ...]:
    """``_t_intervals`` of mean(a) - mean(b) with Welch's standard error and df; both >= 2."""
    n_a, n_b = a.shape[-1], b.shape[-1]
    var_a, var_b = a.var(axis=-1, ddof=1), b.var(axis=-1, ddof=1)
    mean_a, mean_b = a.mean(axis=-1), b.mean(axis=-1)
    return _t_intervals(mean_a - mean_b, np.sqrt(var_a / n_a + var_b / n_b),
                        _welch_df_arrays(var_a, n_a, var_b, n_b),
                        scale=np.maximum(np.abs(mean_a), np.abs(mean_b)), confidence=confidence)


def _describe_arrays(x: np.ndarray, *,
                     confidence: float = CONFIDENCE) -> tuple[np.ndarray, ...]:
    """(mean, sd, ci_low, ci_high) over the last axis, n >= 2."""
    n = x.shape[-1]
    mean, sd = x.mean(axis=-1), x.std(axis=-1, ddof=1)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def _comparison(arrays: tuple[np.ndarray, ...], n: int, n_reference: int) -> Comparison:
    return Comparison(*(float(v) for v in arrays), n, n_reference)


def _nan_comparison(difference: float, n: int, n_reference: int) -> Comparison:
    return Comparison(difference, math.nan, math.nan, math.nan, math.nan, math.nan, n,
                      n_reference)


# ---------------------------------------------------------------------------------------------
# One sample, one comparison
# ---------------------------------------------------------------------------------------------
def describe(values: Sequence[float], *, confidence: float = CONFIDENCE) -> Estimate:
    """mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan, math.nan)
    if n < 2:
        return Estimate(float(x.mean()), math.nan, n, math.nan, math.nan)
    mean, sd, low, high = (float(v) for v in _describe_arrays(x, confidence=confidence))
    return Estimate(mean, sd, n, low, high)


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch–Satterthwaite: (va/na + vb/nb)² / ((va/na)²/(na-1) + (vb/nb)²/(nb-1))."""
    return float(_welch_df_arrays(var_a, n_a, var_b, n_b))


def welch(values: Sequence[float], reference: Sequence[float], *,
          confidence: float = CONFIDENCE) -> Comparison:
    """Difference in means (values - reference) with a Welch t interval and two-sided p.

    With fewer than two seeds on either side there is no variance estimate: the interval,
    statistic and p-value are nan. With no spread on either side (every seed gives the same
    value, up to rounding) the t statistic is undefined: nan interval, and a
    difference that is itself rounding noise is set to exactly 0.
    """
    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    n_a, n_b = a.size, b.size
    if n_a < 2 or n_b < 2:
        difference = float(a.mean() - b.mean()) if n_a and n_b else math.nan
        return _nan_comparison(difference, n_a, n_b)
    return _comparison(_welch_arrays(a, b, confidence=confidence), n_a, n_b)


def _paired_differences(values: pd.Series, reference: pd.Series) -> tuple[np.ndarray, float]:
    """Per-seed differences (values - reference) over the seeds both hold, in seed order, and
    the size of the values (for the no-spread rule)."""
    common = values.index.intersection(reference.index).sort_values()
    mine = values.loc[common].to_numpy(float)
    d = mine - reference.loc[common].to_numpy(float)
    return d, float(np.abs(mine).max()) if mine.size else 0.0


def paired(values: pd.Series, reference: pd.Series, *,
           confidence: float = CONFIDENCE) -> Comparison:
    """Mean of the per-seed differences (values - reference) over the seeds both hold (Series
    indexed by seed), with a t interval on n-1 df and a two-sided p, as
    ``scipy.stats.ttest_rel``; ``df`` is n-1. Fewer than two common seeds, or differences
    without spread: nan interval (a difference that is rounding noise becomes exactly 0)."""
    d, scale = _paired_differences(values, reference)
    if d.size < 2:
        return _nan_comparison(float(d.mean()) if d.size else math.nan, d.size, d.size)
    return _comparison(_paired_arrays(d, scale=scale, confidence=confidence), d.size, d.size)


def seeds_phrase(n: int, n_reference: int) -> str:
    return f"{n} seeds" if n == n_reference else f"{n} vs {n_reference} seeds"


def verdict(comparison: Comparison, *, higher_is_better: bool = True) -> str:
    """A plain reading of the interval of the difference (arm - reference)."""
    seeds = seeds_phrase(comparison.n, comparison.n_reference)
    if comparison.n < 2 or comparison.n_reference < 2:
        return "not enough seeds"
    if math.isnan(comparison.ci_low):  # no spread on either side: nothing to test
        return f"no difference at {seeds}" if comparison.difference == 0 else \
            f"cannot test: no spread across {seeds}"
    if comparison.ci_low > 0:
        return "better" if higher_is_better else "worse"
    if comparison.ci_high < 0:
        return "worse" if higher_is_better else "better"
    return f"no detectable difference at {seeds}"


def _undecided(text: str) -> bool:
    return text.startswith("no detectable difference")


# ---------------------------------------------------------------------------------------------
# How many seeds a difference needs
# ---------------------------------------------------------------------------------------------
def paired_power(n: int, effect_size: float, *, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` over ``n`` seeds when the true
    mean difference is ``effect_size`` paired sds: P(|T| > t_{1-alpha/2, n-1}) with T
    noncentral t on n-1 df, noncentrality effect_size·sqrt(n)."""
    df, noncentrality = n - 1, abs(effect_size) * math.sqrt(n)
    critical = stats.t.isf(alpha / 2, df)
    # scipy's far tail is nan once the noncentrality passes ~8; it is below Φ(-8) ~ 1e-15.
    wrong_side = np.nan_to_num(stats.nct.cdf(-critical, df, noncentrality), nan=0.0)
    return float(stats.nct.sf(critical, df, noncentrality) + wrong_side)


def seeds_needed(difference: float, paired_sd: float, *, power: float = POWER,
                 alpha: float = ALPHA, limit: int = 100_000) -> float:
    """The fewest seeds (>= 2) at which the two-sided paired t-test at level ``alpha`` finds a
    true mean difference of ``difference`` with probability ``power``, when the per-seed
    differences have sd ``paired_sd``: exact noncentral-t power (``paired_power``), searched
    by doubling then bisection (power grows with n). Read with care: it plans from the
    observed difference and sd, themselves noisy at few seeds; and it is the fixed-seed test's
    count: a sequential design (``sequential_boundaries``) spends part of alpha on earlier
    looks, so it needs somewhat more at its last look.

    ``inf`` when the difference is 0 or needs more than ``limit`` seeds; nan when the paired
    sd is unknown or 0 (nothing to plan from)."""
    if not (paired_sd > 0) or math.isnan(difference):
        return math.nan
    effect = abs(difference) / paired_sd
    if effect == 0:
        return math.inf
    low, high = 1, 2  # power(low) < power <= power(high) once found
    while paired_power(high, effect, alpha=alpha) < power:
        if high >= limit:
            return math.inf
        low, high = high, min(2 * high, limit)
    while high - low > 1:
        middle = (low + high) // 2
        if paired_power(middle, effect, alpha=alpha) >= power:
            high = middle
        else:
            low = middle
    return float(high)


# ---------------------------------------------------------------------------------------------
# Seeds until decided: a group-sequential paired t-test
# ---------------------------------------------------------------------------------------------
def obrien_fleming_spending(information: np.ndarray | float, *,
                            alpha: float = ALPHA) -> np.ndarray:
    """Lan & DeMets' O'Brien-Fleming-type spending function, two-sided (Lan & DeMets 1983;
    Jennison & Turnbull 2000, ch. 7): the false-positive rate spent by information fraction t,
    alpha(t) = 2 - 2·Φ(z_{1-alpha/2} / sqrt(t)), 0 at t = 0 and alpha at t = 1. It spends
    almost nothing early (the boundaries of O'Brien & Fleming 1979), so a study that runs to
    the end keeps nearly the power of the fixed-seed test."""
    t = np.clip(np.asarray(information, dtype=float), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        return np.where(t > 0, 2 * stats.norm.sf(stats.norm.isf(alpha / 2) / np.sqrt(t)), 0.0)


@dataclass(frozen=True)
class SequentialBoundaries:
    """The looks of a group-sequential paired t-test and its level at each.

    ``looks``: seeds at each look; ``information``: looks / max_seeds (capped at 1);
    ``spent``: alpha spent by each look (``obrien_fleming_spending``); ``nominal``: the
    two-sided level of the paired t-test at each look, alpha(t_k) - alpha(t_{k-1});
    ``critical_t``: the matching |t| boundary, t_{1 - nominal/2, n_k - 1} (inf where nothing
    is left to spend)."""

    looks: tuple[int, ...]
    max_seeds: int
    alpha: float
    information: tuple[float, ...]
    spent: tuple[float, ...]
    nominal: tuple[float, ...]
    critical_t: tuple[float, ...]


def planned_looks(max_seeds: int, *, seed_step: int = 2) -> list[int]:
    """Seeds at each look when seeds run in rounds of ``seed_step`` up to ``max_seeds``: every
    multiple of ``seed_step`` from 2 seeds on (a paired t-test needs two), and ``max_seeds``."""
    if seed_step < 1 or max_seeds < 2:
        raise ValueError(f"seed_step={seed_step} must be >= 1 and max_seeds={max_seeds} >= 2")
    return [n for n in range(seed_step, max_seeds, seed_step) if n >= 2] + [max_seeds]


def sequential_boundaries(looks: Sequence[int], max_seeds: int, *,
                          alpha: float = ALPHA) -> SequentialBoundaries:
    """Levels for looking at a paired comparison after each round of seeds (``looks``: the
    seeds at each look taken so far, increasing, each >= 2; ``max_seeds``: the most the study
    will run), so that the chance of ever calling an A/A comparison "better" or "worse" stays
    at or below ``alpha`` (two-sided).

    Alpha spending (Lan & DeMets 1983) with the O'Brien-Fleming-type function
    (``obrien_fleming_spending``; O'Brien & Fleming 1979) over the information fraction
    t_k = seeds so far / max_seeds, as in Jennison & Turnbull (2000), *Group Sequential
    Methods with Applications to Clinical Trials*, ch. 7. Look k rejects when the paired
    t-test's two-sided p-value is at most alpha(t_k) - alpha(t_{k-1}).

    The t statistic at small df: the usual boundaries solve for the joint normal law of the
    z statistics, and with an unknown variance each z boundary is mapped to the t quantile
    of the same nominal level (Jennison & Turnbull 2000), an approximation for large df. At
    the df of a few seeds (1-9) that mapping exceeded alpha when this rule was chosen: 5.4%
    with looks at 2, 4, 6 of 6 seeds, 5.9% at every seed from 2 to 8 (400,000 simulated A/A
    studies each). So each look instead gets exactly its increment of spent alpha as its
    nominal level. Each paired t-test is exact under the null (any df), and the chance of
    crossing at any look is at most the sum of the increments (Bonferroni), which telescopes
    to alpha(t_last) <= alpha: valid whatever the df, and also when the looks are not the
    planned ones (a round that lost seeds, a study stopped early because every comparison
    was decided). It is conservative: 4.5% false positives at looks 2, 4, 6 of 6 (see
    ``calibration``). A single look at ``max_seeds`` is the fixed-seed test at level alpha.
    """
    looks = tuple(int(n) for n in looks)
    if not looks or looks[0] < 2 or any(b <= a for a, b in itertools.pairwise(looks)):
        raise ValueError(f"looks {list(looks)} must be increasing numbers of seeds, each >= 2")
    if max_seeds < 2:
        raise ValueError(f"max_seeds={max_seeds} must be >= 2")
    information = np.minimum(np.asarray(looks, dtype=float) / max_seeds, 1.0)
    spent = obrien_fleming_spending(information, alpha=alpha)
    nominal = np.diff(spent, prepend=0.0)
    critical = np.where(nominal > 0, stats.t.isf(nominal / 2, np.asarray(looks) - 1), np.inf)
    return SequentialBoundaries(looks, int(max_seeds), float(alpha),
                                *(tuple(float(v) for v in x)
                                  for x in (information, spent, nominal, critical)))


def _crossing(difference: np.ndarray, p_value: np.ndarray, level: float) -> np.ndarray:
    """+1 / -1 (the sign of the difference) where the two-sided p is at most ``level``, else 0
    (an untestable comparison, p nan, never crosses)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.asarray(p_value) <= level, np.sign(difference), 0.0).astype(int)


def _direction(sign: int, *, higher_is_better: bool) -> str:
    if sign == 0:
        return "undecided"
    return "better" if (sign > 0) == higher_is_better else "worse"


def sequential_decision(comparison: Comparison, look_index: int,
                        boundaries: SequentialBoundaries, *,
                        higher_is_better: bool = True) -> str:
    """"better" / "worse" when the paired ``comparison`` (over exactly the seeds of look
    ``look_index``) crosses that look's boundary, else "undecided". A comparison decided at
    one look keeps that decision: later looks do not revisit it (``sequential_test`` reads
    the first crossing)."""
    seeds = boundaries.looks[look_index]
    if comparison.n != seeds:
        raise ValueError(f"look {look_index} is at {seeds} seeds; the comparison has "
                         f"{comparison.n}")
    sign = _crossing(comparison.difference, comparison.p_value, boundaries.nominal[look_index])
    return _direction(int(sign), higher_is_better=higher_is_better)


def _sequential_signs(d: np.ndarray, boundaries: SequentialBoundaries, *,
                      scale: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """The first crossing of per-seed differences ``d`` (studies, seeds; seeds in the order
    they ran): (sign, look index) per study; sign 0 and look -1 where none crossed. Looks
    past the seeds ``d`` holds are not taken."""
    sign = np.zeros(d.shape[:-1], dtype=int)
    look = np.full(d.shape[:-1], -1)
    for k, (n, level) in enumerate(zip(boundaries.looks, boundaries.nominal)):
        if n > d.shape[-1]:
            break
        difference, *_, p_value = _paired_arrays(d[..., :n], scale=scale)
        cross = _crossing(difference, p_value, level)
        new = (sign == 0) & (cross != 0)
        sign[new], look[new] = cross[new], k
    return sign, look


@dataclass(frozen=True)
class SequentialOutcome:
    """The reading of a sequential comparison: ``decision`` ("better" / "worse" /
    "undecided"), the ``look`` index that decided it (None when undecided), the ``seeds`` it
    read (that look's; when undecided, the last look taken) and the paired ``comparison``
    over those seeds."""

    decision: str
    look: int | None
    seeds: int
    comparison: Comparison


def sequential_test(values: pd.Series, reference: pd.Series, *,
                    boundaries: SequentialBoundaries, higher_is_better: bool = True,
                    confidence: float = CONFIDENCE) -> SequentialOutcome:
    """The group-sequential paired test of ``values`` against ``reference`` (Series indexed by
    seed), replayed from the finished seeds: look k reads the first ``boundaries.looks[k]``
    seeds both hold in increasing seed order (rounds run seeds in that order), and the first
    look that crosses decides. Replaying gives the decision the study took when it stopped,
    so a report drawn later agrees with it."""
    common = values.index.intersection(reference.index).sort_values()
    taken = [k for k, n in enumerate(boundaries.looks) if n <= common.size]
    if not taken:
        return SequentialOutcome("undecided", None, common.size,
                                 paired(values.loc[common], reference, confidence=confidence))
    d, scale = _paired_differences(values, reference)
    signs, looks = _sequential_signs(d[None, :], boundaries, scale=scale)
    sign, look = int(signs[0]), int(looks[0])
    at = look if sign != 0 else taken[-1]
    seeds = common[:boundaries.looks[at]]
    return SequentialOutcome(_direction(sign, higher_is_better=higher_is_better),
                             at if sign != 0 else None, len(seeds),
                             paired(values.loc[seeds], reference, confidence=confidence))


# ---------------------------------------------------------------------------------------------
# From the tidy table to readouts per run, per seed, per arm
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Readout:
    """A number read off each run's curves (a ``per_run`` column) and how to compare it."""

    name: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int
    about: str
    censored: bool = False  # runs that never got there carry a stand-in value


READOUTS = (
    Readout("final", "Final val PSNR", "dB", True, 2, "validation PSNR at the last epoch."),
    Readout("best", "Best val PSNR", "dB", True, 2, "the maximum over evaluated epochs."),
    Readout("auc", "Mean val PSNR over training", "dB", True, 2,
            "the area under the val PSNR curve per epoch: the trapezoid over the evaluated "
            "epochs divided by the epochs they span (one evaluation: its value); it rewards "
            "learning early as well as ending high."),
    Readout("epochs_to_floor", f"Epochs to the copy-first floor + {THRESHOLD_DB:g} dB", "epoch",
            False, 1,
            f"the first evaluated epoch (0-based) whose val PSNR reaches the run's "
            f"copy-first-frame floor + {THRESHOLD_DB:g} dB; a run that never reaches it counts "
            "as its last epoch + 1 (censored), which understates how slow it is.",
            censored=True),
    Readout("train_loss_auc", "Mean train loss over epochs", "loss", False, 4,
            "the area under the train loss curve per epoch (the mean over epochs). It is the "
            "objective each run minimises (MSE + β·KL), so it ranks arms only where they "
            "minimise the same one: arms with another β schedule or another prior (the KL "
            "taken against another distribution) differ in it by construction."),
)
READOUT_NAMES = tuple(r.name for r in READOUTS)


def _curve_mean(epochs: np.ndarray, values: np.ndarray) -> float:
    """The trapezoid area under values(epochs) divided by the epochs it spans: the mean
    height of the curve, each stretch between evaluations weighted by its length (so an
    uneven schedule, every k epochs plus the last, is not over-weighted); one point: its
    value."""
    if values.size == 1:
        return float(values[0])
    area = float(np.sum(np.diff(epochs) * (values[1:] + values[:-1]) / 2))
    return area / float(epochs[-1] - epochs[0])


def _epochs_to(epochs: np.ndarray, values: np.ndarray, threshold: float) -> tuple[float, bool]:
    """(first epoch with value >= threshold, False), or (last epoch + 1, True) when it never
    gets there (censored); (nan, False) without a threshold."""
    if math.isnan(threshold):
        return math.nan, False
    reached = np.flatnonzero(values >= threshold)
    if reached.size:
        return float(epochs[reached[0]]), False
    return float(epochs[-1] + 1), True


RUN_COLUMNS = ["final", "final_epoch", "best", "best_epoch", "floor", "auc", "epochs_to_floor",
               "censored", "train_loss_auc"]


def per_run(metrics: pd.DataFrame, *, metric: str = "val/psnr",
            floor_metric: str = "val/psnr_copy_first", loss_metric: str = "train/loss",
            threshold_db: float = THRESHOLD_DB) -> pd.DataFrame:
    """One row per run: final (last epoch), best (max) and epoch of best of ``metric``, the
    copy-first floor, and the readouts of ``READOUTS``: ``auc`` (mean of ``metric`` over
    training, ``_curve_mean``), ``epochs_to_floor`` (first evaluated epoch at floor +
    ``threshold_db``; last epoch + 1 and ``censored`` True when never reached) and
    ``train_loss_auc`` (mean ``loss_metric`` over its epochs). ``metrics`` is the tidy table
    (run_id, arm, group, seed, epoch, metric, value)."""
    keys = ["run_id", "arm", "group", "seed"]
    curve = metrics[metrics["metric"] == metric].sort_values(["run_id", "epoch"])
    if curve.empty:
        return pd.DataFrame(columns=[*keys, *RUN_COLUMNS])
    grouped = curve.groupby(keys, sort=False)
    last = grouped.tail(1).set_index(keys)
    best = curve.loc[grouped["value"].idxmax()].set_index(keys)
    out = pd.DataFrame({"final": last["value"], "final_epoch": last["epoch"],
                        "best": best["value"], "best_epoch": best["epoch"]}).reset_index()
    floor = metrics[metrics["metric"] == floor_metric].groupby("run_id")["value"].last()
    out["floor"] = out["run_id"].map(floor).astype(float)
    curves = {run: (g["epoch"].to_numpy(float), g["value"].to_numpy(float))
              for run, g in curve.groupby("run_id", sort=False)}
    out["auc"] = [_curve_mean(*curves[run]) for run in out["run_id"]]
    reached = [_epochs_to(*curves[run], floor + threshold_db)
               for run, floor in zip(out["run_id"], out["floor"])]
    out["epochs_to_floor"] = [epoch for epoch, _ in reached]
    out["censored"] = [censored for _, censored in reached]
    loss = metrics[metrics["metric"] == loss_metric].groupby("run_id")["value"].mean()
    out["train_loss_auc"] = out["run_id"].map(loss).astype(float)
    return out


def _per_seed(metrics: pd.DataFrame, *, by: str, metric: str) -> pd.DataFrame:
    """One row per (``by``, seed): each readout as the mean of that seed's runs (a group's
    arms share the seed, so they are one replicate), ``runs`` and ``censored`` runs."""
    runs = per_run(metrics, metric=metric)
    means = {name: (name, "mean") for name in (*READOUT_NAMES, "best_epoch", "floor")}
    return runs.astype({name: float for name in means}).groupby([by, "seed"], sort=False).agg(
        **means, runs=("run_id", "size"), censored=("censored", "sum")).reset_index()


def _ordered(seeds: pd.DataFrame, by: str, order: Sequence[str] | None) -> list[str]:
    names = list(order) if order is not None else sorted(seeds[by].unique())
    return [n for n in names if n in set(seeds[by])]


def _seeds_text(rows: pd.DataFrame) -> str:
    return " ".join(str(s) for s in sorted(rows["seed"].unique()))


COMPARISON_COLUMNS = [
    "diff_vs_reference", "diff_ci_low", "diff_ci_high", "welch_df", "p_value",
    "paired_n", "paired_diff", "paired_ci_low", "paired_ci_high", "paired_p_value",
    "verdict", "verdict_basis", "seeds_used", "seeds_needed",
]
SUMMARY_COLUMNS = [
    "n", "runs", "seeds", "final_mean", "final_sd", "final_ci_low", "final_ci_high",
    "best_mean", "best_sd", "best_ci_low", "best_ci_high", "best_epoch_mean", "copy_first",
    *COMPARISON_COLUMNS,
]
_NO_COMPARISON = {"diff_ci_low": math.nan, "diff_ci_high": math.nan, "welch_df": math.nan,
                  "p_value": math.nan, "paired_n": 0, "paired_diff": math.nan,
                  "paired_ci_low": math.nan, "paired_ci_high": math.nan,
                  "paired_p_value": math.nan, "verdict_basis": "", "seeds_used": 0,
                  "seeds_needed": math.nan}
SEQUENTIAL_BASIS = "paired by seed, sequential"


def _sequential_verdict(outcome: SequentialOutcome) -> str:
    if outcome.decision != "undecided":
        return outcome.decision
    c = outcome.comparison
    if c.n < 2 or math.isnan(c.ci_low):  # too few seeds, or no spread: say which
        return verdict(c)
    return f"no detectable difference at {seeds_phrase(c.n, c.n)}"


def _compare(mine: pd.Series, reference: pd.Series, *, name: str, reference_name: str,
             higher_is_better: bool, confidence: float,
             boundaries: SequentialBoundaries | None, power: float) -> dict:
    """The comparison columns of one row: Welch, paired by seed, the verdict (sequential when
    ``boundaries`` are given, else the paired interval, or Welch's with fewer than 2 common
    seeds), the seeds it read, and for an undecided one the seeds needed at ``power``."""
    if name == reference_name:
        return {**_NO_COMPARISON, "diff_vs_reference": 0.0, "verdict": "reference"}
    if reference.size == 0:
        return {**_NO_COMPARISON, "diff_vs_reference": math.nan, "verdict": "no reference runs"}
    c = welch(mine, reference, confidence=confidence)
    pc = paired(mine, reference, confidence=confidence)
    row = {"diff_vs_reference": c.difference, "diff_ci_low": c.ci_low,
           "diff_ci_high": c.ci_high, "welch_df": c.df, "p_value": c.p_value,
           "paired_n": pc.n, "paired_diff": pc.difference, "paired_ci_low": pc.ci_low,
           "paired_ci_high": pc.ci_high, "paired_p_value": pc.p_value}
    if boundaries is not None:
        outcome = sequential_test(mine, reference, boundaries=boundaries,
                                  higher_is_better=higher_is_better, confidence=confidence)
        row.update(verdict=_sequential_verdict(outcome), verdict_basis=SEQUENTIAL_BASIS,
                   seeds_used=outcome.seeds)
        alpha = boundaries.alpha
    else:
        basis = pc if pc.n >= 2 else c
        row.update(verdict=verdict(basis, higher_is_better=higher_is_better),
                   verdict_basis="paired by seed" if basis is pc else "Welch",
                   seeds_used=basis.n)
        alpha = 1 - confidence
    d, _ = _paired_differences(mine, reference)
    undecided = _undecided(row["verdict"]) and d.size >= 2
    row["seeds_needed"] = seeds_needed(pc.difference, float(d.std(ddof=1)), power=power,
                                       alpha=alpha) if undecided else math.nan
    return row


def summarize(metrics: pd.DataFrame, *, reference: str, by: str = "arm",
              order: Sequence[str] | None = None, metric: str = "val/psnr",
              confidence: float = CONFIDENCE, boundaries: SequentialBoundaries | None = None,
              power: float = POWER) -> pd.DataFrame:
    """One row per ``by`` value (arm or group): final and best ``metric`` over its seeds
    (mean, sd, t interval; ``n`` seeds, ``runs`` runs), mean epoch of best, copy-first floor,
    and the final value against ``reference``: Welch, and paired by seed over the seeds both
    ran. The verdict reads the paired interval when there are two common seeds or more, else
    Welch's (``verdict_basis`` says which); with ``boundaries`` (a study that ran seeds until
    decided) it is the group-sequential test's (``sequential_test``). ``seeds_used``: the
    seeds the verdict read; ``seeds_needed``: for an undecided comparison, the seeds a paired
    difference of the observed size needs at ``power`` (``seeds_needed``). A seed with
    several runs (a group's arms) counts once, as the mean of its runs. Indexed by ``by``,
    rows in ``order`` (default: sorted). ``summarize_readouts`` has every readout."""
    seeds = _per_seed(metrics, by=by, metric=metric)
    ref_final = seeds.loc[seeds[by] == reference].set_index("seed")["final"]
    rows = []
    for name in _ordered(seeds, by, order):
        mine = seeds[seeds[by] == name]
        final, best = describe(mine["final"], confidence=confidence), \
            describe(mine["best"], confidence=confidence)
        row = {
            by: name, "n": final.n, "runs": int(mine["runs"].sum()), "seeds": _seeds_text(mine),
            "final_mean": final.mean, "final_sd": final.sd,
            "final_ci_low": final.ci_low, "final_ci_high": final.ci_high,
            "best_mean": best.mean, "best_sd": best.sd,
            "best_ci_low": best.ci_low, "best_ci_high": best.ci_high,
            "best_epoch_mean": float(mine["best_epoch"].mean()),
            "copy_first": float(mine["floor"].mean()),
        }
        row.update(_compare(mine.set_index("seed")["final"], ref_final, name=name,
                            reference_name=reference, higher_is_better=True,
                            confidence=confidence, boundaries=boundaries, power=power))
        rows.append(row)
    return pd.DataFrame(rows, columns=[by, *SUMMARY_COLUMNS]).set_index(by)


READOUT_COLUMNS = ["readout", "better_when", "n", "runs", "seeds", "censored", "mean", "sd",
                   "ci_low", "ci_high", *COMPARISON_COLUMNS]


def summarize_readouts(metrics: pd.DataFrame, *, reference: str, by: str = "arm",
                       order: Sequence[str] | None = None, confidence: float = CONFIDENCE,
                       boundaries: SequentialBoundaries | None = None, power: float = POWER,
                       readouts: Sequence[Readout] = READOUTS) -> pd.DataFrame:
    """One row per (readout, ``by`` value), readouts in ``readouts`` order: mean ± sd and t
    interval of the readout over seeds (``censored``: runs that never reached the threshold,
    for ``epochs_to_floor``), and the same comparison columns as ``summarize`` against
    ``reference``, the verdict respecting each readout's direction (``better_when``: lower
    epochs-to-threshold and train loss are better). Readouts no run has (no train loss
    logged, no floor) are left out. A long table: ``to_csv(index=False)`` writes it whole."""
    seeds = _per_seed(metrics, by=by, metric="val/psnr")  # the readouts are of val PSNR
    names = _ordered(seeds, by, order)
    rows = []
    for readout in readouts:
        known = seeds.dropna(subset=[readout.name])
        reference_values = known.loc[known[by] == reference].set_index("seed")[readout.name]
        for name in names:
            mine = known[known[by] == name]
            if mine.empty:
                continue
            estimate = describe(mine[readout.name], confidence=confidence)
            row = {by: name, "readout": readout.name,
                   "better_when": "higher" if readout.higher_is_better else "lower",
                   "n": estimate.n, "runs": int(mine["runs"].sum()), "seeds": _seeds_text(mine),
                   "censored": int(mine["censored"].sum()) if readout.censored else 0,
                   "mean": estimate.mean, "sd": estimate.sd, "ci_low": estimate.ci_low,
                   "ci_high": estimate.ci_high}
            row.update(_compare(mine.set_index("seed")[readout.name], reference_values,
                                name=name, reference_name=reference,
                                higher_is_better=readout.higher_is_better,
                                confidence=confidence, boundaries=boundaries, power=power))
            rows.append(row)
    return pd.DataFrame(rows, columns=[by, *READOUT_COLUMNS])


# ---------------------------------------------------------------------------------------------
# Markdown and the terminal
# ---------------------------------------------------------------------------------------------
def _rounded(x: float, digits: int) -> float:
    """``x`` rounded for printing, without a sign on zero: -0.001 prints as 0.00, not -0.00."""
    return round(x, digits) + 0.0


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if _missing(x) else f"{_rounded(x, digits):.{digits}f}"


def _ci(low: float, high: float, digits: int = 2) -> str:
    return "n/a" if _missing(low) else f"[{_num(low, digits)}, {_num(high, digits)}]"


def _signed(x: float, digits: int = 2) -> str:
    return "n/a" if _missing(x) else f"{_rounded(x, digits):+.{digits}f}"


def _needed_phrase(needed: float, power: float) -> str:
    if _missing(needed):
        return ""
    if math.isinf(needed):
        return f"{power:.0%} power out of reach (observed Δ ≈ 0)"
    return f"{int(needed)} seeds for {power:.0%} power"


def _verdict_text(row: pd.Series, *, power: float) -> str:
    """The verdict with what it rests on: "(Welch)", the seeds a sequential decision read
    ("decided at N seeds"), and
    for an undecided comparison the seeds a difference of the observed size needs."""
    text = row["verdict"]
    basis = row.get("verdict_basis", "")
    if basis == "Welch":
        text += " (Welch)"
    elif basis == SEQUENTIAL_BASIS and text in ("better", "worse"):
        text += f" (decided at {int(row['seeds_used'])} seeds)"
    needed = _needed_phrase(row.get("seeds_needed", math.nan), power)
    return f"{text}; {needed}" if needed and _undecided(text) else text


def _basis_difference(row: pd.Series) -> tuple[float, float, float]:
    """The difference and interval the verdict read: Welch's, or paired by seed."""
    if row["verdict_basis"] == "Welch":
        return row["diff_vs_reference"], row["diff_ci_low"], row["diff_ci_high"]
    return row["paired_diff"], row["paired_ci_low"], row["paired_ci_high"]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def to_markdown(table: pd.DataFrame, *, reference: str, confidence: float = CONFIDENCE,
                power: float = POWER) -> str:
    """The summary as a Markdown table (PSNR in dB; intervals are t / Welch intervals)."""
    by = table.index.name or "arm"
    pct = f"{round(confidence * 100)}%"
    header = [by, "runs (seeds)", "final val PSNR (dB) mean ± sd", f"{pct} CI",
              "best val PSNR (dB) mean ± sd", f"{pct} CI", "epoch of best (mean)",
              "copy-first floor (dB)", f"Δ final vs {reference} (dB)", f"{pct} CI (Welch)",
              f"{pct} CI paired by seed (seeds)", "verdict"]
    rows = []
    for name, r in table.iterrows():
        is_reference = r["verdict"] == "reference"
        rows.append([
            f"`{name}`", f"{r['runs']} ({r['seeds']})",
            f"{_num(r['final_mean'])} ± {_num(r['final_sd'])}",
            _ci(r["final_ci_low"], r["final_ci_high"]),
            f"{_num(r['best_mean'])} ± {_num(r['best_sd'])}",
            _ci(r["best_ci_low"], r["best_ci_high"]),
            _num(r["best_epoch_mean"], 1), _num(r["copy_first"]),
            "—" if is_reference else _signed(r["diff_vs_reference"]),
            "—" if is_reference else _ci(r["diff_ci_low"], r["diff_ci_high"]),
            "—" if is_reference else
            f"{_ci(r['paired_ci_low'], r['paired_ci_high'])} ({r['paired_n']})",
            _verdict_text(r, power=power),
        ])
    return "\n".join(_markdown_table(header, rows))


def readouts_to_markdown(table: pd.DataFrame, *, reference: str,
                         confidence: float = CONFIDENCE, power: float = POWER,
                         readouts: Sequence[Readout] = READOUTS) -> str:
    """``summarize_readouts`` as one short Markdown table per readout, each under a line that
    defines it and says which direction is better. Δ and its interval are the ones the verdict
    read (paired by seed, or Welch's where it says so)."""
    by = table.columns[0]
    pct = f"{round(confidence * 100)}%"
    sections = []
    for readout in readouts:
        rows = table[table["readout"] == readout.name]
        if rows.empty:
            continue
        direction = "higher" if readout.higher_is_better else "lower"
        header = [by, "runs (seeds)", f"mean ± sd ({readout.unit})", f"{pct} CI",
                  f"Δ vs `{reference}` ({readout.unit})", f"{pct} CI of Δ", "verdict"]
        cells = []
        for _, r in rows.iterrows():
            digits = readout.digits
            spread = f"{_num(r['mean'], digits)} ± {_num(r['sd'], digits)}"
            if r["censored"]:
                spread += f" (censored: {r['censored']} of {r['runs']} runs never reached it)"
            difference, low, high = _basis_difference(r)
            is_reference = r["verdict"] == "reference"
            cells.append([f"`{r[by]}`", f"{r['runs']} ({r['seeds']})", spread,
                          _ci(r["ci_low"], r["ci_high"], digits),
                          "—" if is_reference else _signed(difference, digits),
                          "—" if is_reference else _ci(low, high, digits),
                          _verdict_text(r, power=power)])
        title = f"**{readout.label}** ({readout.unit}; {direction} is better): {readout.about}"
        sections.append("\n".join([title, "", *_markdown_table(header, cells)]))
    return "\n\n".join(sections)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def readout_rows(table: pd.DataFrame, readout: str) -> pd.DataFrame:
    """One readout's rows of ``summarize_readouts``' long table, indexed by its arm (or group)
    column, in the table's order: what ``to_terminal`` takes for that readout."""
    by = table.columns[0]
    return table[table["readout"] == readout].set_index(by)


def to_terminal(table: pd.DataFrame, *, reference: str, width: int = 100,
                confidence: float = CONFIDENCE, power: float = POWER,
                readout: Readout = READOUTS[0]) -> str:
    """The summary in at most ``width`` (>= 72) columns: arm, seeds, ``readout`` mean ± sd
    (default: final val PSNR), Δ vs the reference with the interval the verdict read (paired
    by seed), and the verdict, wrapped inside its column. ``table``: ``summarize``'s (final
    val PSNR), or one readout's rows of ``summarize_readouts`` (``readout_rows``) with that
    ``readout``. Names too long for their column are cut with "…"; the full table is
    ``to_markdown``'s (``readouts_to_markdown``'s)."""
    by = table.index.name or "arm"
    pct = f"{round(confidence * 100)}%"
    mean, sd = ("mean", "sd") if "mean" in table.columns else ("final_mean", "final_sd")
    digits = readout.digits
    rows = []
    for name, r in table.iterrows():
        difference, low, high = _basis_difference(r) if r["verdict"] != "reference" else \
            (math.nan, math.nan, math.nan)
        spread = f"{_num(r[mean], digits)} ± {_num(r[sd], digits)}"
        if readout.censored and r.get("censored", 0):
            spread += f" ({int(r['censored'])} censored)"
        rows.append([str(name), str(r["n"]), spread,
                     "—" if r["verdict"] == "reference" else
                     f"{_signed(difference, digits)} {_ci(low, high, digits)}",
                     _verdict_text(r, power=power)])
    header = [by, "seeds", f"{readout.name} ({readout.unit})",
              f"Δ ({readout.unit}) [{pct} CI]", "verdict"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    gap = 2
    verdict_min = 30  # "better (decided at 4 seeds)" on one line
    # The name column gives way first, so the verdict keeps a readable width.
    widths[0] = max(8, min(widths[0], width - sum(widths[1:]) - 4 * gap - verdict_min))
    verdict_width = max(12, width - sum(widths) - 4 * gap)  # below ~72 columns lines overflow
    direction = "higher" if readout.higher_is_better else "lower"
    intro = (f"{readout.label[0].lower()}{readout.label[1:]} ({readout.unit}; {direction} is "
             f"better), mean ± sd over seeds; Δ = {by} - `{reference}`, paired by seed (Welch "
             "where marked)")
    lines = textwrap.wrap(intro, width)
    for cells in [header, *rows]:
        head = [_fit(cells[0], widths[0]).ljust(widths[0]), cells[1].rjust(widths[1]),
                cells[2].ljust(widths[2]), cells[3].ljust(widths[3])]
        wrapped = textwrap.wrap(cells[4], verdict_width) or [""]
        lines.append((" " * gap).join([*head, wrapped[0]]).rstrip())
        indent = " " * (sum(widths) + 4 * gap)
        lines += [indent + more for more in wrapped[1:]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Calibration: the verdicts and intervals above, checked on simulated studies
# ---------------------------------------------------------------------------------------------
# A seed moves every arm together (initialisation, clip order, noise), about 0.5 dB; each
# run adds its own noise, about 0.2 dB (the scale of the cpu profile's final val PSNR).
BASE_DB, SEED_SD, NOISE_SD = 21.7, 0.5, 0.2
PAIRED_SD = NOISE_SD * math.sqrt(2)  # sd of a per-seed difference between two arms


@dataclass(frozen=True)
class Rate:
    """A rate measured over ``studies`` simulated studies, the value theory gives for it
    (``expected``: alpha, the analytic power or the nominal coverage), and the Monte-Carlo
    error of the measurement, sqrt(rate (1 - rate) / studies)."""

    check: str
    rate: float
    studies: int
    expected: float

    @property
    def mc_error(self) -> float:
        return math.sqrt(self.rate * (1 - self.rate) / self.studies)


def simulate_seeds(rng: np.random.Generator, *, studies: int, seeds: int,
                   difference: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(reference, arm) final values, each (studies, seeds): value = BASE_DB + the seed's
    effect (shared by both arms at that seed, sd SEED_SD) + the arm's effect (0 for the
    reference, ``difference`` for the arm) + the run's own noise (sd NOISE_SD)."""
    seed_effect = rng.normal(0.0, SEED_SD, (studies, seeds))
    reference = BASE_DB + seed_effect + rng.normal(0.0, NOISE_SD, (studies, seeds))
    arm = BASE_DB + seed_effect + difference + rng.normal(0.0, NOISE_SD, (studies, seeds))
    return reference, arm


def _fixed_decisions(reference: np.ndarray, arm: np.ndarray, *,
                     confidence: float = CONFIDENCE) -> np.ndarray:
    """``verdict`` of ``paired`` for each study, as +1 (better), -1 (worse), 0: the interval
    of the mean per-seed difference excludes 0 or not."""
    _, low, high, *_ = _paired_arrays(arm - reference, scale=np.abs(arm).max(axis=-1),
                                      confidence=confidence)
    return np.where(low > 0, 1, np.where(high < 0, -1, 0))


def _sequential_decisions(reference: np.ndarray, arm: np.ndarray,
                          boundaries: SequentialBoundaries) -> np.ndarray:
    sign, _ = _sequential_signs(arm - reference, boundaries, scale=np.abs(arm).max(axis=-1))
    return sign


def false_positive_rate(rng: np.random.Generator, *, studies: int, seeds: int,
                        confidence: float = CONFIDENCE) -> Rate:
    """A/A (two arms, no true difference): how often the fixed-seed paired verdict says
    "better" or "worse" at ``seeds`` seeds."""
    decided = _fixed_decisions(*simulate_seeds(rng, studies=studies, seeds=seeds),
                               confidence=confidence) != 0
    return Rate(f"A/A false positives, fixed {seeds} seeds", float(decided.mean()), studies,
                1 - confidence)


def sequential_false_positive_rate(rng: np.random.Generator, *, studies: int,
                                   boundaries: SequentialBoundaries) -> Rate:
    """A/A: how often the group-sequential test decides at any of its looks."""
    reference, arm = simulate_seeds(rng, studies=studies, seeds=boundaries.looks[-1])
    decided = _sequential_decisions(reference, arm, boundaries) != 0
    return Rate(f"A/A false positives, sequential looks {_looks_text(boundaries)}",
                float(decided.mean()), studies, boundaries.alpha)


def _looks_text(boundaries: SequentialBoundaries) -> str:
    return f"{','.join(map(str, boundaries.looks))} of {boundaries.max_seeds}"


def power(rng: np.random.Generator, *, studies: int, seeds: int, effect_size: float = 1.0,
          confidence: float = CONFIDENCE) -> Rate:
    """How often the fixed-seed paired verdict decides when the arm is ``effect_size`` paired
    sds better, against the noncentral-t power (``paired_power``)."""
    reference, arm = simulate_seeds(rng, studies=studies, seeds=seeds,
                                    difference=effect_size * PAIRED_SD)
    decided = _fixed_decisions(reference, arm, confidence=confidence) != 0
    return Rate(f"power, fixed {seeds} seeds, true Δ = {effect_size:g} paired sd",
                float(decided.mean()), studies,
                paired_power(seeds, effect_size, alpha=1 - confidence))


def sequential_power(rng: np.random.Generator, *, studies: int,
                     boundaries: SequentialBoundaries, effect_size: float = 1.0) -> Rate:
    """The same for the group-sequential test. ``expected`` is a lower bound: the power of
    its last look alone (a study that crosses there is decided, whatever came before)."""
    reference, arm = simulate_seeds(rng, studies=studies, seeds=boundaries.looks[-1],
                                    difference=effect_size * PAIRED_SD)
    decided = _sequential_decisions(reference, arm, boundaries) != 0
    last = paired_power(boundaries.looks[-1], effect_size, alpha=boundaries.nominal[-1])
    return Rate(f"power, sequential looks {_looks_text(boundaries)}, true Δ = "
                f"{effect_size:g} paired sd (expected: last look alone, a lower bound)",
                float(decided.mean()), studies, last)


def coverage(rng: np.random.Generator, *, studies: int, seeds: int, interval: str,
             confidence: float = CONFIDENCE) -> Rate:
    """How often a ``confidence`` interval holds the true value, for ``interval``:
    "mean" (``describe``, of an arm's mean: BASE_DB), "paired" (``paired``, of the true
    difference) or "welch shared seeds" (``welch`` on the same seeds-sharing arms, which
    over-covers: it counts the seed effect both arms share as noise)."""
    truth = 0.3
    reference, arm = simulate_seeds(rng, studies=studies, seeds=seeds, difference=truth)
    if interval == "mean":
        _, _, low, high = _describe_arrays(reference, confidence=confidence)
        truth = BASE_DB
    elif interval == "paired":
        _, low, high, *_ = _paired_arrays(arm - reference, scale=np.abs(arm).max(axis=-1),
                                          confidence=confidence)
    elif interval == "welch shared seeds":
        _, low, high, *_ = _welch_arrays(arm, reference, confidence=confidence)
    else:
        raise ValueError(f"interval={interval!r}: choose mean, paired or welch shared seeds")
    covered = (low <= truth) & (truth <= high)
    name = "Welch interval on arms sharing seeds" if interval == "welch shared seeds" else \
        f"{interval} interval"
    return Rate(f"coverage of the {confidence:.0%} {name}, {seeds} seeds",
                float(covered.mean()), studies, confidence)


def welch_coverage(rng: np.random.Generator, *, studies: int, seeds: tuple[int, int] = (6, 6),
                   sds: tuple[float, float] = (1.0, 2.0),
                   confidence: float = CONFIDENCE) -> Rate:
    """Coverage of ``welch``'s interval where it is the right test: two arms on disjoint seeds
    with unequal sds. Welch's df is an approximation; across sizes 2-8 and sd ratios 1-2 its
    95% interval covered 94.5-97.6% (the extremes at 2 vs 2 seeds)."""
    a = rng.normal(0.3, sds[0], (studies, seeds[0]))
    b = rng.normal(0.0, sds[1], (studies, seeds[1]))
    _, low, high, *_ = _welch_arrays(a, b, confidence=confidence)
    covered = (low <= 0.3) & (0.3 <= high)
    return Rate(f"coverage of the {confidence:.0%} Welch interval, {seeds[0]} vs {seeds[1]} "
                f"seeds, sd {sds[0]:g} vs {sds[1]:g}", float(covered.mean()), studies,
                confidence)


SEQUENTIAL_DESIGNS = ((2, 4, 6), (2, 4, 6, 8, 10), (2, 3, 4, 5, 6, 7, 8))


def calibration(*, studies: int = 20_000, seed: int = 2026) -> list[Rate]:
    """Every check, each over ``studies`` simulated studies from one fixed random stream."""
    rng = np.random.default_rng(seed)
    designs = [sequential_boundaries(looks, looks[-1]) for looks in SEQUENTIAL_DESIGNS]
    return [
        false_positive_rate(rng, studies=studies, seeds=2),
        false_positive_rate(rng, studies=studies, seeds=6),
        *(sequential_false_positive_rate(rng, studies=studies, boundaries=b) for b in designs),
        power(rng, studies=studies, seeds=6),
        sequential_power(rng, studies=studies, boundaries=designs[0]),
        coverage(rng, studies=studies, seeds=6, interval="mean"),
        coverage(rng, studies=studies, seeds=6, interval="paired"),
        welch_coverage(rng, studies=studies),
        coverage(rng, studies=studies, seeds=6, interval="welch shared seeds"),
    ]


def calibration_table(rates: Sequence[Rate]) -> str:
    """The measured rates as Markdown: rate ± Monte-Carlo error, and what theory expects."""
    rows = [[r.check, f"{r.rate:.4f} ± {r.mc_error:.4f}", f"{r.expected:.4f}", f"{r.studies:,}"]
            for r in rates]
    return "\n".join(_markdown_table(["check", "measured ± MC error", "expected", "studies"],
                                     rows))


def main(argv: list[str] | None = None) -> int:
    """``python -m studies.summary --simulate [--studies N] [--seed S]``: print the
    calibration table (seconds)."""
    parser = argparse.ArgumentParser(
        prog="python -m studies.summary", allow_abbrev=False,
        description="Check the summary's verdicts and intervals on simulated studies: A/A "
                    "false-positive rates (fixed seeds and sequential), power, coverage.")
    parser.add_argument("--simulate", action="store_true", help="run the calibration")
    parser.add_argument("--studies", type=int, default=20_000,
                        help="simulated studies per check (default 20000)")
    parser.add_argument("--seed", type=int, default=2026, help="random seed (default 2026)")
    args = parser.parse_args(argv)
    if not args.simulate:
        parser.error("nothing to do: give --simulate")
    if args.studies < 100:
        parser.error(f"--studies={args.studies} must be >= 100")
    print(calibration_table(calibration(studies=args.studies, seed=args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
