"""Losses and metrics against reference implementations (torch.distributions, plain loops)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from cvae.losses import kl_gaussians, kl_standard_normal, reconstruction_mse
from cvae.metrics import PSNR_CAP_DB, course_score, mean_psnr, psnr_per_frame, to_uint8_frames
from cvae.train import copy_first_floor
from experiments.artifacts import write_psnr_csv


def _gaussian(seed: int, shape=(3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(shape, generator=g, dtype=torch.float64)
    return mu, logvar


def test_kl_standard_normal_matches_torch_distributions():
    mu, logvar = _gaussian(0)
    batch = mu.shape[0]
    reference = kl_divergence(
        Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ).sum() / batch
    torch.testing.assert_close(kl_standard_normal(mu, logvar), reference, rtol=1e-12, atol=1e-10)


def test_kl_standard_normal_is_zero_at_the_prior():
    zeros = torch.zeros(2, 3, 4, 4)
    assert kl_standard_normal(zeros, zeros).item() == 0.0


def test_kl_gaussians_matches_torch_distributions():
    mu_q, logvar_q = _gaussian(1)
    mu_p, logvar_p = _gaussian(2)
    batch = mu_q.shape[0]
    reference = kl_divergence(
        Normal(mu_q, torch.exp(0.5 * logvar_q)), Normal(mu_p, torch.exp(0.5 * logvar_p))
    ).sum() / batch
    ours = kl_gaussians(mu_q, logvar_q, mu_p, logvar_p)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-10)
    # Not symmetric: KL(q||p) != KL(p||q), so swapped arguments must give another value.
    assert not torch.allclose(ours, kl_gaussians(mu_p, logvar_p, mu_q, logvar_q))


def test_kl_gaussians_reduces_to_standard_normal():
    mu, logvar = _gaussian(3)
    zeros = torch.zeros_like(mu)
    torch.testing.assert_close(kl_gaussians(mu, logvar, zeros, zeros),
                               kl_standard_normal(mu, logvar), rtol=1e-12, atol=1e-10)


def test_reconstruction_mse_is_mean_over_every_pixel():
    g = torch.Generator().manual_seed(4)
    prediction, target = torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)
    expected = ((prediction.double() - target.double()) ** 2).sum() / prediction.numel()
    assert reconstruction_mse(prediction, target).item() == pytest.approx(expected.item(), rel=1e-6)


def _template_psnr(prediction, target, data_range=1.0):
    """The course template's PSNR: one MSE over the whole batch (wrong for batch > 1)."""
    mse = F.mse_loss(prediction.double(), target.double())
    return 20 * math.log10(data_range) - 10 * torch.log10(mse)


def test_psnr_per_frame_takes_each_frame_independently():
    g = torch.Generator().manual_seed(5)
    target = torch.rand(4, 3, 8, 8, generator=g)
    noise_levels = torch.tensor([0.01, 0.05, 0.1, 0.3]).view(4, 1, 1, 1)  # frames differ
    prediction = target + noise_levels * torch.randn(target.shape, generator=g)
    ours = psnr_per_frame(prediction, target)
    assert ours.shape == (4,)
    loop = [10 * math.log10(1.0 / F.mse_loss(p.double(), t.double()).item())
            for p, t in zip(prediction, target)]
    np.testing.assert_allclose(ours.numpy(), loop, rtol=1e-12)
    # The batch must not leak across frames: each frame alone gives the same value.
    for index in range(4):
        alone = psnr_per_frame(prediction[index : index + 1], target[index : index + 1])
        assert alone.item() == pytest.approx(ours[index].item(), rel=1e-12)
    # The template's whole-batch MSE gives another (wrong) answer when frames differ...
    assert abs(mean_psnr(prediction, target) - _template_psnr(prediction, target).item()) > 1.0
    # ...and the same one when every frame has the same error.
    same = target + 0.1
    assert mean_psnr(same, target) == pytest.approx(_template_psnr(same, target).item(), rel=1e-9)


def test_psnr_data_range_and_perfect_frame():
    target = torch.zeros(2, 3, 4, 4)
    prediction = target.clone()
    prediction[0] += 0.5  # MSE 0.25 -> 10 log10(1 / 0.25)
    psnr = psnr_per_frame(prediction, target)
    assert psnr[0].item() == pytest.approx(10 * math.log10(4.0))
    assert psnr[1].item() == pytest.approx(PSNR_CAP_DB)  # capped, not +inf
    scaled = psnr_per_frame(prediction * 255, target * 255, data_range=255.0)
    assert scaled[0].item() == pytest.approx(psnr[0].item())
    assert scaled[1].item() == pytest.approx(PSNR_CAP_DB)  # the cap does not depend on range


def test_psnr_cap_is_100_db_an_mse_floor_of_1e_minus_10():
    target = torch.full((3, 3, 4, 4), 0.5, dtype=torch.float64)
    offsets = torch.tensor([1e-6, 1e-5, 1e-3], dtype=torch.float64).view(3, 1, 1, 1)
    psnr = psnr_per_frame(target + offsets, target)  # MSE 1e-12 (under the floor), 1e-10, 1e-6
    assert psnr.tolist() == pytest.approx([100.0, 100.0, 60.0])
    assert PSNR_CAP_DB == 100.0


def test_copy_first_floor_of_a_sequence_with_a_still_frame_is_finite(tmp_path):
    """Held-out real frames repeat frame 1 wherever the dancer holds still: that frame of
    the floor is the 100 dB cap, and the mean over the sequence stays finite."""
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    frames[3] = frames[0]  # frame 4 repeats frame 1 exactly
    floor = copy_first_floor(frames)  # frames 2..6
    assert floor.shape == (5,)
    assert torch.isfinite(floor).all()
    assert floor[2].item() == pytest.approx(PSNR_CAP_DB)
    assert floor[[0, 1, 3, 4]].max().item() < 20.0  # the other frames are far from frame 1
    assert math.isfinite(float(floor.mean()))
    assert mean_psnr(frames[0:1].expand(5, -1, -1, -1).double() / 255,
                     frames[1:].double() / 255) == pytest.approx(float(floor.mean()))
    # The per-frame CSV artifact carries the same finite values.
    csv = write_psnr_csv(floor, floor, tmp_path / "psnr_per_frame.csv")
    rows = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert np.isfinite(rows).all() and rows[2, 1] == pytest.approx(PSNR_CAP_DB)


def test_course_score_of_an_exact_frame_is_the_cap_not_infinity():
    truth = torch.randint(0, 256, (4, 3, 2, 4), generator=torch.Generator().manual_seed(1),
                          dtype=torch.uint8)
    prediction = truth.clone()
    prediction[1] = 255 - truth[1]  # frame 1 wrong, frames 2 and 3 exact
    wrong = psnr_per_frame(prediction[1:2], truth[1:2], data_range=255.0).item()
    score = course_score([prediction], [truth], frames=3)
    assert score == pytest.approx((wrong + 2 * PSNR_CAP_DB) / 3)


def test_to_uint8_frames_rounds_and_clips():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.49 / 255, 1.0, 1.7])
    assert to_uint8_frames(x).tolist() == [0, 0, 0, 1, 255, 255]


def _numpy_course_score(predictions, truths, frames):
    scores = []
    for prediction, truth in zip(predictions, truths):
        p = prediction.numpy().astype(np.float64)[1 : frames + 1].reshape(frames, -1)
        t = truth.numpy().astype(np.float64)[1 : frames + 1].reshape(frames, -1)
        scores.extend(10 * np.log10(255.0**2 / ((p - t) ** 2).mean(axis=1)))
    return float(np.mean(scores))


def test_course_score_uses_frames_1_to_600_with_range_255():
    length, frames = 610, 600
    g = torch.Generator().manual_seed(6)
    truths = [torch.randint(0, 256, (length, 3, 2, 4), generator=g, dtype=torch.uint8)
              for _ in range(2)]
    predictions = []
    for truth in truths:
        noise = torch.randint(-20, 21, truth.shape, generator=g)
        noise[:, 0, 0, 0] = 7  # no frame is perfect (a perfect one would score inf)
        predictions.append((truth.long() + noise).clamp(0, 255).to(torch.uint8))
    score = course_score(predictions, truths, frames=frames)
    assert score == pytest.approx(_numpy_course_score(predictions, truths, frames), rel=1e-12)

    def spoil(index):  # a frame as far from the truth as uint8 allows
        spoiled = [p.clone() for p in predictions]
        spoiled[0][index] = 255 - truths[0][index]
        return course_score(spoiled, truths, frames=frames)

    assert spoil(0) == score  # the given first frame is excluded
    assert spoil(601) == score and spoil(609) == score  # frames past 600 are excluded
    assert spoil(1) < score and spoil(600) < score  # frames 1 and 600 count


def test_course_score_on_uint8_does_not_wrap():
    truth = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    prediction = torch.zeros_like(truth)  # error 255 everywhere: PSNR 0 dB with range 255
    assert course_score([prediction], [truth]) == pytest.approx(0.0, abs=1e-12)
