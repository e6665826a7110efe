"""Data for a run: the synthetic dance dataset (by profile) or a lab-layout folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cvae.data import DatasetError, ensure_synthetic, load_split, make_clips
from experiments.registry import synthetic_size
from experiments.spec import DataSpec


@dataclass
class Data:
    clips: torch.Tensor  # (N, T, 3, H, W) uint8
    clip_labels: torch.Tensor  # (N, T, 3, H, W) uint8
    val_frames: torch.Tensor  # (L, 3, H, W) uint8
    val_labels: torch.Tensor  # (L, 3, H, W) uint8
    root: Path


def dataset_root(spec: DataSpec, profile: str) -> Path:
    if spec.source == "synthetic":
        return ensure_synthetic(size=synthetic_size(profile), seed=spec.synthetic_seed,
                                height=spec.height, width=spec.width)
    root = Path(spec.source).expanduser()
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset folder {root} {problem} (expected the lab layout: "
                           "train/train_img, train/train_label, val/val_img, val/val_label)")
    return root


def load_data(spec: DataSpec, profile: str) -> Data:
    """Training clips and the validation sequence, checked before any run exists: at least
    one clip of ``data.clip_len`` (after ``data.partial``) and at least 2 validation frames
    (frame 1 is given, the others are predicted); else a one-line ``DatasetError``."""
    root = dataset_root(spec, profile)
    frames, labels = load_split(root, "train", height=spec.height, width=spec.width,
                                partial=spec.partial)
    if frames.shape[0] < spec.clip_len:
        kept = f" (data.partial={spec.partial} keeps them)" if spec.partial < 1 else ""
        raise DatasetError(f"{root}/train has {frames.shape[0]} frames{kept}: fewer than one "
                           f"clip of data.clip_len={spec.clip_len}")
    clips, clip_labels = make_clips(frames, labels, clip_len=spec.clip_len)
    val_frames, val_labels = load_split(root, "val", height=spec.height, width=spec.width)
    if val_frames.shape[0] < 2:
        raise DatasetError(f"{root}/val has {val_frames.shape[0]} frame: validation needs at "
                           "least 2 (frame 1 is given, the others are predicted)")
    return Data(clips, clip_labels, val_frames, val_labels, root)
