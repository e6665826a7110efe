"""Test-set generation and the course's submission CSV, on tiny sizes (the course's are
5 x 630 frames of 3x32x64; the full-size check is marked slow)."""

import csv

import numpy as np
import pytest
import torch

from cvae.metrics import PSNR_CAP_DB, course_score, to_uint8_frames
from cvae.model import VideoCVAE
from cvae.submission import (
    generate_sequence,
    read_submission_csv,
    score_submission,
    write_submission_csv,
)

SEQUENCES, LENGTH, H, W = 5, 40, 8, 16
VALUES = 3 * H * W


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def moving_squares(seed: int, length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy frames with a square moving right, its label the square on white: uint8 each.
    The noise keeps every frame different from frame 0 (copy-first PSNR stays finite)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(40, 90, (length, 3, H, W), generator=g, dtype=torch.uint8)
    labels = torch.full((length, 3, H, W), 255, dtype=torch.uint8)
    for t in range(length):
        x = (seed + t) % (W - 2)
        frames[t, :, 3:5, x : x + 2] = 250
        labels[t, 0, 3:5, x : x + 2] = 0
    return frames, labels


@pytest.fixture(scope="module")
def test_set():
    return [moving_squares(seed) for seed in range(SEQUENCES)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoCVAE(frame_dim=16, label_dim=8, latent_dim=4, decoder_dim=16)


@pytest.fixture(scope="module")
def predictions(model, test_set):
    return [generate_sequence(model, frames[0], labels) for frames, labels in test_set]


def _read_plain_csv(path):
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    return rows[0], np.array(rows[1:], dtype=np.int64)


def test_generate_sequence(model, test_set, predictions):
    frames, labels = test_set[0]
    sequence = predictions[0]
    assert sequence.shape == (LENGTH, 3, H, W) and sequence.dtype == torch.float32
    assert sequence.min() >= 0 and sequence.max() <= 1
    assert torch.equal(to_uint8_frames(sequence[0]), frames[0])  # frame 0 is the given frame
    assert torch.equal(generate_sequence(model, frames[0], labels), sequence)  # prior mean
    sampled = [generate_sequence(model, frames[0], labels, latent="prior_sample",
                                 generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    with pytest.raises(ValueError, match="latent"):
        generate_sequence(model, frames[0], labels, latent="posterior")


def test_csv_layout_ids_and_clipping(tmp_path):
    g = torch.Generator().manual_seed(1)
    # Values from -0.3 to 1.4: a quarter are out of range and must be clipped, not wrapped.
    sequences = [torch.rand((LENGTH, 3, H, W), generator=g) * 1.7 - 0.3 for _ in range(SEQUENCES)]
    path = write_submission_csv(sequences, tmp_path / "submission.csv")
    header, table = _read_plain_csv(path)
    assert header == ["id", *map(str, range(VALUES))]
    assert table.shape == (SEQUENCES * LENGTH, 1 + VALUES)
    assert np.array_equal(table[:, 0], np.arange(SEQUENCES * LENGTH))
    expected = np.clip(np.round(np.stack([s.numpy() for s in sequences]) * 255), 0, 255)
    assert np.array_equal(table[:, 1:], expected.reshape(SEQUENCES * LENGTH, VALUES))
    assert table[:, 1:].min() == 0 and table[:, 1:].max() == 255
    # Row k of sequence i is frame k flattened in C, H, W order.
    frame = table[LENGTH + 3, 1:].reshape(3, H, W)
    assert np.array_equal(frame, to_uint8_frames(sequences[1][3]).numpy())


def test_generated_submission_round_trip_and_score(tmp_path, test_set, predictions):
    path = write_submission_csv(predictions, tmp_path / "submission.csv")
    back = read_submission_csv(path, sequence_length=LENGTH, frame_shape=(3, H, W))
    assert len(back) == SEQUENCES
    for read, written in zip(back, predictions):
        assert read.dtype == torch.uint8 and torch.equal(read, to_uint8_frames(written))
    truths = [frames for frames, _ in test_set]
    direct = course_score([to_uint8_frames(p) for p in predictions], truths)
    assert score_submission(path, truths) == direct
    assert np.isfinite(direct)


def _numpy_copy_first_score(truths, frames):
    scores = []
    for truth in truths:
        x = truth.numpy().astype(np.float64)
        last = min(frames, x.shape[0] - 1)
        mse = ((x[1 : last + 1] - x[0:1]) ** 2).reshape(last, -1).mean(axis=1)
        scores.extend(10 * np.log10(255.0**2 / mse))
    return float(np.mean(scores))


def test_perfect_and_copy_first_submissions(tmp_path, test_set):
    truths = [frames for frames, _ in test_set]
    perfect = write_submission_csv(truths, tmp_path / "perfect.csv")
    # Every frame exact: the 100 dB cap per frame (the course's formula would give +inf).
    assert score_submission(perfect, truths) == pytest.approx(PSNR_CAP_DB)

    copies = [frames[0:1].expand_as(frames) for frames in truths]
    copy_path = write_submission_csv(copies, tmp_path / "copy.csv")
    for frames in (600, 20):  # 600 covers frames 1..39 here; 20 cuts at frame 20
        expected = _numpy_copy_first_score(truths, frames)
        assert score_submission(copy_path, truths, frames=frames) == pytest.approx(expected,
                                                                                   rel=1e-12)
    assert score_submission(copy_path, truths) < score_submission(perfect, truths)


def test_read_rejects_bad_files(tmp_path):
    header = "id," + ",".join(map(str, range(VALUES)))
    good_row = ",".join(["0"] * VALUES)
    cases = {
        "values": [header, f"0,{good_row}", "1," + ",".join(["300"] * VALUES)],
        "ids": [header, f"0,{good_row}", f"5,{good_row}"],
        "header": ["id,0,1", f"0,{good_row}"],
    }
    for name, lines in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError):
            read_submission_csv(path, sequence_length=1, frame_shape=(3, H, W))
    with pytest.raises(ValueError, match="shape"):
        write_submission_csv([torch.zeros(2, 3, H, W), torch.zeros(3, 3, H, W)],
                             tmp_path / "ragged.csv")


@pytest.mark.slow
def test_course_size_submission(tmp_path):
    sequences = [torch.rand(630, 3, 32, 64) for _ in range(5)]
    path = write_submission_csv(sequences, tmp_path / "submission.csv")
    with open(path) as file:
        header = file.readline().rstrip("\n").split(",")
    assert header == ["id", *map(str, range(6144))]
    back = read_submission_csv(path)
    assert len(back) == 5 and back[4].shape == (630, 3, 32, 64)
    assert torch.equal(back[4], to_uint8_frames(sequences[4]))
