"""The standard figures of a study, drawn with seaborn from the tidy tables (studies.results).

Pure drawing: a tidy DataFrame (or arrays) in, a PNG out; nothing here talks to MLflow.
Each figure works out its own band and says what it is in its subtitle, with the profile and
the seeds given by the caller:

- linear axis: mean ± 1 sd across runs (``errorbar="sd"``): spread across seeds, not a
  confidence interval;
- log axis: geometric mean ×/÷ 1 geometric sd (mean ± 1 sd of the log10 values), so the band
  stays positive where the arithmetic mean - sd would not;
- no band where the runs of every line agree at every step (β, the teacher-forcing ratio: the
  same for every seed of an arm) or where a line has one run.

A metric with one value for every run and epoch (the KL study's teacher-forcing ratio, 0
throughout) has nothing to draw: ``flat_note`` says so and the caller skips the figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.artifacts import floor_label, psnr_axis_limits

DPI = 120


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def describe_seeds(seeds: Sequence[int]) -> str:
    seeds = sorted({int(s) for s in seeds})
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"


def band_phrase(table: pd.DataFrame, hue: str, *, band: str = "± 1 sd") -> str:
    """'band: ± 1 sd across 2 seeds' (or '... across 6 runs per group: 3 arms × 2 seeds' for
    groups); ``band`` names the band drawn."""
    runs = table.drop_duplicates("run_id")
    per_hue = runs.groupby(hue)["run_id"].nunique()
    if per_hue.empty:
        return "no runs"
    lo, hi = int(per_hue.min()), int(per_hue.max())
    count = str(lo) if lo == hi else f"{lo}–{hi}"
    if hue == "group" and runs.groupby("group")["arm"].nunique().max() > 1:
        arms = runs.groupby("group")["arm"].nunique()
        seeds = runs.groupby("group")["seed"].nunique()
        n_seeds = int(seeds.max())
        return (f"band: {band} across {count} runs per group "
                f"({int(arms.max())} arms × {n_seeds} seed{'s' if n_seeds != 1 else ''})")
    if lo < 2:
        return f"band: {band} across seeds (n={count} per {hue}: no band where n=1)"
    return f"band: {band} across {count} seeds"


def flat_note(metrics: pd.DataFrame, metric: str) -> str | None:
    """'train/tfr is 0 for every run at every epoch' when ``metric`` has one value
    throughout (a figure of it would be flat lines that say nothing), else None."""
    values = metrics.loc[metrics["metric"] == metric, "value"]
    if values.empty or values.nunique() > 1:
        return None
    return f"{metric} is {values.iloc[0]:g} for every run at every epoch"


def has_spread(data: pd.DataFrame, by: Sequence[str]) -> bool:
    """Whether the runs sharing some ``by`` key (e.g. arm and epoch) differ in value."""
    return bool((data.groupby(list(by))["value"].nunique() > 1).any())


def uses_log_axis(values: np.ndarray) -> bool:
    """A log axis only for positive values spanning at least a decade (over a narrower range
    it shows no tick labels)."""
    return bool((values > 0).all() and values.max() >= 10 * values.min())


def geometric_mean(values: pd.Series) -> float:
    return float(10 ** np.log10(values).mean())


def geometric_sd_band(values: pd.Series) -> tuple[float, float]:
    """Geometric mean ×/÷ 1 geometric sd: 10 ** (mean ± sd of log10 values), ddof=1 as
    seaborn's "sd" takes it; (nan, nan) for one value, as seaborn draws no band there."""
    logs = np.log10(np.asarray(values, dtype=float))
    if logs.size < 2:
        return float("nan"), float("nan")
    mean, sd = logs.mean(), logs.std(ddof=1)
    return float(10 ** (mean - sd)), float(10 ** (mean + sd))


def _band(data: pd.DataFrame, keys: Sequence[str], hue: str, *, log: bool) -> tuple[dict, str]:
    """seaborn's estimator/errorbar arguments for ``data`` (one line per ``hue``, a point per
    ``keys``) and the subtitle line saying what the line and band are."""
    runs = data.groupby(hue)["run_id"].nunique()
    if runs.max() < 2:
        return {"errorbar": None}, f"no band: one run per {hue}"
    if not has_spread(data, keys):
        return {"errorbar": None}, (f"no band: the runs of each {hue} have the same value at "
                                    f"every {keys[-1]}")
    if log:
        return ({"estimator": geometric_mean, "errorbar": geometric_sd_band},
                "line: geometric mean; " + band_phrase(
                    data, hue, band="×/÷ 1 geometric sd (mean ± 1 sd of log10 values)"))
    return {"errorbar": "sd"}, band_phrase(data, hue)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _titles(fig, title: str, *lines: str) -> None:
    fig.suptitle("\n".join([title, *(line for line in lines if line)]), fontsize=11)


def _legend(fig, ax, title: str) -> None:
    """One legend for the figure, outside on the right (constrained layout makes room)."""
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    fig.legend(handles, labels, title=title, loc="outside right center", fontsize=9,
               title_fontsize=9, frameon=False)


@dataclass(frozen=True)
class Curve:
    """What an epoch figure draws and how it is labelled."""

    metric: str
    title: str
    ylabel: str
    subtitle: str = ""
    note: str = ""  # before the band's line, e.g. how the metric is sampled
    log_y: bool = False  # taken only when the values span at least a decade
    floor: float | None = None  # a dashed horizontal line: the copy-first-frame floor
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Lines:
    """The column whose values are the lines (``hue``) and, optionally, the one whose values
    are small multiples (``col``), each in its order (default: sorted)."""

    hue: str = "arm"
    hue_order: Sequence[str] | None = None
    col: str | None = None
    col_order: Sequence[str] | None = None


def draw_epoch_curve(metrics: pd.DataFrame, curve: Curve, lines: Lines = Lines()) -> Any:
    """The figure of ``curve.metric`` per epoch, one line per ``lines.hue`` value: the mean
    over its runs with a band (see the module docstring; under the subtitle a line says
    which). Each line also gets its own marker and dashes, so curves that coincide (e.g.
    identical β schedules) stay visible."""
    plt, sns = _pyplot()
    data = metrics[metrics["metric"] == curve.metric]
    if data.empty:
        raise ValueError(f"no rows for metric {curve.metric!r}")
    hue, col = lines.hue, lines.col
    order = [h for h in (lines.hue_order or sorted(data[hue].unique())) if h in set(data[hue])]
    cols = list(lines.col_order or (sorted(data[col].unique()) if col else [None]))
    fig, axes = plt.subplots(1, len(cols), figsize=(8 + 3.6 * (len(cols) - 1), 4.6),
                             sharey=True, squeeze=False, layout="constrained")
    log_y = curve.log_y and uses_log_axis(data["value"].to_numpy())
    band, band_line = _band(data, [k for k in (hue, col, "epoch") if k is not None], hue,
                            log=log_y)
    for ax, value in zip(axes[0], cols, strict=True):
        part = data if value is None else data[data[col] == value]
        sns.lineplot(data=part, x="epoch", y="value", hue=hue, hue_order=order, style=hue,
                     style_order=order, markers=True, dashes=True, markersize=6, ax=ax,
                     **band)
        _epoch_axes(ax, curve, np.sort(data["epoch"].unique()), log_y=log_y)
        if value is not None:
            ax.set_title(f"{col} = {value}", fontsize=10)
        if ax is not axes[0][-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    _legend(fig, axes[0][-1], hue)
    _titles(fig, curve.title, curve.subtitle,
            f"{curve.note}; {band_line}" if curve.note else band_line)
    return fig


def _epoch_axes(ax: Any, curve: Curve, epochs: np.ndarray, *, log_y: bool) -> None:
    """The floor line, axis labels, scale, limits and epoch ticks of one panel."""
    if curve.floor is not None:
        ax.axhline(curve.floor, color="0.35", ls=(0, (4, 2)), lw=1.2,
                   label=f"copy first frame ({curve.floor:.2f} dB)")
    ax.set_xlabel("epoch (0-based, the MLflow step)")
    ax.set_ylabel(f"{curve.ylabel} (log scale)" if log_y else curve.ylabel)
    if log_y:
        ax.set_yscale("log")
    if curve.ylim is not None:
        ax.set_ylim(*curve.ylim)
    if len(epochs) <= 20:
        ax.set_xticks(epochs)


def epoch_curve(metrics: pd.DataFrame, curve: Curve, lines: Lines = Lines(), *,
                path: str | Path) -> Path:
    """``draw_epoch_curve`` saved as a PNG at ``path``."""
    return _save(draw_epoch_curve(metrics, curve, lines), Path(path))


def draw_psnr_per_frame(per_frame: pd.DataFrame, *, title: str, subtitle: str = "",
                        hue: str = "arm", hue_order: Sequence[str] | None = None) -> Any:
    """Validation PSNR per frame of each ``hue`` (mean ± 1 sd across its runs) and the
    copy-first-frame floor (dashed grey). The y axis fits the models' curves and the floor
    but for its spike over the first frames (copying frame 1 is nearly exact there), which
    leaves the axis; its legend entry says so (``experiments.artifacts.psnr_axis_limits``)."""
    plt, sns = _pyplot()
    model = per_frame[per_frame["metric"] == "val/psnr_per_frame"]
    floor = per_frame[per_frame["metric"] == "val/psnr_copy_first_per_frame"]
    if model.empty:
        raise ValueError("no per-frame PSNR rows")
    fig, ax = plt.subplots(figsize=(11, 4.6), layout="constrained")
    order = list(hue_order) if hue_order else sorted(model[hue].unique())
    means = model.groupby(hue)["value"].mean()
    labels = {h: f"{h} (mean {means[h]:.2f} dB)" for h in order if h in means}
    shown = model.assign(**{hue: model[hue].map(labels)})
    names = [labels[h] for h in order if h in labels]
    band, band_line = _band(model, [hue, "frame"], hue, log=False)
    sns.lineplot(data=shown, x="frame", y="value", hue=hue, hue_order=names, style=hue,
                 style_order=names, dashes=True, lw=1.2, ax=ax, **band)
    # The axis fits what the lines show: each line's mean ± 1 sd at every frame.
    stats = model.groupby([hue, "frame"])["value"].agg(["mean", "std"]).fillna(0.0)
    floor_curve = floor.groupby("frame")["value"].mean()
    limits = psnr_axis_limits(stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                              floor_curve.to_numpy())
    ax.plot(floor_curve.index, floor_curve.to_numpy(), color="0.35", ls=(0, (4, 2)), lw=1.1,
            label=floor_label(floor_curve.to_numpy(), floor_curve.index.to_numpy(), limits))
    ax.set_ylim(*limits)
    ax.set_xlabel("frame (1-based; frame 1 is given)")
    ax.set_ylabel("PSNR (dB)")
    _legend(fig, ax, hue)
    _titles(fig, title, subtitle, band_line)
    return fig


def psnr_per_frame(per_frame: pd.DataFrame, *, path: str | Path, **options: Any) -> Path:
    """``draw_psnr_per_frame`` saved as a PNG at ``path``."""
    return _save(draw_psnr_per_frame(per_frame, **options), Path(path))


def pick_frames(length: int, count: int = 6) -> list[int]:
    """``count`` 0-based indices spread evenly over the generated frames 1..length-1."""
    count = max(1, min(count, length - 1))
    return sorted({round(i) for i in np.linspace(1, length - 1, count)})


def filmstrip(truth: np.ndarray, predictions: Mapping[str, np.ndarray], *, path: str | Path,
              title: str, subtitle: str = "", frames: Sequence[int] | None = None,
              scale: int = 4) -> Path:
    """Ground truth (top row) and each prediction (one row per label) at ``frames``
    (0-based indices; default six spread over the sequence), upscaled ``scale``× nearest.

    truth and each prediction: (L, H, W, 3) uint8.
    """
    plt, _ = _pyplot()
    frames = list(frames) if frames is not None else pick_frames(truth.shape[0])
    rows = [("ground truth", truth), *predictions.items()]
    height, width = truth.shape[1] * scale, truth.shape[2] * scale
    inch = 1 / 100  # one image pixel per screen pixel at dpi 100
    fig, axes = plt.subplots(len(rows), len(frames), squeeze=False, layout="constrained",
                             figsize=(len(frames) * width * inch * 1.04 + 2.2,
                                      len(rows) * height * inch * 1.15 + 0.9))
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.02, wspace=0.01, hspace=0.02)
    for r, (label, video) in enumerate(rows):
        for c, index in enumerate(frames):
            ax = axes[r][c]
            image = video[index].repeat(scale, axis=0).repeat(scale, axis=1)  # (sH, sW, 3)
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {index + 1}", fontsize=10)
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
