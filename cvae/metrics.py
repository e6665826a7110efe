"""PSNR, per frame and as the course scores it.

The template's PSNR averages the MSE over the whole batch before the log, which is wrong for
batch > 1; ``psnr_per_frame`` takes the MSE per frame.

One convention everywhere (val/psnr, the copy-first floor, the per-frame CSV, the course
score): PSNR is capped at ``PSNR_CAP_DB`` = 100 dB, i.e. the MSE is floored at 1e-10 of
range^2 (1e-10 for frames in [0, 1]), as several video-prediction codebases do. A frame
predicted exactly (a dancer holding still makes the copy-first floor exact) would otherwise
score +inf and make every mean over a sequence infinite.
"""

from __future__ import annotations

import torch

PSNR_CAP_DB = 100.0
MSE_FLOOR = 10.0 ** (-PSNR_CAP_DB / 10.0)  # relative to range^2: 1e-10


def psnr_per_frame(
    prediction: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0
) -> torch.Tensor:
    """PSNR = 10 log10(range^2 / max(MSE, 1e-10 range^2)) for each frame: (B, C, H, W) -> (B,).

    Capped at ``PSNR_CAP_DB`` (100 dB): a perfect frame (MSE 0) gives 100, not +inf.
    """
    diff = prediction.double() - target.double()
    mse = diff.pow(2).flatten(1).mean(dim=1).clamp_min(MSE_FLOOR * data_range**2)
    return 10.0 * torch.log10(data_range**2 / mse)


def mean_psnr(prediction: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0) -> float:
    return float(psnr_per_frame(prediction, target, data_range=data_range).mean())


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> round(x * 255) clipped to 0..255 (the template forgets the clip)."""
    return (frames * 255.0).round().clamp(0, 255).to(torch.uint8)


def course_score(
    predictions: list[torch.Tensor], ground_truths: list[torch.Tensor], *, frames: int = 600
) -> float:
    """The course's score: mean over sequences and frames 1..``frames`` of per-frame PSNR.

    Inputs are uint8 (or 0..255 integer-valued) sequences (L, C, H, W); frame 0 is the given
    first frame and is excluded. data_range = 255. A frame equal to its ground truth counts
    100 dB (``PSNR_CAP_DB``); the course's own formula gives it +inf.
    """
    scores = []
    for prediction, truth in zip(predictions, ground_truths, strict=True):
        last = min(frames, prediction.shape[0] - 1)
        scores.append(
            psnr_per_frame(prediction[1 : last + 1], truth[1 : last + 1], data_range=255.0)
        )
    return float(torch.cat(scores).mean())
