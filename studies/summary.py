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
- ``per_run`` and ``summarize`` turn the tidy metrics table (``studies.results``) into one row
  per arm (or per group); ``to_markdown`` prints it. A group holding several arms has one
  replicate per seed (the mean of that seed's runs), never one per run: runs of one seed
  share its initialisation, clip order and noise, so pooling them as independent runs would
  narrow every interval (a 95% interval covered the mean 60-70% of the time in simulation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95


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


def describe(values: Sequence[float], *, confidence: float = CONFIDENCE) -> Estimate:
    """mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Estimate(mean, math.nan, n, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(mean, sd, n, mean - half, mean + half)


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch–Satterthwaite: (va/na + vb/nb)² / ((va/na)²/(na-1) + (vb/nb)²/(nb-1))."""
    a, b = var_a / n_a, var_b / n_b
    denominator = a**2 / (n_a - 1) + b**2 / (n_b - 1)
    return (a + b) ** 2 / denominator if denominator > 0 else math.nan


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
    difference = float(a.mean() - b.mean()) if n_a and n_b else math.nan
    if n_a < 2 or n_b < 2:
        return Comparison(difference, math.nan, math.nan, math.nan, math.nan, math.nan, n_a, n_b)
    var_a, var_b = float(a.var(ddof=1)), float(b.var(ddof=1))
    se = math.sqrt(var_a / n_a + var_b / n_b)
    scale = max(abs(float(a.mean())), abs(float(b.mean())))
    return _t_comparison(difference, se, welch_df(var_a, n_a, var_b, n_b), n_a, n_b,
                         scale=scale, confidence=confidence)


def _t_comparison(difference: float, se: float, df: float, n: int,
                  n_reference: int, *, scale: float, confidence: float) -> Comparison:
    """The t interval and two-sided p of ``difference`` with standard error ``se``. With no
    spread (``se`` at rounding level for values of size ``scale``) t is undefined: nan
    interval, and a difference that is itself rounding noise becomes exactly 0."""
    tolerance = 1e-9 * max(1.0, scale)
    if se <= tolerance:
        difference = difference if abs(difference) > tolerance else 0.0
        return Comparison(difference, math.nan, math.nan, math.nan, math.nan, math.nan,
                          n, n_reference)
    statistic = difference / se
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se
    p_value = float(2 * stats.t.sf(abs(statistic), df))
    return Comparison(difference, difference - half, difference + half, df, statistic, p_value,
                      n, n_reference)


def paired(values: pd.Series, reference: pd.Series, *,
           confidence: float = CONFIDENCE) -> Comparison:
    """Mean of the per-seed differences (values - reference) over the seeds both hold (Series
    indexed by seed), with a t interval on n-1 df and a two-sided p, as
    ``scipy.stats.ttest_rel``; ``df`` is n-1. Fewer than two common seeds, or differences
    without spread: nan interval (a difference that is rounding noise becomes exactly 0)."""
    common = values.index.intersection(reference.index)
    d = (values.loc[common].to_numpy(float) - reference.loc[common].to_numpy(float))
    n = d.size
    difference = float(d.mean()) if n else math.nan
    if n < 2:
        return Comparison(difference, math.nan, math.nan, math.nan, math.nan, math.nan, n, n)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    return _t_comparison(difference, se, n - 1, n, n,
                         scale=float(np.abs(values.loc[common]).max()), confidence=confidence)


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


# ---------------------------------------------------------------------------------------------
# From the tidy table to one row per arm
# ---------------------------------------------------------------------------------------------
def per_run(metrics: pd.DataFrame, *, metric: str = "val/psnr",
            floor_metric: str = "val/psnr_copy_first") -> pd.DataFrame:
    """One row per run: final (last epoch), best (max) and epoch of best of ``metric``, and
    the copy-first floor. ``metrics`` is the tidy table (run_id, arm, group, seed, epoch,
    metric, value)."""
    keys = ["run_id", "arm", "group", "seed"]
    curve = metrics[metrics["metric"] == metric].sort_values(["run_id", "epoch"])
    if curve.empty:
        return pd.DataFrame(columns=[*keys, "final", "final_epoch", "best", "best_epoch", "floor"])
    grouped = curve.groupby(keys, sort=False)
    last = grouped.tail(1).set_index(keys)
    best = curve.loc[grouped["value"].idxmax()].set_index(keys)
    out = pd.DataFrame({"final": last["value"], "final_epoch": last["epoch"],
                        "best": best["value"], "best_epoch": best["epoch"]})
    floor = metrics[metrics["metric"] == floor_metric].groupby("run_id")["value"].last()
    out = out.reset_index()
    out["floor"] = out["run_id"].map(floor).astype(float)
    return out


SUMMARY_COLUMNS = [
    "n", "runs", "seeds", "final_mean", "final_sd", "final_ci_low", "final_ci_high",
    "best_mean", "best_sd", "best_ci_low", "best_ci_high", "best_epoch_mean", "copy_first",
    "diff_vs_reference", "diff_ci_low", "diff_ci_high", "welch_df", "p_value",
    "paired_n", "paired_diff", "paired_ci_low", "paired_ci_high", "paired_p_value",
    "verdict", "verdict_basis",
]
_NO_COMPARISON = {"diff_ci_low": math.nan, "diff_ci_high": math.nan, "welch_df": math.nan,
                  "p_value": math.nan, "paired_n": 0, "paired_diff": math.nan,
                  "paired_ci_low": math.nan, "paired_ci_high": math.nan,
                  "paired_p_value": math.nan, "verdict_basis": ""}


def summarize(metrics: pd.DataFrame, *, reference: str, by: str = "arm",
              order: Sequence[str] | None = None, metric: str = "val/psnr",
              confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per ``by`` value (arm or group): final and best ``metric`` over its seeds
    (mean, sd, t interval; ``n`` seeds, ``runs`` runs), mean epoch of best, copy-first floor,
    and the final value against ``reference``: Welch, and paired by seed over the seeds both
    ran. The verdict reads the paired interval when there are two common seeds or more, else
    Welch's (``verdict_basis`` says which). A seed with several runs (a group's arms) counts
    once, as the mean of its runs. Indexed by ``by``, rows in ``order`` (default: sorted)."""
    runs = per_run(metrics, metric=metric).groupby([by, "seed"], sort=False).agg(
        final=("final", "mean"), best=("best", "mean"), best_epoch=("best_epoch", "mean"),
        floor=("floor", "mean"), runs=("run_id", "size")).reset_index()
    names = list(order) if order is not None else sorted(runs[by].unique())
    names = [n for n in names if n in set(runs[by])]
    ref_final = runs.loc[runs[by] == reference].set_index("seed")["final"]
    rows = []
    for name in names:
        mine = runs[runs[by] == name]
        final, best = describe(mine["final"], confidence=confidence), \
            describe(mine["best"], confidence=confidence)
        row = {
            by: name, "n": final.n, "runs": int(mine["runs"].sum()),
            "seeds": " ".join(str(s) for s in sorted(mine["seed"].unique())),
            "final_mean": final.mean, "final_sd": final.sd,
            "final_ci_low": final.ci_low, "final_ci_high": final.ci_high,
            "best_mean": best.mean, "best_sd": best.sd,
            "best_ci_low": best.ci_low, "best_ci_high": best.ci_high,
            "best_epoch_mean": float(mine["best_epoch"].mean()),
            "copy_first": float(mine["floor"].mean()),
        }
        if name == reference:
            row.update(_NO_COMPARISON, diff_vs_reference=0.0, verdict="reference")
        elif ref_final.size == 0:
            row.update(_NO_COMPARISON, diff_vs_reference=math.nan, verdict="no reference runs")
        else:
            c = welch(mine["final"], ref_final, confidence=confidence)
            pc = paired(mine.set_index("seed")["final"], ref_final, confidence=confidence)
            basis = pc if pc.n >= 2 else c
            row.update(diff_vs_reference=c.difference, diff_ci_low=c.ci_low,
                       diff_ci_high=c.ci_high, welch_df=c.df, p_value=c.p_value,
                       paired_n=pc.n, paired_diff=pc.difference, paired_ci_low=pc.ci_low,
                       paired_ci_high=pc.ci_high, paired_p_value=pc.p_value,
                       verdict=verdict(basis),
                       verdict_basis="paired by seed" if basis is pc else "Welch")
        rows.append(row)
    return pd.DataFrame(rows, columns=[by, *SUMMARY_COLUMNS]).set_index(by)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _rounded(x: float, digits: int) -> float:
    """``x`` rounded for printing, without a sign on zero: -0.001 prints as 0.00, not -0.00."""
    return round(x, digits) + 0.0


def _num(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{_rounded(x, digits):.{digits}f}"


def _ci(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) else f"[{_num(low)}, {_num(high)}]"


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{_rounded(x, 2):+.2f}"


def to_markdown(table: pd.DataFrame, *, reference: str, confidence: float = CONFIDENCE) -> str:
    """The summary as a Markdown table (PSNR in dB; intervals are t / Welch intervals)."""
    by = table.index.name or "arm"
    pct = f"{round(confidence * 100)}%"
    header = [by, "runs (seeds)", "final val PSNR (dB) mean ± sd", f"{pct} CI",
              "best val PSNR (dB) mean ± sd", f"{pct} CI", "epoch of best (mean)",
              "copy-first floor (dB)", f"Δ final vs {reference} (dB)", f"{pct} CI (Welch)",
              f"{pct} CI paired by seed (seeds)", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in table.iterrows():
        cells = [
            f"`{name}`", f"{r['runs']} ({r['seeds']})",
            f"{_num(r['final_mean'])} ± {_num(r['final_sd'])}",
            _ci(r["final_ci_low"], r["final_ci_high"]),
            f"{_num(r['best_mean'])} ± {_num(r['best_sd'])}",
            _ci(r["best_ci_low"], r["best_ci_high"]),
            _num(r["best_epoch_mean"], 1), _num(r["copy_first"]),
            "—" if r["verdict"] == "reference" else _signed(r["diff_vs_reference"]),
            "—" if r["verdict"] == "reference" else _ci(r["diff_ci_low"], r["diff_ci_high"]),
            "—" if r["verdict"] == "reference" else
            f"{_ci(r['paired_ci_low'], r['paired_ci_high'])} ({r['paired_n']})",
            r["verdict"] + (" (Welch)" if r["verdict_basis"] == "Welch" else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
