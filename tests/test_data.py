"""The data layer: the lab-layout loader, its cache and errors, and the synthetic generator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvae.data import (
    SIZES,
    DatasetError,
    check_batch_size,
    ensure_synthetic,
    generate,
    lab,
    load_split,
    load_test,
    make_clips,
    synthetic,
    to_float,
)

H, W = 4, 8  # tiny hand-written trees are loaded at their own size: no resize blur


def write_png(path: Path, value: int, *, size: tuple[int, int] = (W, H)) -> None:
    """A flat image whose red channel encodes `value`, so order and pairing can be checked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)


def write_split(root: Path, split: str, names: list[str], *, label_offset: int = 100) -> None:
    for name in names:
        number = int("".join(c for c in name if c.isdigit()))
        write_png(root / split / f"{split}_img" / name, number)
        write_png(root / split / f"{split}_label" / name, number + label_offset)


def red(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].tolist()  # (N, 3, H, W) -> red value of the corner pixel


def load(root: Path, split: str = "train", **options) -> tuple[torch.Tensor, torch.Tensor]:
    return load_split(root, split, height=H, width=W, **options)


# ---------------------------------------------------------------------------------------------
# Loader


@pytest.mark.parametrize("pattern", ["{}.png", "frame{:06d}.png", "frame{}.png"])
def test_frames_sort_numerically_and_labels_pair_by_name(tmp_path: Path, pattern: str) -> None:
    names = [pattern.format(n) for n in (10, 2, 1, 33)]
    write_split(tmp_path, "train", names)
    frames, labels = load(tmp_path)
    assert frames.dtype == torch.uint8 and frames.shape == (4, 3, H, W)
    assert red(frames) == [1, 2, 10, 33]
    assert red(labels) == [101, 102, 110, 133]


def test_frames_are_resized_like_pil_bilinear(tmp_path: Path) -> None:
    source = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    for folder in ("train_img", "train_label"):
        (tmp_path / "train" / folder).mkdir(parents=True)
        Image.fromarray(source).save(tmp_path / "train" / folder / "0.png")
    frames, _ = load_split(tmp_path, "train", height=32, width=64, cache_dir=tmp_path / "c")
    expected = np.array(Image.fromarray(source).resize((64, 32), Image.Resampling.BILINEAR))
    assert torch.equal(frames[0], torch.from_numpy(expected).permute(2, 0, 1))


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message


def test_missing_folder_is_named(tmp_path: Path) -> None:
    write_split(tmp_path, "train", ["1.png"])
    (tmp_path / "train" / "train_label" / "1.png").unlink()
    (tmp_path / "train" / "train_label").rmdir()
    with pytest.raises(DatasetError) as error:
        load(tmp_path)
    assert_one_line_naming(error, tmp_path / "train" / "train_label")
    assert "missing folder" in str(error.value)
    with pytest.raises(DatasetError) as error:
        load(tmp_path / "nowhere")
    assert_one_line_naming(error, tmp_path / "nowhere")


def test_count_mismatch_names_first_unmatched_file(tmp_path: Path) -> None:
    write_split(tmp_path, "train", ["1.png", "2.png", "3.png"])
    (tmp_path / "train" / "train_label" / "2.png").unlink()
    with pytest.raises(DatasetError) as error:
        load(tmp_path)
    assert_one_line_naming(error, tmp_path / "train" / "train_label" / "2.png")
    assert "2 labels for 3 frames" in str(error.value)


def test_name_mismatch_names_first_differing_file(tmp_path: Path) -> None:
    write_split(tmp_path, "train", ["1.png", "2.png"])
    label_dir = tmp_path / "train" / "train_label"
    (label_dir / "2.png").rename(label_dir / "frame000002.png")
    with pytest.raises(DatasetError) as error:
        load(tmp_path)
    assert_one_line_naming(error, label_dir / "2.png")
    assert "names differ" in str(error.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png_is_named(tmp_path: Path, damage: str) -> None:
    write_split(tmp_path, "train", ["1.png", "2.png"])
    bad = tmp_path / "train" / "train_img" / "2.png"
    write_png(bad, 9, size=(64, 32))
    data = bad.read_bytes()
    bad.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DatasetError) as error:
        load(tmp_path)
    assert_one_line_naming(error, bad)


def test_badly_named_png_is_named(tmp_path: Path) -> None:
    write_split(tmp_path, "train", ["1.png"])
    odd = tmp_path / "train" / "train_img" / "cover.png"
    write_png(odd, 0)
    with pytest.raises(DatasetError) as error:
        load(tmp_path)
    assert_one_line_naming(error, odd)


def test_cache_hit_skips_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_split(tmp_path, "train", ["1.png", "2.png"])
    first = load(tmp_path)
    assert len(list((tmp_path / ".cache").glob("train-4x8-*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(lab, "decode_images", no_decoding)
    second = load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cache_invalidates_when_a_file_changes(tmp_path: Path) -> None:
    write_split(tmp_path, "train", ["1.png", "2.png"])
    assert red(load(tmp_path)[0]) == [1, 2]
    changed = tmp_path / "train" / "train_img" / "2.png"
    write_png(changed, 77)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # beat mtime granularity
    assert red(load(tmp_path)[0]) == [1, 77]
    assert len(list((tmp_path / ".cache").glob("train-4x8-*.pt"))) == 1  # stale one pruned
    write_split(tmp_path, "train", ["3.png"])
    assert red(load(tmp_path)[0]) == [1, 77, 3]


def test_unreadable_cache_file_is_a_miss(tmp_path: Path) -> None:
    write_split(tmp_path, "train", ["1.png"])
    load(tmp_path)
    (cache,) = (tmp_path / ".cache").glob("train-*.pt")
    cache.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        assert red(load(tmp_path)[0]) == [1]
    assert red(load(tmp_path)[0]) == [1]  # rewritten


def test_cache_falls_back_to_user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_split(tmp_path / "data", "train", ["1.png"])
    user = tmp_path / "user"
    monkeypatch.setattr(lab, "_user_cache_dir", lambda: user)
    real_writable = lab._writable
    monkeypatch.setattr(lab, "_writable", lambda f: f.name != ".cache" and real_writable(f))
    assert red(load(tmp_path / "data")[0]) == [1]
    assert len(list(user.glob("train-*.pt"))) == 1


def test_partial_keeps_leading_fraction(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [f"{n}.png" for n in range(10)])
    frames, labels = load(tmp_path, partial=0.4)
    assert red(frames) == [0, 1, 2, 3] and red(labels) == [100, 101, 102, 103]
    with pytest.raises(ValueError):
        load(tmp_path, partial=0.0)
    with pytest.raises(ValueError):
        load(tmp_path, partial=1.5)
    with pytest.raises(DatasetError, match="partial=0.05 keeps none of the 10 frames"):
        load(tmp_path, partial=0.05)


def test_make_clips_are_consecutive_and_disjoint() -> None:
    frames = torch.arange(35, dtype=torch.uint8).view(35, 1, 1, 1).expand(35, 3, 2, 2)
    labels = frames + 100
    clips, clip_labels = make_clips(frames, labels, clip_len=16)
    assert clips.shape == clip_labels.shape == (2, 16, 3, 2, 2)
    assert clips.dtype == torch.uint8
    assert clips[:, :, 0, 0, 0].flatten().tolist() == list(range(32))  # in order, no overlap
    assert torch.equal(clip_labels, clips + 100)
    with pytest.raises(DatasetError, match="15 frames make no clip of 16"):
        make_clips(frames[:15], labels[:15], clip_len=16)


def test_a_batch_larger_than_the_clips_is_rejected_not_clamped() -> None:
    check_batch_size(10, 10)
    with pytest.raises(DatasetError, match="^batch size 11 is larger than the 10 training "
                                           "clips; choose at most 10$"):
        check_batch_size(10, 11)


def test_lab_clip_count() -> None:
    frames = torch.zeros(SIZES["full"].train_frames, 3, 1, 1, dtype=torch.uint8)
    assert make_clips(frames, frames)[0].shape[:2] == (1_463, 16)


def test_to_float_range() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([0.0, 0.2, 1.0]))
    assert to_float(x).dtype == torch.float32


def write_test_tree(root: Path, sequences: int, length: int, *, ground_truth: bool) -> None:
    for i in range(sequences):
        write_png(root / "test" / "test_img" / str(i) / "0.png", 10 * i)
        for t in range(length):
            write_png(root / "test" / "test_label" / str(i) / f"{t}.png", 10 * i + t + 1)
            if ground_truth:
                write_png(root / "test" / "test_gt" / str(i) / f"{t}.png", 10 * i + t)


@pytest.mark.parametrize("ground_truth", [True, False])
def test_load_test_counts_label_subfolders(tmp_path: Path, ground_truth: bool) -> None:
    write_test_tree(tmp_path, sequences=3, length=5, ground_truth=ground_truth)
    (tmp_path / "test" / "test_label" / "notes").mkdir()  # not a sequence
    sequences = load_test(tmp_path, height=H, width=W)
    assert len(sequences) == 3
    for i, sequence in enumerate(sequences):
        assert sequence.first_frame.shape == (3, H, W)
        assert red(sequence.labels) == [10 * i + t + 1 for t in range(5)]
        if ground_truth:
            assert red(sequence.ground_truth) == [10 * i + t for t in range(5)]
        else:
            assert sequence.ground_truth is None


def test_load_test_names_missing_first_frame_folder(tmp_path: Path) -> None:
    write_test_tree(tmp_path, sequences=2, length=2, ground_truth=False)
    missing = tmp_path / "test" / "test_img" / "1"
    (missing / "0.png").unlink()
    missing.rmdir()
    with pytest.raises(DatasetError) as error:
        load_test(tmp_path, height=H, width=W)
    assert_one_line_naming(error, missing)


# ---------------------------------------------------------------------------------------------
# Synthetic dataset


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "smoke", size="smoke", seed=0,
                    progress=False)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".cache" not in p.parts}


def test_synthetic_is_deterministic_from_seed(smoke: Path, tmp_path: Path) -> None:
    same = tree_bytes(generate(tmp_path / "same", size="smoke", seed=0, progress=False))
    other = tree_bytes(generate(tmp_path / "other", size="smoke", seed=1, progress=False))
    reference = tree_bytes(smoke)
    assert same == reference
    assert other.keys() == reference.keys()
    pngs = [name for name in reference if name.endswith(".png")]
    assert sum(other[n] != reference[n] for n in pngs) > 0.9 * len(pngs)


def test_synthetic_layout_loads_with_lab_counts(smoke: Path) -> None:
    spec = SIZES["smoke"]
    frames, labels = load_split(smoke, "train")
    assert frames.shape == labels.shape == (spec.train_frames, 3, 32, 64)
    val_frames, _ = load_split(smoke, "val")
    assert val_frames.shape[0] == spec.val_frames
    sequences = load_test(smoke)
    assert len(sequences) == spec.test_sequences
    for i, sequence in enumerate(sequences):
        assert len(os.listdir(smoke / "test" / "test_img" / str(i))) == 1
        assert sequence.labels.shape == sequence.ground_truth.shape == (spec.test_frames, 3, 32, 64)
        assert torch.equal(sequence.first_frame, sequence.ground_truth[0])
    assert (smoke / "COMPLETE").is_file()


def test_synthetic_backgrounds(smoke: Path) -> None:
    frames, labels = load_split(smoke, "train")
    corners = (slice(None), slice(None), [0, 0, -1, -1], [0, -1, 0, -1])
    assert (labels[corners] == 255).all()  # white label background
    frame_corners = frames[corners].float()
    assert 150 <= frame_corners.min() and frame_corners.max() <= 245  # light grey, not white
    grey = frames.float().mean(dim=1)  # (N, H, W)
    assert (grey[:, 0] - grey[:, -1]).mean() > 5  # wall above a darker floor
    assert (labels < 250).any(dim=1).float().mean() > 0.02  # a skeleton is drawn
    assert (labels < 250).any(dim=1).float().mean() < 0.25  # with thin lines


def test_synthetic_motion_is_smooth(smoke: Path) -> None:
    val, _ = load_split(smoke, "val")
    val = to_float(val)  # (T, 3, H, W)
    truth = torch.stack([to_float(s.ground_truth) for s in load_test(smoke)])  # (5, T, 3, H, W)
    consecutive = (val[1:] - val[:-1]).abs().mean()
    across_videos = (truth[:, : len(val)] - val).abs().mean()
    assert consecutive < 0.25 * across_videos


def test_training_videos_align_with_clips() -> None:
    rng = np.random.default_rng(0)
    full = SIZES["full"]
    lengths = synthetic.video_lengths(full.train_frames, full.train_video_frames, rng)
    assert sum(lengths) == full.train_frames and len(lengths) > 10
    assert all(length % 16 == 0 for length in lengths[:-1])
    assert all(500 <= length <= 1300 for length in lengths)


def test_ensure_synthetic_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVAE_DATA_DIR", str(tmp_path))
    root = ensure_synthetic(size="smoke", seed=3)
    assert root == tmp_path / "smoke-160f48v-s3-32x64" and (root / "COMPLETE").is_file()

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(synthetic, "generate", no_generation)
    assert ensure_synthetic(size="smoke", seed=3) == root
    with pytest.raises(ValueError, match="valid sizes"):
        ensure_synthetic(size="huge")  # type: ignore[arg-type]


def test_interrupted_generation_leaves_nothing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "render_video", crash)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "out", size="smoke", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--size", "smoke", "--seed", "2"]) == 0
    assert (out / "COMPLETE").is_file()
    assert synthetic.main(["--out", str(out), "--size", "smoke"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and str(out) in message
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(out), "--size", "huge"])
    assert exit_info.value.code == 2
