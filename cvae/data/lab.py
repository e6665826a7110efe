"""Load the lab's folder layout as uint8 tensors, decoded once and cached.

Layout (the README's "The lab dataset"):

    ROOT/train/train_img/*.png   ROOT/train/train_label/*.png   (a label has its frame's name)
    ROOT/val/val_img/*.png       ROOT/val/val_label/*.png
    ROOT/test/test_img/{i}/      first frame of sequence i
    ROOT/test/test_label/{i}/    its pose labels
    ROOT/test/test_gt/{i}/       held-out frames (optional; the synthetic data writes them)

Frames stay uint8 until the model needs them (`to_float`): a quarter of the memory, and a whole
dataset fits on the GPU. PNG decoding happens once per folder state; the epoch loop never
touches PIL.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

CACHE_VERSION = 1  # bump when the decoded content or the payload format changes
IMAGE_NAME = re.compile(r"^(?:frame)?(\d+)\.png$", re.IGNORECASE)
DECODE_THREADS = 4


class DatasetError(ValueError):
    """The data folder does not have the lab layout, or holds too little to train on; the
    message is one line naming the path or the numbers."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# Listing and matching


def _require_dir(path: Path) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing folder")


def list_images(folder: Path) -> list[str]:
    """PNG file names in `folder`, sorted by the frame number in the name.

    Names are `N.png` or `frameN.png`; lexical order would put 10.png before 2.png.
    Hidden files (editor and OS debris) are ignored.
    """
    _require_dir(folder)
    numbered: dict[int, str] = {}
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.name.lower().endswith(".png"):
            continue
        match = IMAGE_NAME.match(entry.name)
        if match is None:
            raise DatasetError(f"{folder / entry.name}: file name is not N.png or frameN.png")
        number = int(match.group(1))
        if number in numbered:
            raise DatasetError(f"{folder / entry.name}: frame number {number} also used by "
                               f"{folder / numbered[number]}")
        numbered[number] = entry.name
    if not numbered:
        raise DatasetError(f"{folder}: no .png images")
    return [numbered[number] for number in sorted(numbered)]


def _match_names(reference_dir: Path, reference_names: list[str], other_dir: Path,
                 other_names: list[str], *, reference: str = "frame", other: str = "label") -> None:
    """Every file in `reference_dir` needs the file of the same name in `other_dir` (frames and
    labels pair by identical name), and `other_dir` holds nothing more."""
    if reference_names == other_names:
        return
    other_set, reference_set = set(other_names), set(reference_names)
    missing = next((other_dir / n for n in reference_names if n not in other_set), None)
    extra = next((other_dir / n for n in other_names if n not in reference_set), None)
    first = f"no such file {missing}" if missing is not None else f"unexpected {extra}"
    if len(reference_names) != len(other_names):
        problem = (f"{len(other_names)} {other}s for {len(reference_names)} {reference}s "
                   f"in {reference_dir}")
    else:
        problem = f"{other} file names differ from those in {reference_dir}"
    raise DatasetError(f"{other_dir}: {problem}; first differing file: {first}")


# ---------------------------------------------------------------------------------------------
# Decoding


def _decode(path: Path, height: int, width: int,
            expected: tuple[Path, tuple[int, int]] | None = None) -> np.ndarray:
    """One image as (H, W, 3) uint8, resized like torchvision's Resize on a PIL image
    (PIL bilinear, which antialiases when shrinking). `expected` is (first image, its size):
    a lab folder never mixes frame sizes, so an odd one is a foreign file, not data."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            size = rgb.size
        if expected is None or size == expected[1]:
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(rgb)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: unreadable image ({_one_line(error)})") from error
    (w, h), (first_w, first_h) = size, expected[1]
    raise DatasetError(f"{path}: {w}x{h} pixels, but {expected[0].name} in the same folder is "
                       f"{first_w}x{first_h}; a folder's images share one size")


def decode_images(paths: Sequence[Path], *, height: int, width: int) -> torch.Tensor:
    """Decode and resize PNGs into one (N, 3, H, W) uint8 tensor.

    A few threads suffice: PIL releases the GIL while it inflates and resizes.
    """
    out = np.empty((len(paths), height, width, 3), dtype=np.uint8)  # (N, H, W, 3)
    expected = None
    if paths:
        try:
            with Image.open(paths[0]) as first:
                expected = (paths[0], first.size)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DatasetError(f"{paths[0]}: unreadable image ({_one_line(error)})") from error

    def fill(start: int) -> None:
        for index in range(start, min(start + 256, len(paths))):
            out[index] = _decode(paths[index], height, width, expected)

    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(0, len(paths), 256)))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


def to_float(x: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images in 0..255 -> floats in [0, 1], the lab's input range (no normalization)."""
    return x.to(dtype) / 255


# ---------------------------------------------------------------------------------------------
# Cache


def _user_cache_dir() -> Path:
    return Path.home() / ".cache" / "cvae-ablate" / "decoded"


def _fingerprint(files: Sequence[Path], root: Path, *, height: int, width: int) -> str:
    """Hash of every input file's relative name, size and mtime: any change invalidates."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {height}x{width}\n".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _cached(name: str, folders: Sequence[Path]) -> dict | None:
    """The first readable cache file; a truncated one (a crash mid-write elsewhere) is a miss
    and gets rewritten."""
    for folder in folders:
        path = folder / name
        if not path.is_file():
            continue
        try:
            return torch.load(path, weights_only=True)
        # torch.load fails on garbage with whatever its unpickler trips on (IndexError, ...)
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"{path}: unreadable cache file, decoding again ({_one_line(error)})",
                          stacklevel=4)
    return None


def _store(name: str, payload: dict, folders: Sequence[Path], *, prune: bool) -> None:
    """Atomic write to the first writable folder; with `prune`, delete stale versions of the
    same split and size (they would otherwise pile up, hundreds of MB each at full size)."""
    for folder in folders:
        if not _writable(folder):
            continue
        temporary = folder / f".{name}.{os.getpid()}.tmp"
        try:
            torch.save(payload, temporary)
            os.replace(temporary, folder / name)
        except OSError:
            temporary.unlink(missing_ok=True)
            continue
        if prune:
            stem = name.rsplit("-", 1)[0]
            for stale in folder.glob(f"{stem}-*.pt"):
                if stale.name != name:
                    stale.unlink(missing_ok=True)
        return
    warnings.warn(f"no writable cache folder among {[str(f) for f in folders]}; "
                  "images will be decoded again next time", stacklevel=3)


def _cache_folders(root: Path, cache_dir: str | os.PathLike | None) -> tuple[list[Path], bool]:
    """Candidate folders and whether pruning is safe (only the dataset's own cache folder,
    never one that other datasets may share)."""
    if cache_dir is not None:
        return [Path(cache_dir)], False
    return [root / ".cache", _user_cache_dir()], True


def _load_cached(root: Path, key: str, files: Sequence[Path], decode: Callable[[], dict], *,
                 height: int, width: int, cache_dir: str | os.PathLike | None) -> dict:
    """The decoded payload for `files`, from the cache when their fingerprint matches."""
    name = f"{key}-{height}x{width}-{_fingerprint(files, root, height=height, width=width)}.pt"
    folders, prune = _cache_folders(root, cache_dir)
    payload = _cached(name, folders)
    if payload is None:
        payload = decode()
        _store(name, payload, folders, prune=prune)
    return payload


# ---------------------------------------------------------------------------------------------
# Public loaders


def load_split(root: str | os.PathLike, split: Literal["train", "val"], *, height: int = 32,
               width: int = 64, partial: float = 1.0,
               cache_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames and pose labels of a split, sorted by frame number.

    Returns (frames, labels), each (N, 3, H, W) uint8. `partial` keeps the leading fraction of
    the frames, as the lab's fast-train option does. The whole split is cached; `partial` is
    applied after, so changing it never re-decodes.
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; valid splits: train, val")
    if not 0.0 < partial <= 1.0:
        raise ValueError(f"partial must be in (0, 1], got {partial}")
    root = Path(root)
    _require_dir(root)
    _require_dir(root / split)
    image_dir, label_dir = root / split / f"{split}_img", root / split / f"{split}_label"
    names = list_images(image_dir)
    _match_names(image_dir, names, label_dir, list_images(label_dir))
    image_paths = [image_dir / n for n in names]
    label_paths = [label_dir / n for n in names]

    def decode() -> dict:
        return {"frames": decode_images(image_paths, height=height, width=width),
                "labels": decode_images(label_paths, height=height, width=width)}

    payload = _load_cached(root, split, image_paths + label_paths, decode, height=height,
                           width=width, cache_dir=cache_dir)
    keep = int(len(names) * partial)
    if keep == 0:
        raise DatasetError(f"partial={partial} keeps none of the {len(names)} frames in "
                           f"{image_dir}")
    return payload["frames"][:keep], payload["labels"][:keep]  # (N, 3, H, W) uint8 each


def make_clips(frames: torch.Tensor, labels: torch.Tensor, *,
               clip_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive non-overlapping clips over the sorted frames, the lab's training unit.

    (N, 3, H, W) -> (N // clip_len, clip_len, 3, H, W); the remainder is dropped
    (23,410 // 16 = 1,463 clips). Views, no copy.
    """
    if frames.shape != labels.shape:
        raise ValueError(f"frames {tuple(frames.shape)} and labels {tuple(labels.shape)} differ")
    count = frames.shape[0] // clip_len
    if count == 0:
        raise DatasetError(f"{frames.shape[0]} frames make no clip of {clip_len}")
    shape = (count, clip_len, *frames.shape[1:])
    keep = count * clip_len
    return frames[:keep].reshape(shape), labels[:keep].reshape(shape)


def check_batch_size(clips: int, batch_size: int) -> None:
    """A batch larger than the training set is rejected, not clamped: every step would
    silently train on all ``clips`` at once, another run than the one asked for."""
    if batch_size > clips:
        raise DatasetError(f"batch size {batch_size} is larger than the {clips} training clips; "
                           f"choose at most {clips}")


@dataclass
class TestSequence:
    """One test sequence: the given first frame, the poses to follow, and, for synthetic
    data only, the frames a perfect model would produce."""

    __test__ = False  # not a pytest test class despite its name

    first_frame: torch.Tensor  # (3, H, W) uint8
    labels: torch.Tensor  # (L, 3, H, W) uint8
    ground_truth: torch.Tensor | None  # (L, 3, H, W) uint8, or None for the lab's data


def _sequence_folders(label_root: Path) -> list[Path]:
    """Numbered subfolders of test_label, in numeric order (the template globbed a folder that
    does not exist and so found no sequences)."""
    _require_dir(label_root)
    folders = [p for p in label_root.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name)]
    if not folders:
        raise DatasetError(f"{label_root}: no numbered sequence folders (0/, 1/, ...)")
    return sorted(folders, key=lambda p: int(p.name))


def load_test(root: str | os.PathLike, *, height: int = 32, width: int = 64,
              cache_dir: str | os.PathLike | None = None) -> list[TestSequence]:
    """The test sequences: first frame (the first image of test_img/{i}), labels, and the
    ground truth from test_gt/{i} when that folder exists."""
    root = Path(root)
    _require_dir(root)
    test = root / "test"
    _require_dir(test)
    plans = []  # (first frame path, label paths, ground-truth paths or None)
    for label_dir in _sequence_folders(test / "test_label"):
        image_dir = test / "test_img" / label_dir.name
        first = image_dir / list_images(image_dir)[0]
        names = list_images(label_dir)
        truth_dir = test / "test_gt" / label_dir.name
        truth = None
        if truth_dir.is_dir():
            _match_names(label_dir, names, truth_dir, list_images(truth_dir),
                         reference="label", other="ground-truth frame")
            truth = [truth_dir / n for n in names]
        plans.append((first, [label_dir / n for n in names], truth))
    files = [p for first, labels, truth in plans for p in [first, *labels, *(truth or [])]]

    def decode() -> dict:
        sequences = []
        for first, labels, truth in plans:
            sequences.append({
                "first_frame": decode_images([first], height=height, width=width)[0],
                "labels": decode_images(labels, height=height, width=width),
                "ground_truth": None if truth is None else decode_images(truth, height=height,
                                                                         width=width)})
        return {"sequences": sequences}

    payload = _load_cached(root, "test", files, decode, height=height, width=width,
                           cache_dir=cache_dir)
    return [TestSequence(**sequence) for sequence in payload["sequences"]]
