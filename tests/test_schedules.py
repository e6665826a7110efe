"""Schedules (beta, teacher forcing, learning rate) as pure functions of the step."""

import math
from itertools import pairwise

import pytest
import torch

from cvae.schedules import (
    ConstantKL,
    CyclicalKL,
    MonotonicKL,
    TeacherForcing,
    cyclical_beta,
    kl_beta,
    teacher_forcing_ratio,
)
from cvae.train import lr_factor

REPORT_PERIOD = [0.1, 0.325, 0.55, 0.775, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_cyclical_with_the_reports_numbers():
    schedule = CyclicalKL(cycles=40, ratio=0.5, start=0.1, stop=1.0)
    betas = [schedule.beta(epoch, 400) for epoch in range(400)]
    for period in range(40):
        assert betas[10 * period : 10 * (period + 1)] == pytest.approx(REPORT_PERIOD, abs=1e-12)


def test_monotonic_is_one_cycle():
    schedule = MonotonicKL(ratio=0.5, start=0.1, stop=1.0)
    betas = [schedule.beta(epoch, 400) for epoch in range(400)]
    assert betas == [cyclical_beta(e, total_steps=400, cycles=1, ratio=0.5, start=0.1, stop=1.0)
                     for e in range(400)]
    # The ramp has int(400 * 0.5) = 200 points from 0.1 to 1.0 inclusive, then holds 1.0.
    assert betas[0] == pytest.approx(0.1)
    assert betas[100] == pytest.approx(0.1 + 0.9 * 100 / 199)
    assert betas[199:] == pytest.approx([1.0] * 201)
    assert all(a < b for a, b in pairwise(betas[:200]))


def _lab_cyclical(n, *, cycles, ratio, start, stop):
    """LAB_REFERENCE's schedule as an array: all ``stop``, then in each of ``cycles`` periods
    of n // cycles steps a linspace of int(period * ratio) points from start to stop."""
    betas = [float(stop)] * n
    period = n // cycles
    ramp = int(period * ratio)
    for c in range(cycles):
        betas[c * period : c * period + ramp] = torch.linspace(start, stop, ramp,
                                                               dtype=torch.float64).tolist()
    return betas


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_cyclical_matches_the_lab_formula_including_more_cycles_than_steps(ratio):
    """Every (steps, cycles) pair, also cycles > steps (periods of 0 steps: a 1-epoch run of
    a 2-cycle spec): there the lab's schedule has no ramp and holds stop throughout."""
    for n in range(1, 30):
        for cycles in range(1, 12):
            ours = [cyclical_beta(s, total_steps=n, cycles=cycles, ratio=ratio, start=0.1,
                                  stop=1.0) for s in range(n)]
            assert ours == pytest.approx(
                _lab_cyclical(n, cycles=cycles, ratio=ratio, start=0.1, stop=1.0), abs=1e-12), \
                (n, cycles)


def test_constant_is_constant_and_has_no_cycle_parameters():
    schedule = ConstantKL(value=1.0)
    assert {schedule.beta(epoch, 400) for epoch in range(400)} == {1.0}
    assert not hasattr(schedule, "cycles") and not hasattr(schedule, "ratio")


def test_kl_beta_per_epoch_and_per_iteration():
    per_iteration = CyclicalKL(cycles=2, ratio=0.5, start=0.0, stop=1.0, per="iteration")
    betas = [kl_beta(per_iteration, epoch=e, epochs=2, batch=b, batches_per_epoch=4)
             for e in range(2) for b in range(4)]
    # 8 iterations, 2 periods of 4, a ramp of 2 points (0 -> 1) in each.
    assert betas == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    per_epoch = CyclicalKL(cycles=2, ratio=0.5, start=0.0, stop=1.0, per="epoch")
    betas = [kl_beta(per_epoch, epoch=e, epochs=4, batch=b, batches_per_epoch=4)
             for e in range(4) for b in range(4)]
    assert betas == [0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: CyclicalKL(ratio=0.0), "ratio"),
        (lambda: CyclicalKL(ratio=1.5), "ratio"),
        (lambda: CyclicalKL(cycles=0), "cycles"),
        (lambda: CyclicalKL(start=-0.1), "start"),
        (lambda: MonotonicKL(ratio=0.0), "ratio"),
        (lambda: ConstantKL(value=-1.0), "value"),
        (lambda: CyclicalKL(per="batch"), "per"),
    ],
)
def test_kl_validation_errors_are_one_line(make, field):
    with pytest.raises(ValueError) as error:
        make()
    message = str(error.value)
    assert "\n" not in message and field in message


def _template_teacher_forcing(epochs, *, ratio, decay_start, decay_step):
    """The course template's loop: after each epoch the finished-epoch count goes up and,
    from ``decay_start`` on, the ratio drops by ``decay_step`` (floored at 0)."""
    ratios = []
    for finished in range(1, epochs + 1):
        ratios.append(ratio)
        if finished >= decay_start:
            ratio = max(0.0, ratio - decay_step)
    return ratios


def test_teacher_forcing_follows_the_template():
    ratios = [teacher_forcing_ratio(e, initial=1.0, decay_start=10, decay_step=0.1)
              for e in range(30)]
    assert ratios[:10] == [1.0] * 10
    assert ratios[10:20] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
                                          abs=1e-12)
    assert ratios[20:] == [0.0] * 10  # floored, never negative
    assert ratios == pytest.approx(
        _template_teacher_forcing(30, ratio=1.0, decay_start=10, decay_step=0.1), abs=1e-12)
    spec = TeacherForcing(ratio=1.0, decay_start=10, decay_step=0.1)
    assert [spec.ratio_at(e) for e in range(30)] == ratios
    assert {TeacherForcing(ratio=0.0).ratio_at(e) for e in range(30)} == {0.0}


@pytest.mark.parametrize("make", [lambda: TeacherForcing(ratio=1.5),
                                  lambda: TeacherForcing(mode="step"),
                                  lambda: TeacherForcing(decay_start=-1)])
def test_teacher_forcing_validation(make):
    with pytest.raises(ValueError):
        make()


def _torch_lrs(make_scheduler, epochs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lr_factor_multistep_matches_torch():
    factors = [lr_factor(e, kind="multistep", epochs=8, milestones=(2, 5), gamma=0.1)
               for e in range(8)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    reference = _torch_lrs(
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.1), 8)
    assert factors == pytest.approx(reference, rel=1e-9)


def test_lr_factor_cosine_endpoints_and_torch():
    epochs = 10
    factors = [lr_factor(e, kind="cosine", epochs=epochs) for e in range(epochs + 1)]
    assert factors[0] == 1.0
    assert factors[epochs // 2] == pytest.approx(0.5)
    assert factors[epochs] == pytest.approx(0.0, abs=1e-12)
    reference = _torch_lrs(
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs), epochs + 1)
    assert factors == pytest.approx(reference, abs=1e-9)
    assert lr_factor(3, kind="constant", epochs=epochs) == 1.0
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(0, kind="linear", epochs=epochs)


def test_cosine_is_monotonic_over_training():
    factors = [lr_factor(e, kind="cosine", epochs=400) for e in range(400)]
    assert all(a > b for a, b in pairwise(factors))
    assert math.isclose(factors[200], 0.5)
