"""The standard figures of a study, drawn with seaborn from the tidy tables (studies.results).

Pure drawing: a tidy DataFrame (or arrays) in, a PNG out; nothing here talks to MLflow.
Bands are ± 1 sd across runs (``errorbar="sd"``): spread across seeds, not a confidence
interval; every figure says so in its subtitle, with the profile and the seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

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


def band_phrase(table: pd.DataFrame, hue: str) -> str:
    """'± 1 sd across 2 seeds' (or '... across 6 runs: 3 arms × 2 seeds' for groups)."""
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
        return (f"band: ± 1 sd across {count} runs per group "
                f"({int(arms.max())} arms × {n_seeds} seed{'s' if n_seeds != 1 else ''})")
    if lo < 2:
        return f"band: ± 1 sd across seeds (n={count} per {hue}: no band where n=1)"
    return f"band: ± 1 sd across {count} seeds"


def _finish(fig, path: Path, title: str, subtitle: str) -> Path:
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _legend(fig, ax, title: str) -> None:
    """One legend for the figure, outside on the right (constrained layout makes room)."""
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    fig.legend(handles, labels, title=title, loc="outside right center", fontsize=9,
               title_fontsize=9, frameon=False)


def epoch_curve(metrics: pd.DataFrame, *, metric: str, path: str | Path, title: str,
                ylabel: str, subtitle: str = "", hue: str = "arm",
                hue_order: Sequence[str] | None = None, col: str | None = None,
                col_order: Sequence[str] | None = None, log_y: bool = False,
                band: bool = True, floor: float | None = None,
                floor_label: str = "copy first frame",
                ylim: tuple[float, float] | None = None) -> Path:
    """``metric`` per epoch, one line per ``hue`` value: the mean over its runs with a
    ± 1 sd band (``sns.lineplot(errorbar="sd")``); optional small multiples by ``col`` and a
    dashed horizontal ``floor``. Each line also gets its own marker and dashes, so curves
    that coincide (e.g. identical β schedules) stay visible. ``log_y`` takes effect only when
    the values span at least a decade (a log axis over a narrower range shows no labels)."""
    plt, sns = _pyplot()
    data = metrics[metrics["metric"] == metric]
    if data.empty:
        raise ValueError(f"no rows for metric {metric!r}")
    order = list(hue_order) if hue_order else sorted(data[hue].unique())
    order = [h for h in order if h in set(data[hue])]
    cols = list(col_order) if col_order else (sorted(data[col].unique()) if col else [None])
    fig, axes = plt.subplots(1, len(cols), figsize=(8 + 3.6 * (len(cols) - 1), 4.6),
                             sharey=True, squeeze=False, layout="constrained")
    epochs = np.sort(data["epoch"].unique())
    values = data["value"].to_numpy()
    log_y = bool(log_y and (values > 0).all() and values.max() >= 10 * values.min())
    ylabel = f"{ylabel} (log scale)" if log_y else ylabel
    for ax, value in zip(axes[0], cols, strict=True):
        part = data if value is None else data[data[col] == value]
        sns.lineplot(data=part, x="epoch", y="value", hue=hue, hue_order=order, style=hue,
                     style_order=order, markers=True, dashes=True, markersize=6,
                     errorbar="sd" if band else None, ax=ax)
        if floor is not None:
            ax.axhline(floor, color="0.35", ls=(0, (4, 2)), lw=1.2,
                       label=f"{floor_label} ({floor:.2f} dB)")
        if value is not None:
            ax.set_title(f"{col} = {value}", fontsize=10)
        ax.set_xlabel("epoch (0-based, the MLflow step)")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        if ax is not axes[0][-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    _legend(fig, axes[0][-1], hue)
    return _finish(fig, Path(path), title, subtitle)


def psnr_per_frame(per_frame: pd.DataFrame, *, path: str | Path, title: str,
                   subtitle: str = "", hue: str = "arm",
                   hue_order: Sequence[str] | None = None) -> Path:
    """Validation PSNR per frame of each ``hue`` (mean ± 1 sd across its runs) and the
    copy-first-frame floor (dashed grey)."""
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
    sns.lineplot(data=shown, x="frame", y="value", hue=hue, hue_order=names, style=hue,
                 style_order=names, dashes=True, errorbar="sd", lw=1.2, ax=ax)
    floor_curve = floor.groupby("frame")["value"].mean()
    ax.plot(floor_curve.index, floor_curve.to_numpy(), color="0.35", ls=(0, (4, 2)), lw=1.1,
            label=f"copy first frame (mean {floor_curve.mean():.2f} dB)")
    ax.set_xlabel("frame (1-based; frame 1 is given)")
    ax.set_ylabel("PSNR (dB)")
    _legend(fig, ax, hue)
    return _finish(fig, Path(path), title, subtitle)


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
