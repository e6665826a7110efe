"""Per-run artifacts: PSNR per frame (CSV + plot), a prediction GIF, arrays for filmstrips."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch only where tensors are read: studies.plots imports the axis limits
    import torch


def _uint8(frames: torch.Tensor) -> np.ndarray:
    """(L, 3, H, W) uint8 or [0, 1] floats -> (L, H, W, 3) uint8."""
    import torch

    if frames.dtype != torch.uint8:
        frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


def write_psnr_csv(psnr: torch.Tensor, floor: torch.Tensor, path: Path) -> Path:
    """Columns frame (2..L, 1-based as the lab counts), psnr, psnr_copy_first."""
    frames = np.arange(2, psnr.shape[0] + 2)
    table = np.column_stack([frames, psnr.numpy(), floor.numpy()])
    np.savetxt(path, table, delimiter=",", header="frame,psnr,psnr_copy_first", comments="",
               fmt=["%d", "%.6f", "%.6f"])
    return path


def psnr_axis_limits(model_low: Any, model_high: Any, floor: Any, *,
                     pad: float = 0.08) -> tuple[float, float]:
    """y limits (dB) for PSNR per frame: the model curves' full range (``model_low`` to
    ``model_high``: e.g. mean ∓ sd) and the copy-first floor from the frame where it has
    fallen to its median on, with ``pad`` of the span either side. Over the first frames
    the floor spikes (the copied frame is still close to the truth there), tens of dB above
    the rest: fitted to the spike, the models' curves would collapse into one line."""
    low, high = float(np.nanmin(model_low)), float(np.nanmax(model_high))
    floor = np.asarray(floor, dtype=float)
    if floor.size:
        settled = floor[int(np.argmax(floor <= np.nanmedian(floor))):]
        low, high = min(low, float(settled.min())), max(high, float(settled.max()))
    margin = pad * (high - low) or 0.5
    return low - margin, high + margin


def floor_label(floor: Any, frames: Any, limits: tuple[float, float]) -> str:
    """'copy first frame (mean 19.39 dB)', and on a second line where its spike leaves the
    axis: 'up to 41.6 dB at frame 2, off the axis'."""
    floor, frames = np.asarray(floor, dtype=float), np.asarray(frames)
    label = f"copy first frame (mean {floor.mean():.2f} dB)"
    top = int(np.argmax(floor))
    if floor[top] > limits[1]:
        label += f"\nup to {floor[top]:.1f} dB at frame {frames[top]}, off the axis"
    return label


def psnr_figure(psnr: torch.Tensor, floor: torch.Tensor, *, title: str) -> Any:
    """The run's validation PSNR per frame and the copy-first floor, the legend below the
    axes (off the curves), the y axis fitted by ``psnr_axis_limits``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = np.arange(2, psnr.shape[0] + 2)
    model, copy = psnr.numpy(), floor.numpy()
    limits = psnr_axis_limits(model, model, copy)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110, layout="constrained")
    ax.plot(frames, model, lw=1.2, label=f"model (mean {float(model.mean()):.2f} dB)")
    ax.plot(frames, copy, lw=1.0, color="grey", ls="--", label=floor_label(copy, frames, limits))
    ax.set_ylim(*limits)
    ax.set_xlabel("frame (1-based; frame 1 is given)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"Validation PSNR per frame: {title}")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def plot_psnr_per_frame(psnr: torch.Tensor, floor: torch.Tensor, path: Path, *, title: str) -> Path:
    """``psnr_figure`` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = psnr_figure(psnr, floor, title=title)
    fig.savefig(path)
    plt.close(fig)
    return path


GIF_PANELS: tuple[str, ...] = ("ground truth", "prediction", "pose")
GIF_LABEL_HEIGHT = 16  # pixels: the row above the panels naming them


def _label_row(width: int, panel_width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: white, each of GIF_PANELS centred over its panel."""
    from PIL import Image, ImageDraw, ImageFont

    row = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(row)
    font = ImageFont.load_default(size=max(8, height - 5))
    for i, name in enumerate(GIF_PANELS):
        draw.text(((i + 0.5) * panel_width, height / 2), name, fill="black", font=font,
                  anchor="mm")
    return np.asarray(row)


def write_prediction_gif(truth: torch.Tensor, prediction: torch.Tensor, labels: torch.Tensor,
                         path: Path, *, scale: int = 3, max_frames: int = 120,
                         fps: int = 8) -> Path:
    """Ground truth | prediction | pose side by side under a row naming them, upscaled
    ``scale``x (nearest): every k-th frame, k = ceil(L / ``max_frames``), at ``fps`` frames
    a second (a 630-frame rollout: every 6th frame, 105 of them in 13 s at the defaults).
    One palette of 255 colours for the whole GIF, so colours do not flicker and unchanged
    pixels repeat exactly (fewer colours would blur the pose's limb colours). The size
    grows with the pixels the prediction's noise changes each frame: a cpu-profile run's GIF,
    0.8-0.9 MB as measured; 160 frames made it 1.2 MB."""
    from PIL import Image

    every = math.ceil(truth.shape[0] / max_frames)
    panels = np.concatenate([_uint8(truth), _uint8(prediction), _uint8(labels)], axis=2)
    panels = panels[::every].repeat(scale, axis=1).repeat(scale, axis=2)  # (L', sH, 3sW, 3)
    header = _label_row(panels.shape[2], panels.shape[2] // 3, GIF_LABEL_HEIGHT)
    frames = np.concatenate([np.broadcast_to(header, (len(panels), *header.shape)), panels],
                            axis=1)  # (L', label row + sH, 3sW, 3)
    # The palette from a sample of frames stacked into one image; every frame mapped onto it.
    sample = Image.fromarray(np.concatenate(frames[:: max(1, len(frames) // 16)], axis=0))
    palette = sample.quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    images = [Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE)
              for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0,
                   optimize=False, comment=" | ".join(GIF_PANELS))
    return path


def write_prediction_arrays(truth: torch.Tensor, prediction: torch.Tensor, path: Path) -> Path:
    """Compressed uint8 arrays (L, H, W, 3): what the studies' filmstrips are drawn from."""
    np.savez_compressed(path, truth=_uint8(truth), prediction=_uint8(prediction))
    return path
