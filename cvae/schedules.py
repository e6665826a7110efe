"""Schedules as pure functions of the step: KL beta, teacher forcing, learning rate.

A resumed run asks the same function for the same step and gets the same value, so nothing
about a schedule lives in mutable state.

The KL variants are frozen dataclasses with only their own parameters (a cyclical schedule has
``cycles``; a constant one has only ``value``); the experiment specs reuse them as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Per = Literal["epoch", "iteration"]
PER_CHOICES: tuple[str, ...] = ("epoch", "iteration")


def _check_per(per: str) -> None:
    if per not in PER_CHOICES:
        raise ValueError(f"per={per!r}; choose one of {PER_CHOICES}")


def _check_ramp(ratio: float, start: float, stop: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"kl.ratio={ratio} must be in (0, 1]")
    if start < 0.0 or stop < 0.0:
        raise ValueError(f"kl.start={start} and kl.stop={stop} must be >= 0")
    if start > stop:
        raise ValueError(f"kl.start={start} must be <= kl.stop={stop}")


def cyclical_beta(
    step: int, *, total_steps: int, cycles: int, ratio: float, start: float, stop: float
) -> float:
    """Cyclical annealing (Fu et al. 2019, https://arxiv.org/abs/1903.10145).

    The ``total_steps`` are split into ``cycles`` periods of ``total_steps // cycles`` steps; in
    each period beta rises linearly from ``start`` to ``stop`` over ``int(period * ratio)``
    points (both ends included) and then holds ``stop``. Steps past the last whole period
    hold ``stop``. With 400 epochs, 40 cycles, ratio 0.5: each 10-epoch period ramps over its
    first 5 epochs from 0.1 to 1.0 (0.1, 0.325, 0.55, 0.775, 1.0) and holds 1.0 for 5.
    More cycles than steps make periods of 0 steps: no ramp at all, every step holds ``stop``.
    """
    period = total_steps // cycles
    ramp_points = int(period * ratio)
    if step >= period * cycles:
        return float(stop)
    position = step % period
    if ramp_points <= 1:
        return float(stop) if ramp_points == 0 or position > 0 else float(start)
    if position >= ramp_points:
        return float(stop)
    return float(start + (stop - start) * position / (ramp_points - 1))


@dataclass(frozen=True)
class CyclicalKL:
    cycles: int = 10
    ratio: float = 1.0
    start: float = 0.1
    stop: float = 1.0
    per: Per = "epoch"
    kind: Literal["cyclical"] = "cyclical"

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError(f"kl.cycles={self.cycles} must be >= 1")
        _check_ramp(self.ratio, self.start, self.stop)
        _check_per(self.per)

    def beta(self, step: int, total_steps: int) -> float:
        return cyclical_beta(step, total_steps=total_steps, cycles=self.cycles,
                             ratio=self.ratio, start=self.start, stop=self.stop)


@dataclass(frozen=True)
class MonotonicKL:
    """One cycle: ramp over the first ``ratio`` of training, then hold ``stop``."""

    ratio: float = 0.5
    start: float = 0.1
    stop: float = 1.0
    per: Per = "epoch"
    kind: Literal["monotonic"] = "monotonic"

    def __post_init__(self) -> None:
        _check_ramp(self.ratio, self.start, self.stop)
        _check_per(self.per)

    def beta(self, step: int, total_steps: int) -> float:
        return cyclical_beta(step, total_steps=total_steps, cycles=1,
                             ratio=self.ratio, start=self.start, stop=self.stop)


@dataclass(frozen=True)
class ConstantKL:
    value: float = 1.0
    per: Per = "epoch"
    kind: Literal["constant"] = "constant"

    def __post_init__(self) -> None:
        if not self.value >= 0.0:
            raise ValueError(f"kl.value={self.value} must be >= 0")
        _check_per(self.per)

    def beta(self, step: int, total_steps: int) -> float:
        return float(self.value)


KLSchedule = CyclicalKL | MonotonicKL | ConstantKL
KL_KINDS: dict[str, type] = {"cyclical": CyclicalKL, "monotonic": MonotonicKL, "constant": ConstantKL}


def kl_beta(schedule: KLSchedule, *, epoch: int, epochs: int, batch: int = 0,
            batches_per_epoch: int = 1) -> float:
    """beta for (epoch, batch): indexed per epoch (the lab) or per iteration."""
    if schedule.per == "epoch":
        return schedule.beta(epoch, epochs)
    return schedule.beta(epoch * batches_per_epoch + batch, epochs * batches_per_epoch)


def teacher_forcing_ratio(
    epoch: int, *, initial: float, decay_start: int, decay_step: float
) -> float:
    """The lab's teacher-forcing ratio at ``epoch`` (0-based), floored at 0.

    The template counts finished epochs from 1 and, once that count reaches ``decay_start``,
    lowers the ratio by ``decay_step`` after every epoch. So with decay_start=10 epochs 0..9
    use ``initial``, epoch 10 uses initial - step, epoch 11 initial - 2 step, ...
    """
    decays = max(0, epoch - max(0, decay_start - 1))
    return max(0.0, initial - decays * decay_step)


TFMode = Literal["epoch", "batch"]
TF_MODES: tuple[str, ...] = ("epoch", "batch")


@dataclass(frozen=True)
class TeacherForcing:
    """Teacher forcing: used with probability ``ratio_at(epoch)``, drawn once per epoch (lab)
    or once per batch. ``ratio=0`` means never."""

    ratio: float = 1.0
    decay_start: int = 10
    decay_step: float = 0.1
    mode: TFMode = "epoch"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"teacher_forcing.ratio={self.ratio} must be in [0, 1]")
        if self.decay_start < 0:
            raise ValueError(f"teacher_forcing.decay_start={self.decay_start} must be >= 0")
        if not 0.0 <= self.decay_step <= 1.0:
            raise ValueError(f"teacher_forcing.decay_step={self.decay_step} must be in [0, 1]")
        if self.mode not in TF_MODES:
            raise ValueError(f"teacher_forcing.mode={self.mode!r}; choose one of {TF_MODES}")

    def ratio_at(self, epoch: int) -> float:
        return teacher_forcing_ratio(epoch, initial=self.ratio, decay_start=self.decay_start,
                                     decay_step=self.decay_step)


def multistep_lr_factor(epoch: int, *, milestones: tuple[int, ...], gamma: float) -> float:
    """torch MultiStepLR per epoch: gamma ** (number of milestones <= epoch)."""
    return gamma ** sum(1 for m in milestones if m <= epoch)


def cosine_lr_factor(epoch: int, *, epochs: int, min_factor: float = 0.0) -> float:
    """CosineAnnealingLR with T_max = epochs, as a factor of the base lr."""
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
