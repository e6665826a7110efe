"""The figures say what they show: no figure of a metric that never changes, no band where the
runs agree, positive bands on log axes, a per-frame axis fitted to the models (not the floor's
spike), legends off the data, a labelled GIF of bounded size, single-titled tuning plots with
the copy-first floor. Pure drawing on small synthetic tables."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from matplotlib.collections import PolyCollection
from PIL import Image

from experiments import artifacts
from studies import plots, tuning
from studies import report as report_module
from studies.results import COLUMNS, FRAME_COLUMNS, StudyMeta, StudyResults

ARMS = ["kl_cyclical", "kl_constant"]


def _metrics(rows_of) -> pd.DataFrame:
    """The tidy table of 2 arms x 2 seeds x 4 epochs; ``rows_of(arm, seed, epoch)`` gives
    {metric: value}."""
    rows = [[f"{arm}-{seed}", "s", arm, arm, seed, epoch, metric, value]
            for arm in ARMS for seed in (0, 1) for epoch in range(4)
            for metric, value in rows_of(arm, seed, epoch).items()]
    return pd.DataFrame(rows, columns=COLUMNS)


def _study_metrics(arm: str, seed: int, epoch: int) -> dict[str, float]:
    return {"train/beta": 1.0 if arm == "kl_constant" else min(1.0, 0.1 + 0.3 * epoch),
            "train/tfr": 0.0,
            "train/loss": 10.0 ** (1 - epoch) * (1 + 0.3 * seed),
            "val/loss": 0.05 / (1 + epoch + seed),
            "val/psnr": 18 + epoch + 0.2 * seed + 0.1 * (arm == "kl_constant")}


def _bands(fig) -> list[PolyCollection]:
    return [c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]


def _no_overlap(fig) -> None:
    """Every legend of ``fig`` lies outside every axes' data area."""
    fig.canvas.draw()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends
    for legend in legends:
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), legend.get_texts()[0].get_text()


def test_a_metric_with_one_value_everywhere_gets_no_figure(tmp_path, capsys):
    results = StudyResults(StudyMeta("s", profile="smoke", arms=ARMS, groups=ARMS, seeds=[0, 1]),
                           runs=[], metrics=_metrics(_study_metrics),
                           per_frame=pd.DataFrame(columns=FRAME_COLUMNS))
    (tmp_path / "teacher_forcing.png").write_bytes(b"from an earlier report")
    files = report_module.write_figures(results, tmp_path, client=None)
    assert {p.name for p in files} == {"beta.png", "train_loss.png", "val_loss.png",
                                       "val_psnr.png"}
    assert not (tmp_path / "teacher_forcing.png").exists()
    assert "s: no teacher_forcing.png: train/tfr is 0 for every run at every epoch" \
        in capsys.readouterr().out
    # Flat per arm but different between arms still tells the design apart: drawn.
    per_arm = _metrics(lambda arm, seed, epoch: {"train/tfr": float(arm == "kl_constant")})
    assert plots.flat_note(per_arm, "train/tfr") is None


def test_no_band_where_the_runs_of_a_line_agree():
    metrics = _metrics(_study_metrics)
    beta = plots.draw_epoch_curve(metrics, plots.Curve("train/beta", "β", "β"))
    assert not _bands(beta)  # β is the same for every seed of an arm
    assert "no band: the runs of each arm have the same value at every epoch" \
        in beta._suptitle.get_text()
    psnr = plots.draw_epoch_curve(metrics, plots.Curve("val/psnr", "psnr", "dB"))
    assert len(_bands(psnr)) == len(ARMS)
    assert "band: ± 1 sd across 2 seeds" in psnr._suptitle.get_text()


def test_log_axis_bands_are_geometric_and_stay_positive():
    # At epoch 3 the seeds' losses are 0.01 and 10: the arithmetic mean - sd is below 0.
    metrics = _metrics(lambda arm, seed, epoch: {
        "train/loss": (0.01 if seed == 0 else 10.0) if epoch == 3 else 10.0 ** (1 - epoch)})
    fig = plots.draw_epoch_curve(metrics, plots.Curve("train/loss", "loss", "loss",
                                                           log_y=True))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert "line: geometric mean; band: ×/÷ 1 geometric sd (mean ± 1 sd of log10 values)" \
        in fig._suptitle.get_text()
    low, high = plots.geometric_sd_band(pd.Series([0.01, 10.0]))
    assert low == pytest.approx(10 ** (-0.5 - np.std([-2, 1], ddof=1)))
    for band in _bands(fig):
        y = band.get_paths()[0].vertices[:, 1]
        assert (y > 0).all()
        assert y.min() == pytest.approx(low) and y.max() == pytest.approx(high)
    line_y = ax.get_lines()[0].get_ydata()
    assert line_y[3] == pytest.approx(10 ** -0.5)  # geometric mean of 0.01 and 10


def _per_frame(model_db: float) -> pd.DataFrame:
    """2 arms x 2 seeds over frames 2..100; the floor spikes to 60.3 dB at frame 2 and sits
    near 19 dB after."""
    rows = []
    for arm in ARMS:
        for seed in (0, 1):
            for frame in range(2, 101):
                model = model_db + 0.3 * (arm == "kl_constant") + 0.1 * seed
                floor = 19 + 41 * np.exp(-(frame - 2) / 2) + np.sin(frame / 7)
                rows += [[f"{arm}-{seed}", "s", arm, arm, seed, 3, frame,
                          "val/psnr_per_frame", model],
                         [f"{arm}-{seed}", "s", arm, arm, seed, 3, frame,
                          "val/psnr_copy_first_per_frame", floor]]
    return pd.DataFrame(rows, columns=FRAME_COLUMNS)


def test_the_per_frame_axis_fits_the_arms_and_clips_the_floor_spike():
    fig = plots.draw_psnr_per_frame(_per_frame(21.0), title="per frame")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 21.4 < high < 22.5  # the arms' top (21.45) fits; the 60 dB spike does not
    assert 17.5 < low < 18.0  # the floor after its spike (down to 18.0 dB) stays in view
    floor_label = [t.get_text() for t in fig.legends[0].get_texts()][-1]
    assert floor_label.startswith("copy first frame (mean")
    assert "up to 60.3 dB at frame 2, off the axis" in floor_label
    _no_overlap(fig)


def test_a_model_below_the_floor_shows_both():
    low, high = artifacts.psnr_axis_limits(np.full(50, 9.5), np.full(50, 9.7),
                                           np.r_[45.0, np.full(49, 22.0)])
    assert low < 9.5 and 22.0 < high < 30


def test_epoch_figures_keep_their_legend_off_the_data():
    fig = plots.draw_epoch_curve(_metrics(_study_metrics),
                                 plots.Curve("val/psnr", "psnr", "dB", floor=17.5))
    _no_overlap(fig)


def test_a_runs_per_frame_plot_keeps_its_legend_off_the_curve():
    frames = torch.arange(2, 101, dtype=torch.float32)
    floor = 19 + 41 * torch.exp(-(frames - 2) / 2)
    fig = artifacts.psnr_figure(torch.full((99,), 21.0), floor, title="kl_cyclical seed 0")
    assert fig.axes[0].get_ylim()[1] < 30  # the spike is clipped
    _no_overlap(fig)


def _dance(frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic dance video and its pose labels, each (L, 3, 32, 64) uint8."""
    from cvae.data import synthetic

    rng = np.random.default_rng(1)
    motion = synthetic.sample_motion(rng, frames, height=32, width=64)
    look = synthetic.sample_appearance(rng, height=32, width=64)
    video = np.stack([np.asarray(synthetic.render_frame(motion, look, t)) for t in range(frames)])
    labels = np.stack([np.asarray(synthetic.render_label(motion, t)) for t in range(frames)])
    return (torch.from_numpy(video).permute(0, 3, 1, 2),
            torch.from_numpy(labels).permute(0, 3, 1, 2))


def test_the_prediction_gif_is_labelled_and_small(tmp_path):
    truth, labels = _dance(630)  # the validation rollout's length at every profile but smoke
    # Blurred and slightly noisy (sd 1 level), as a cpu-profile model's prediction: this
    # proxy's GIF is 0.91 MB, two real runs' were 0.81 and 0.87 MB.
    blurred = (truth.float() + truth.roll(1, 0).float() + truth.roll(2, 0).float()) / 3
    noise = torch.randn(blurred.shape, generator=torch.Generator().manual_seed(0))
    prediction = (blurred + noise).clamp(0, 255).round().to(torch.uint8)
    path = artifacts.write_prediction_gif(truth, prediction, labels, tmp_path / "prediction.gif")
    assert path.stat().st_size < 1_000_000
    gif = Image.open(path)
    assert gif.n_frames == 105  # every 6th frame
    assert gif.info["comment"] == b"ground truth | prediction | pose"
    first = np.asarray(gif.convert("RGB")).astype(int)  # (16 + 3*32, 3 * 3*64, 3)
    assert first.shape == (artifacts.GIF_LABEL_HEIGHT + 96, 576, 3)
    row = first[:artifacts.GIF_LABEL_HEIGHT]
    for panel in np.split(row, 3, axis=1):  # dark text over each of the three panels
        assert (panel.sum(axis=2) < 200).sum() > 20
    assert (row.sum(axis=2) > 700).mean() > 0.8  # on white
    below = first[artifacts.GIF_LABEL_HEIGHT:, :192]  # the ground truth, 3x upscaled
    error = np.abs(below[::3, ::3] - truth[0].permute(1, 2, 0).numpy())  # palette's rounding
    assert error.mean() < 4, error.mean()


def _objective(trial: optuna.Trial) -> float:
    trial.suggest_float("optim.lr", 1e-5, 1e-2, log=True)
    ratio = trial.suggest_float("kl.ratio", 0.1, 1.0)
    trial.report(8.5 + ratio, 0)
    trial.report(9.0 + ratio, 1)
    return 9.0 + ratio  # 9-10 dB: a smoke study, far below its floor


def _tuning_study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="t",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(_objective, n_trials=tuning.MIN_TRIALS_FOR_IMPORTANCE)
    return study


def test_tuning_plots_have_one_title_the_floor_and_legends_off_the_data(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    written, notes = tuning.write_plots(_tuning_study(), tmp_path, floor=22.1)
    assert [p.name for p in written] == ["optimization_history.png", "intermediate_values.png",
                                         "param_importances.png", "slice.png"] and not notes
    figures = dict(zip([p.name for p in written], kept, strict=True))
    for name, fig in figures.items():
        assert fig._suptitle.get_text().startswith("t: "), name
        for ax in fig.axes:
            assert all(ax.get_title(loc=loc) == "" for loc in ("left", "center", "right")), name
        plotted = [ax for ax in fig.axes if ax.get_ylabel() != "Trial"]  # not the colour bar
        floors = [line for ax in plotted for line in ax.get_lines()
                  if list(line.get_ydata()) == [22.1, 22.1]]
        if name == "param_importances.png":
            assert not floors and plotted[0].get_legend() is None
            continue
        assert len(floors) == len(plotted), name
        for ax in plotted:  # the floor is in view, far above the trials' 9-10 dB
            assert ax.get_ylim()[0] < 9.0 and ax.get_ylim()[1] > 22.1
        _no_overlap(fig)
    labels = [t.get_text() for t in figures["slice.png"].legends[0].get_texts()]
    assert labels == ["copy first frame (22.10 dB)"]


def test_tuning_plots_without_a_floor_draw_none(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    tuning.write_plots(_tuning_study(), tmp_path)
    for fig in kept:
        labels = [t.get_text() for ax in fig.axes if ax.get_legend()
                  for t in ax.get_legend().get_texts()]
        assert not any(label.startswith("copy first frame") for label in labels)
