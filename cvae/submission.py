"""Test-set generation and the course's submission CSV.

The course's test set is 5 sequences, each a first frame plus 630 pose labels; a submission
holds 630 frames per sequence (frame 0 is the given first frame), one frame per row:

    id,0,1,...,6143
    0,v_0,v_1,...,v_6143        v = round(x * 255) clipped to 0..255, flattened in C, H, W order

with ``id`` the running row index over all sequences (0..3149). The course template forgets the
clip, so out-of-range outputs of an unbounded generator wrap or cost score; we clip.
Scoring (``score_submission``) is the course's: per-frame PSNR on the integers with
data_range 255 over frames 1..600 of every sequence, averaged (``cvae.metrics.course_score``),
with the project's 100 dB cap for an exact frame (the course's formula gives it +inf).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cvae.metrics import course_score, to_uint8_frames
from cvae.model import VideoCVAE
from cvae.train import LatentSource, generate

COURSE_SEQUENCES = 5
COURSE_FRAMES = 630
COURSE_FRAME_SHAPE = (3, 32, 64)  # (C, H, W): 6144 values per row


def generate_sequence(
    model: VideoCVAE,
    first_frame: torch.Tensor,
    labels: torch.Tensor,
    *,
    latent: LatentSource = "prior_mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One test sequence: (L, 3, H, W) floats in [0, 1] on the CPU.

    first_frame (3, H, W) and labels (L, 3, H, W), uint8 or [0, 1] floats. Frame 0 is the given
    frame; frames 1..L-1 come from ``cvae.train.generate`` (the same rollout as validation).
    ``prior_mean`` (z = 0 for the lab prior) is deterministic and is what students found to
    score best. The returned frames are clamped to [0, 1], a no-op with the sigmoid output;
    the rollout itself feeds the model its unclamped output, as in training.
    """
    sequence = generate(model, first_frame, labels, latent=latent, samples=1,
                        generator=generator)[0]  # (L, 3, H, W)
    return sequence.clamp(0.0, 1.0).float().cpu()


# ---------------------------------------------------------------------------------------------
# CSV writing: vectorized over uint8 pixels (3150 x 6144 values would take seconds per-pixel)
# ---------------------------------------------------------------------------------------------
def _digit_table() -> tuple[np.ndarray, np.ndarray]:
    """For v in 0..255: the ASCII bytes of ``f"{v},"`` padded to 4 bytes, and their width."""
    text = np.zeros((256, 4), dtype=np.uint8)
    width = np.zeros(256, dtype=np.uint8)
    for value in range(256):
        encoded = f"{value},".encode()
        text[value, : len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        width[value] = len(encoded)
    return text, width


_TEXT, _WIDTH = _digit_table()


def _format_rows(pixels: np.ndarray) -> list[bytes]:
    """(R, D) uint8 -> R lines ``v_0,...,v_{D-1}\\n`` without a per-pixel Python loop."""
    rows = pixels.shape[0]
    chars = _TEXT[pixels]  # (R, D, 4) ASCII, each value padded to 4 bytes
    width = _WIDTH[pixels]  # (R, D)
    chars[np.arange(rows), -1, width[:, -1] - 1] = ord("\n")  # last value ends the line
    keep = np.arange(4, dtype=np.uint8) < width[..., None]  # (R, D, 4): drop the padding
    body = chars[keep].tobytes()
    ends = np.cumsum(width.sum(axis=1, dtype=np.int64))
    starts = np.concatenate([[0], ends[:-1]])
    return [body[start:end] for start, end in zip(starts.tolist(), ends.tolist())]


def _as_uint8(sequence: torch.Tensor) -> torch.Tensor:
    """Float frames in [0, 1] -> round(x * 255) clipped; uint8 passes through."""
    if sequence.dtype == torch.uint8:
        return sequence
    if sequence.is_floating_point():
        return to_uint8_frames(sequence.detach().cpu())
    raise TypeError(f"frames must be uint8 or float in [0, 1], got {sequence.dtype}")


def write_submission_csv(sequences: Sequence[torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the course's submission CSV: one row per frame, all sequences in order.

    sequences: (L, C, H, W) each, all the same shape; floats in [0, 1] (rounded from x * 255
    and clipped to 0..255) or uint8. The course expects 5 sequences of 630 frames of
    3x32x64 (3150 rows, columns id,0..6143); other sizes are written as given.
    """
    if not sequences:
        raise ValueError("no sequences to write")
    shape = tuple(sequences[0].shape)
    if len(shape) != 4:
        raise ValueError(f"each sequence must be (L, C, H, W), got {shape}")
    for index, sequence in enumerate(sequences):
        if tuple(sequence.shape) != shape:
            raise ValueError(
                f"sequence {index} has shape {tuple(sequence.shape)}, expected {shape}"
            )
    values_per_row = shape[1] * shape[2] * shape[3]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row_id = 0
    with open(path, "wb") as file:
        file.write(("id," + ",".join(map(str, range(values_per_row))) + "\n").encode())
        for sequence in sequences:
            pixels = _as_uint8(sequence).cpu().reshape(shape[0], values_per_row).numpy()
            for line in _format_rows(pixels):
                file.write(b"%d," % row_id)
                file.write(line)
                row_id += 1
    return path


def read_submission_csv(
    path: str | os.PathLike,
    *,
    sequence_length: int = COURSE_FRAMES,
    frame_shape: tuple[int, int, int] = COURSE_FRAME_SHAPE,
) -> list[torch.Tensor]:
    """Read a submission back as uint8 sequences (sequence_length, C, H, W).

    Checks the header, that the ids run 0..rows-1 and that every value is an integer in
    0..255 (an unclipped template submission fails here rather than wrapping around).
    """
    values_per_row = int(np.prod(frame_shape))
    with open(path) as file:
        header = file.readline().strip()
    expected = "id," + ",".join(map(str, range(values_per_row)))
    if header != expected:
        raise ValueError(
            f"{path}: header has {header.count(',')} value columns, expected 'id,0..'"
            f"{values_per_row - 1}' for frames of shape {frame_shape}"
        )
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    rows = table.shape[0]
    if not np.array_equal(table[:, 0], np.arange(rows)):
        raise ValueError(f"{path}: ids must run 0..{rows - 1} in order")
    if rows % sequence_length:
        raise ValueError(
            f"{path}: {rows} rows is not a multiple of sequence_length={sequence_length}"
        )
    pixels = table[:, 1:]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(
            f"{path}: values in {pixels.min()}..{pixels.max()}, outside 0..255 (unclipped?)"
        )
    frames = torch.from_numpy(pixels.astype(np.uint8)).reshape(rows, *frame_shape)
    return list(frames.split(sequence_length))


def score_submission(
    csv_path: str | os.PathLike, ground_truths: Sequence[torch.Tensor], *, frames: int = 600
) -> float:
    """The course's score of a submission file against ground-truth sequences.

    ground_truths: (L, C, H, W) each, uint8 or floats in [0, 1]; their length and frame shape
    say how to read the file. Mean per-frame PSNR (data_range 255) over frames 1..``frames``.
    """
    truths = [_as_uint8(truth).cpu() for truth in ground_truths]
    length, *frame_shape = truths[0].shape
    predictions = read_submission_csv(csv_path, sequence_length=length,
                                      frame_shape=tuple(frame_shape))
    if len(predictions) != len(truths):
        raise ValueError(
            f"{csv_path}: {len(predictions)} sequences, but {len(truths)} ground truths"
        )
    return course_score(predictions, truths, frames=frames)
