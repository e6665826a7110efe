"""Per-run artifacts: PSNR per frame (CSV + plot), a prediction GIF, arrays for filmstrips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _uint8(frames: torch.Tensor) -> np.ndarray:
    """(L, 3, H, W) uint8 or [0, 1] floats -> (L, H, W, 3) uint8."""
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


def plot_psnr_per_frame(psnr: torch.Tensor, floor: torch.Tensor, path: Path, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = np.arange(2, psnr.shape[0] + 2)
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    ax.plot(frames, psnr.numpy(), lw=1.2, label=f"model (mean {float(psnr.mean()):.2f} dB)")
    ax.plot(frames, floor.numpy(), lw=1.0, color="grey", ls="--",
            label=f"copy first frame (mean {float(floor.mean()):.2f} dB)")
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"Validation PSNR per frame: {title}")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_prediction_gif(truth: torch.Tensor, prediction: torch.Tensor, labels: torch.Tensor,
                         path: Path, *, scale: int = 4, every: int = 2, fps: int = 20) -> Path:
    """Ground truth | prediction | pose, side by side, upscaled ``scale``x (nearest); every
    ``every``-th frame (a 630-frame rollout in 16 s at the defaults), ``fps`` frames a second."""
    from PIL import Image

    panels = np.concatenate([_uint8(truth), _uint8(prediction), _uint8(labels)], axis=2)
    panels = panels[::every].repeat(scale, axis=1).repeat(scale, axis=2)  # (L', sH, 3sW, 3)
    images = [Image.fromarray(frame) for frame in panels]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0,
                   optimize=False)
    return path


def write_prediction_arrays(truth: torch.Tensor, prediction: torch.Tensor, path: Path) -> Path:
    """Compressed uint8 arrays (L, H, W, 3): what the studies' filmstrips are drawn from."""
    np.savez_compressed(path, truth=_uint8(truth), prediction=_uint8(prediction))
    return path
