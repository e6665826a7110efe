"""A study's group curves on its parent run, for the MLflow UI.

MLflow draws each run's own curves; grouped by arm, its charts show min/max bands, never
mean ± sd (MLflow issue #3762). So each report logs, on the study's parent run, what its
figures draw: per arm (and, when groups hold several arms, per group), stepped by epoch,

- ``<arm>/val_psnr_mean``, ``<arm>/val_psnr_sd``, ``<arm>/val_psnr_lo`` and
  ``<arm>/val_psnr_hi`` (mean ∓ 1 sd): mean and sd (n-1) across the arm's runs at that
  epoch (one run per seed); sd, lo and hi from 2 runs on. The same for ``train_loss`` and
  ``val_loss``.
- At step 0, the summary's headline numbers: ``<arm>/final_val_psnr_mean`` and
  ``_sd`` (the summary table's ``final_mean`` and ``final_sd``), ``<arm>/best_val_psnr_mean``,
  ``<arm>/delta_vs_reference`` (difference in mean final val PSNR against the reference arm,
  dB) and ``<arm>/seeds`` (how many seeds the numbers average).

A group's metrics are named ``group.<group>/...``. In an arm or group name, each character
MLflow refuses in a metric key on some system (it takes letters, digits, ``_ - .``, spaces,
and ``/``, which here separates the name from the metric) becomes a period: the arm
``tfr_decay+kl_cyclical`` logs ``tfr_decay.kl_cyclical/val_psnr_mean``.
Each report replaces the values it logged before (``experiments.tracking.replace_metrics``),
so the curves follow the seeds as they are added.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

from experiments import tracking
from studies.results import StudyResults

CURVES = {"val/psnr": "val_psnr", "train/loss": "train_loss", "val/loss": "val_loss"}
CURVE_STATS = ("mean", "sd", "lo", "hi")
HEADLINES = {  # metric suffix -> summary column
    "final_val_psnr_mean": "final_mean", "final_val_psnr_sd": "final_sd",
    "best_val_psnr_mean": "best_mean", "delta_vs_reference": "diff_vs_reference",
    "seeds": "n",
}
SUFFIXES = frozenset({f"{name}_{stat}" for name in CURVES.values() for stat in CURVE_STATS}
                     | set(HEADLINES))
GROUP_PREFIX = "group."
_REFUSED = re.compile(r"[^\w.\- ]")  # besides '/': also ':', which Windows refuses


def prefix(name: str) -> str:
    """An arm or group name as the first part of a metric key MLflow accepts (not only dots:
    MLflow refuses a key that reads as another path, such as ``../val_psnr_mean``)."""
    text = _REFUSED.sub(".", name).strip()
    return text if text.strip(".") else "_" + text


def curves(metrics: pd.DataFrame, *, by: str = "arm",
           order: Iterable[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    """``<name>/<curve>_<stat>`` -> [(epoch, value)] for each ``by`` value (arm or group) of the
    tidy table: mean, sd, mean - sd and mean + sd across its runs at each epoch (no sd, lo or
    hi where fewer than 2 runs have the epoch)."""
    table = metrics[metrics["metric"].isin(list(CURVES))].dropna(subset=["value"])
    stats = table.groupby([by, "metric", "epoch"])["value"].agg(["mean", "std", "count"])
    names = list(order) if order is not None else sorted(table[by].unique())
    out: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        for metric, short in CURVES.items():
            if (name, metric) not in stats.index:
                continue
            rows = stats.loc[(name, metric)]
            spread = rows[rows["count"] >= 2]
            base = f"{_key_prefix(name, by)}/{short}"
            out[f"{base}_mean"] = _points(rows["mean"])
            if len(spread):
                out[f"{base}_sd"] = _points(spread["std"])
                out[f"{base}_lo"] = _points(spread["mean"] - spread["std"])
                out[f"{base}_hi"] = _points(spread["mean"] + spread["std"])
    return out


def headlines(table: pd.DataFrame, *, by: str = "arm") -> dict[str, list[tuple[int, float]]]:
    """``<name>/<headline>`` -> [(0, value)] from a summary table (``summary.summarize``,
    indexed by ``by``); missing values (an sd of one seed) are left out."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, row in table.iterrows():
        for suffix, column in HEADLINES.items():
            value = float(row[column])
            if not math.isnan(value):
                out[f"{_key_prefix(str(name), by)}/{suffix}"] = [(0, value)]
    return out


def log_group_metrics(client: Any, results: StudyResults, summary_table: pd.DataFrame,
                      group_summary: pd.DataFrame | None = None) -> None:
    """The study's group curves and headline numbers on its parent run, in place of those an
    earlier report logged (a study without a parent run gets none)."""
    meta = results.meta
    if meta.parent_run_id is None:
        return
    history = {**curves(results.metrics, by="arm", order=meta.arms),
               **headlines(summary_table, by="arm")}
    if meta.grouped:
        history.update(curves(results.metrics, by="group", order=meta.groups))
        if group_summary is not None:
            history.update(headlines(group_summary, by="group"))
    held = client.get_run(meta.parent_run_id).data.metrics
    stale = [key for key in held if key.rpartition("/")[2] in SUFFIXES]
    if not tracking.replace_metrics(client, meta.parent_run_id, history, stale=stale):
        print(f"{meta.study}: the tracking server cannot delete metrics: the parent run's "
              "charts show every report's group curves (the runs table and the report show "
              "the latest)", flush=True)


def _key_prefix(name: str, by: str) -> str:
    return prefix(name) if by == "arm" else GROUP_PREFIX + prefix(name)


def _points(series: pd.Series) -> list[tuple[int, float]]:
    return [(int(epoch), float(value)) for epoch, value in series.items()]
