"""Rollout, training step, evaluation and the ``fit`` loop.

Training (``rollout``) draws z from the posterior and runs everything that does not depend on
earlier predictions once over all frames of a batch; closed-loop generation (``generate``,
which ``evaluate`` and ``cvae.submission`` use) goes frame by frame with z from the prior (a
sample or its mean). Data
arrive as uint8 tensors (decoded once, see ``cvae.data``) and are scaled to [0, 1] on the
device.

Randomness (clip shuffling, teacher-forcing draws, eps) comes from explicit ``torch.Generator``s
whose states go into checkpoints, so a resumed run continues the very same random stream.
Evaluation draws from none of them: each evaluation has a generator of its own, seeded by the
run's seed and the epoch alone (``evaluation_generator``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cvae.data.lab import check_batch_size
from cvae.graphs import StepGraphs, graphable
from cvae.losses import kl_gaussians, kl_standard_normal, reconstruction_mse
from cvae.metrics import psnr_per_frame
from cvae.model import VideoCVAE, reparameterize
from cvae.schedules import (
    ConstantKL,
    KLSchedule,
    TeacherForcing,
    cosine_lr_factor,
    kl_beta,
    multistep_lr_factor,
)

LatentSource = Literal["posterior", "prior_sample", "prior_mean"]
LATENT_SOURCES: tuple[str, ...] = ("posterior", "prior_sample", "prior_mean")
OptimizerKind = Literal["adam", "adamw"]
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
LRScheduleKind = Literal["multistep", "cosine", "constant"]
LR_SCHEDULES: tuple[str, ...] = ("multistep", "cosine", "constant")
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
EvalReduce = Literal["mean", "best"]
EVAL_REDUCES: tuple[str, ...] = ("mean", "best")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a training precision: None for fp32 (no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; choose one of {PRECISIONS}")
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None, *, cache: bool = True):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing when dtype is None.
    ``cache=False`` inside CUDA graphs, which cannot keep autocast's cast weights."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run cannot continue. ``epoch``: the
    epoch (0-based, as logged) whose loss it was, when known."""

    def __init__(self, message: str, *, epoch: int | None = None):
        super().__init__(message)
        self.epoch = epoch


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (no normalization, as the lab)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


# ---------------------------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    predictions: torch.Tensor  # (B, T-1, 3, H, W): x_hat_2..x_hat_T
    mse: torch.Tensor  # (T-1,): reconstruction MSE of each predicted step
    kl: torch.Tensor  # (T-1,): KL of each step (lab reduction)


def _generate_step(
    model: VideoCVAE,
    prev: torch.Tensor,
    label_features: torch.Tensor,
    eps: torch.Tensor | None,
) -> torch.Tensor:
    """One closed-loop frame step of ``generate``: z from the prior p(z_t | x_{t-1}, P_t),
    its mean when ``eps`` is None, else a sample. prev (B, 3, H, W) the previous generated
    frame, label_features (B, L, H, W), eps (B, N, H, W); returns x_hat (B, 3, H, W)."""
    prev_features = model.frame_encoder(prev)
    mu, logvar = model.prior_from_features(prev_features, label_features)
    z = mu if eps is None else reparameterize(mu, logvar, eps)
    return model.activate(model.decode_from_features(prev_features, label_features, z))


def draw_eps(generator: torch.Generator | None, shape: tuple[int, ...], steps: int, *,
             device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The rollout's noise: ``steps`` draws of ``shape`` (B, N, H, W) from ``generator``, one
    per time step in order, stacked on dim 1: (B, steps, N, H, W). The single-run and packed
    trainers both draw through here, so a member sees the same eps either way."""
    return torch.stack([torch.randn(shape, generator=generator, device=device, dtype=dtype)
                        for _ in range(steps)], dim=1)


def _encode_prev(model: VideoCVAE, frames: torch.Tensor, detach: bool) -> torch.Tensor:
    """Frame features of previous frames; ``detach`` (the report's choice): no gradient flows
    through them, so autograd records nothing there either."""
    if detach:
        with torch.no_grad():
            return model.frame_encoder(frames)
    return model.frame_encoder(frames)


def rollout(
    model: VideoCVAE,
    frames: torch.Tensor,
    labels: torch.Tensor,
    eps: torch.Tensor,
    *,
    teacher_forcing: bool | torch.Tensor,
    detach_prev: bool = True,
    activate: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Rollout:
    """The training rollout: predict frames 2..T of a clip from frame 1 and the labels, z from
    the posterior q(z_t | x_t, P_t).

    frames, labels: (B, T, 3, H, W) floats in [0, 1]; eps: (B, T-1, N, H, W) (``draw_eps``).
    Step t decodes from the previous frame (ground truth under teacher forcing, else the
    previous prediction), the label and z_t. ``teacher_forcing`` may be a 0-dim bool tensor
    (one packed member's draw under vmap), decided per step with ``torch.where``.
    ``detach_prev`` stops gradients through the previous frame's features (the report's
    choice). ``activate`` maps the generator's raw output to x_hat (default: the model's).

    What does not depend on earlier predictions runs once over all B*(T-1) frames: the
    ground-truth encoder, the posterior, z; under teacher forcing the decoder too (and
    one frame-encoder pass over all T frames serves both the posterior and the previous
    frames); the learned prior after the loop. Only the autoregressive chain (encode the previous
    prediction, decode) runs step by step, and in training the label encoder, whose BatchNorm
    takes per-step batch statistics as in the template's loop.
    """
    activate = activate or model.activate
    B, T = frames.shape[:2]
    steps = T - 1
    # Frames 2..T picked by index, not by flattening a 5-D slice: indexing keeps the encoder's
    # memory format (channels_last), a reshape would copy to NCHW, and every convolution that
    # reads the features would then copy them back.
    keep = (torch.arange(B, device=labels.device)[:, None] * T
            + torch.arange(1, T, device=labels.device)).flatten()
    if model.training:
        # The label encoder holds the model's only BatchNorm. In training it runs once per
        # step on that step's B labels, as the template's loop does: batch statistics over
        # each step's labels, running statistics updated once per step, in step order. The
        # steps' outputs come step-major; the index puts them in (clip, step) order.
        by_step = torch.cat([model.label_encoder(labels[:, t]) for t in range(1, T)])
        order = (torch.arange(B, device=labels.device)[:, None]
                 + B * torch.arange(steps, device=labels.device)).flatten()
        label_features_flat = by_step[order]  # (B*S, L, H, W)
    else:  # running statistics: one pass over all labels gives the same values
        label_features_flat = model.label_encoder(labels.flatten(0, 1))[keep]
    label_features = label_features_flat.unflatten(0, (B, steps))
    mixed = isinstance(teacher_forcing, torch.Tensor)
    forced = not mixed and bool(teacher_forcing)
    if forced:
        # The previous frames are the clip's frames 1..T-1 and the frame encoder has no batch
        # statistics: one pass over all T frames gives the posterior's features (frames
        # 2..T) and the previous frames' (1..T-1), detached as ``_encode_prev`` would.
        all_features = model.frame_encoder(frames.flatten(0, 1))
        frame_features, prev_features = all_features[keep], all_features[keep - 1]
        if detach_prev:
            prev_features = prev_features.detach()
    else:
        frame_features = model.frame_encoder(frames[:, 1:].flatten(0, 1))
    mu, logvar = model.posterior_from_features(frame_features,
                                               label_features_flat)  # (B*S, N, H, W) each
    z = reparameterize(mu, logvar, eps.flatten(0, 1))

    if forced:
        predictions = activate(model.decode_from_features(prev_features, label_features_flat, z))
        predictions = predictions.unflatten(0, (B, steps))
    else:
        z = z.unflatten(0, (B, steps))
        outputs, prevs = [], []  # prevs: kept for the learned prior only
        prev = frames[:, 0]
        for s in range(steps):
            features = _encode_prev(model, prev, detach_prev)
            x_hat = activate(model.decode_from_features(features, label_features[:, s], z[:, s]))
            outputs.append(x_hat)
            if model.prior_head is not None:
                prevs.append(features)
            prev = torch.where(teacher_forcing, frames[:, s + 1], x_hat) if mixed else x_hat
        predictions = torch.stack(outputs, dim=1)
        if prevs:
            prev_features = torch.stack(prevs, dim=1).flatten(0, 1)

    # The losses in the frames' dtype: under bf16 autocast the network's outputs are bf16.
    dtype = frames.dtype
    mse = reconstruction_mse(predictions.to(dtype), frames[:, 1:], per_step=True)
    mu, logvar = (x.unflatten(0, (B, steps)).to(dtype) for x in (mu, logvar))
    if model.prior_head is None:
        kl = kl_standard_normal(mu, logvar, per_step=True)
    else:
        prior = model.prior_from_features(prev_features, label_features_flat)
        kl = kl_gaussians(mu, logvar, *(p.unflatten(0, (B, steps)).to(dtype) for p in prior),
                          per_step=True)
    return Rollout(predictions, mse, kl)


def rollout_loss(out: Rollout, beta: torch.Tensor | float) -> torch.Tensor:
    """(loss, mse, kl) as a (3,) tensor: the objective sum_t [MSE_t + beta * KL_t], and the
    MSE and KL per predicted frame."""
    mse_sum, kl_sum = out.mse.sum(), out.kl.sum()
    steps = out.mse.shape[0]
    return torch.stack([mse_sum + beta * kl_sum, mse_sum / steps, kl_sum / steps])


# ---------------------------------------------------------------------------------------------
# Optimizer, LR schedule, training step
# ---------------------------------------------------------------------------------------------
def cuda_graphs_wanted(config: FitConfig, device: torch.device) -> bool:
    """Whether training on ``device`` replays CUDA graphs: on CUDA, unless the config says
    no."""
    return config.cuda_graphs and graphable(device)


def make_optimizer(
    params, *, kind: OptimizerKind = "adam", lr: float = 1e-3, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {kind!r}; choose one of {OPTIMIZERS}")


def lr_factor(
    epoch: int, *, kind: LRScheduleKind, epochs: int,
    milestones: tuple[int, ...] = (2, 5), gamma: float = 0.1,
) -> float:
    """The learning-rate multiplier at ``epoch``: a pure function, so resume recomputes it."""
    if kind == "multistep":
        return multistep_lr_factor(epoch, milestones=milestones, gamma=gamma)
    if kind == "cosine":
        return cosine_lr_factor(epoch, epochs=epochs)
    if kind == "constant":
        return 1.0
    raise ValueError(f"lr schedule {kind!r}; choose one of {LR_SCHEDULES}")


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class StepResult:
    loss: float
    mse: float
    kl: float


def _train_step_tensors(
    model: VideoCVAE,
    optimizer: torch.optim.Optimizer,
    frames: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    teacher_forcing: bool,
    grad_clip: float | None,
    generator: torch.Generator | None,
    detach_prev: bool,
    precision: str = "fp32",
    step: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """One backward and one optimizer step; returns detached (loss, mse, kl) as a (3,) tensor.
    ``precision="bf16"``: the forward under bf16 autocast (parameters, gradients and the
    optimizer stay fp32). ``step``: this model's ``forward_backward`` (made here if None),
    or its ``step_graphs`` to replay it as a CUDA graph; the noise draw, gradient clipping
    and optimizer step stay eager."""
    B, T, _, H, W = frames.shape
    device = frames.device
    dtype = next(model.parameters()).dtype
    eps = draw_eps(generator, (B, model.latent_dim, H, W), T - 1, device=device, dtype=dtype)
    step = step or forward_backward(model, detach_prev=detach_prev, precision=precision)
    values, grads = step((B, T, H, W, bool(teacher_forcing)), frames, labels, eps,
                         torch.full((), beta, device=device, dtype=dtype))
    for param, grad in zip(model.parameters(), grads):
        param.grad = grad  # a graph's static gradient: the next replay rewrites it
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return values


def forward_backward(model: VideoCVAE, *, detach_prev: bool, precision: str = "fp32",
                     autocast_cache: bool = True) -> Callable[..., Any]:
    """The training step up to the gradients, as a function of tensors only (what a CUDA graph
    captures): ``fn(key, frames, labels, eps, beta)`` with uint8 frames and labels (B, T, 3,
    H, W), eps (B, T-1, N, H, W) and a 0-dim beta; ``key[-1]`` is the teacher-forcing flag.
    Returns the detached (loss, mse, kl) and one gradient per parameter (None where a
    parameter gets none). ``autocast_cache=False`` for graphs: a graph cannot keep autocast's
    cast weights across replays."""
    params = list(model.parameters())
    dtype = autocast_dtype(precision)

    def fn(key, frames, labels, eps, beta):
        with autocast(frames.device, dtype, cache=autocast_cache):
            values = rollout_loss(rollout(model, to_unit(frames), to_unit(labels), eps,
                                          teacher_forcing=key[-1], detach_prev=detach_prev),
                                  beta)
        grads = torch.autograd.grad(values[0], params, allow_unused=True)
        return values.detach(), grads

    return fn


def step_graphs(model: VideoCVAE, *, detach_prev: bool, precision: str = "fp32",
                graph: type | None = None) -> StepGraphs:
    """CUDA graphs (``StepGraphs``) of ``forward_backward`` for ``_train_step_tensors``."""
    return StepGraphs(forward_backward(model, detach_prev=detach_prev, precision=precision,
                                       autocast_cache=False), graph=graph)


def train_step(model: VideoCVAE, optimizer: torch.optim.Optimizer, frames: torch.Tensor,
               labels: torch.Tensor, *, beta: float, teacher_forcing: bool,
               grad_clip: float | None = 1.0, generator: torch.Generator | None = None,
               detach_prev: bool = True) -> StepResult:
    """One training step on a batch of clips (B, T, 3, H, W); returns plain floats.

    ``loss`` is the optimized objective (summed over the T-1 steps); ``mse`` and ``kl`` are
    per predicted frame.
    """
    values = _train_step_tensors(model, optimizer, frames, labels, beta=beta,
                                 teacher_forcing=teacher_forcing, grad_clip=grad_clip,
                                 generator=generator, detach_prev=detach_prev).tolist()
    return StepResult(*values)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    psnr_per_frame: torch.Tensor  # (L-1,) float64 on CPU: PSNR of each generated frame 2..L
    mse_per_frame: torch.Tensor  # (L-1,)
    predictions: torch.Tensor  # (L, 3, H, W) float on CPU, frame 1 = the given first frame

    @property
    def psnr(self) -> float:
        return float(self.psnr_per_frame.mean())

    @property
    def loss(self) -> float:
        return float(self.mse_per_frame.mean())


# Mixed into every evaluation seed, so evaluation streams never coincide with a stream that
# someone else seeds from the same (seed, epoch).
EVALUATION_SALT = 0x6576616C  # "eval"


def evaluation_generator(seed: int, epoch: int,
                         device: torch.device | str = "cpu") -> torch.Generator:
    """The noise of the evaluation after ``epoch`` (0-based) of the run seeded ``seed``: a
    generator on ``device`` seeded by (seed, epoch) alone, through numpy's ``SeedSequence``.

    Evaluation therefore never draws from the training streams: evaluating more or less often
    leaves training bit for bit the same. And every arm at one seed sees the same draws at the
    same epoch (common random numbers), so evaluation noise largely cancels in the paired
    differences of arms."""
    entropy = np.random.SeedSequence([seed % 2**64, epoch, EVALUATION_SALT])
    return torch.Generator(device=device).manual_seed(
        int(entropy.generate_state(1, np.uint64)[0]))


def _check_generation_latent(latent: str) -> None:
    if latent not in ("prior_sample", "prior_mean"):
        raise ValueError(
            f"latent={latent!r}: generation draws z from the prior; "
            "choose 'prior_sample' or 'prior_mean'"
        )


@torch.no_grad()
def generate(
    model: VideoCVAE,
    first_frame: torch.Tensor,
    labels: torch.Tensor,
    *,
    latent: LatentSource = "prior_sample",
    samples: int = 1,
    generator: torch.Generator | None = None,
    cuda_graphs: bool = True,
) -> torch.Tensor:
    """Closed-loop generation, as validation and the test set need it.

    first_frame (3, H, W) and labels (L, 3, H, W), uint8 or [0, 1] floats; label 0 belongs to
    the first frame. Frames 1..L-1 are decoded from the previous *generated* frame and their
    label, z from the prior (a sample, or its mean). Returns (samples, L, 3, H, W) floats on
    the model's device, frame 0 being the given frame; ``prior_mean`` is deterministic and
    gives one sequence whatever ``samples`` says. The model runs in eval mode (BatchNorm
    running statistics) and its mode is restored afterwards. On CUDA each frame step replays
    as a CUDA graph (``StepGraphs``; the noise is drawn outside it, in the same order), unless
    ``cuda_graphs`` is False.
    """
    _check_generation_latent(latent)
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        pose = to_unit(labels.to(device))  # (L, 3, H, W)
        n = samples if latent == "prior_sample" else 1
        label_features = model.label_encoder(pose)  # (L, L_dim, H, W), shared by all samples
        prev = to_unit(first_frame.to(device)).unsqueeze(0).expand(n, -1, -1, -1)  # (n, 3, H, W)
        sample = latent == "prior_sample"

        def step(key, prev, label_t, *eps):
            return _generate_step(model, prev, label_t, eps[0] if eps else None)

        if cuda_graphs and graphable(device):
            step = StepGraphs(step)  # ~1,000 small kernels a frame: one launch instead
        outputs = [prev]
        shape = (n, model.latent_dim, *prev.shape[-2:])
        for t in range(1, pose.shape[0]):
            label_t = label_features[t : t + 1].expand(n, -1, -1, -1)
            eps = ((torch.randn(shape, generator=generator, device=device, dtype=prev.dtype),)
                   if sample else ())
            prev = step(n, prev, label_t, *eps).clone()  # a graph's output is rewritten
            outputs.append(prev)
        return torch.stack(outputs, dim=1)  # (n, L, 3, H, W)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: VideoCVAE,
    frames: torch.Tensor,
    labels: torch.Tensor,
    *,
    latent: LatentSource = "prior_sample",
    samples: int = 1,
    reduce: EvalReduce = "mean",
    generator: torch.Generator | None = None,
    cuda_graphs: bool = True,
) -> Evaluation:
    """The lab's validation: frame 1 given, frames 2..L generated from the previous
    *generated* frame and the label, z from the prior (``generate``). ``samples > 1`` draws
    that many sequences in one batched generation and reduces them: ``"mean"`` averages their
    per-frame PSNR and MSE (an estimate of the expected PSNR, less noisy with every sample;
    ``predictions`` is sample 0), ``"best"`` keeps the sequence with the best mean PSNR
    (SVG's best-of-N, a different metric for every N; ``predictions`` is that sequence). With
    one sample, or z = the prior mean, the two are the same.

    frames, labels: (L, 3, H, W) uint8 or [0, 1] floats.
    """
    _check_generation_latent(latent)
    if reduce not in EVAL_REDUCES:
        raise ValueError(f"reduce={reduce!r}; choose one of {EVAL_REDUCES}")
    truth = to_unit(frames.to(next(model.parameters()).device))  # (L, 3, H, W)
    sequences = generate(model, truth[0], labels, latent=latent, samples=samples,
                         generator=generator, cuda_graphs=cuda_graphs)  # (n, L, 3, H, W)
    psnrs = torch.stack([psnr_per_frame(s[1:], truth[1:]) for s in sequences])  # (n, L-1)
    mses = (sequences[:, 1:] - truth[1:]).pow(2).flatten(2).mean(dim=2).double()  # (n, L-1)
    if reduce == "mean":
        return Evaluation(psnrs.mean(dim=0).cpu(), mses.mean(dim=0).cpu(),
                          sequences[0].float().cpu())
    best = int(psnrs.mean(dim=1).argmax())
    return Evaluation(psnrs[best].cpu(), mses[best].cpu(), sequences[best].float().cpu())


def copy_first_floor(frames: torch.Tensor) -> torch.Tensor:
    """PSNR per frame of repeating frame 1 for frames 2..L: the floor any model must beat.
    A frame equal to frame 1 (the dancer holds still) scores the 100 dB cap, not +inf
    (``cvae.metrics.PSNR_CAP_DB``)."""
    truth = to_unit(frames)
    return psnr_per_frame(truth[0:1].expand_as(truth[1:]), truth[1:]).cpu()


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitConfig:
    epochs: int = 70
    batch_size: int = 2
    lr: float = 1e-3
    lr_schedule: LRScheduleKind = "multistep"
    lr_milestones: tuple[int, ...] = (2, 5)
    lr_gamma: float = 0.1
    kl: KLSchedule = field(default_factory=ConstantKL)
    teacher_forcing: TeacherForcing = field(default_factory=TeacherForcing)
    grad_clip: float | None = 1.0
    detach_prev: bool = True
    precision: Precision = "fp32"  # "bf16": training forward under autocast; eval stays fp32
    cuda_graphs: bool = True  # on CUDA, replay each step's forward and backward as a graph
    eval_every: int = 1
    eval_latent: LatentSource = "prior_sample"
    eval_samples: int = 1
    eval_reduce: EvalReduce = "mean"  # how ``evaluate`` reduces the samples: "mean" | "best"


class Hooks:
    """Callbacks from ``fit``; every method does nothing by default.

    ``log_metrics`` is the logging protocol (the README's "What a run records in MLflow"):
    metric keys like ``train/loss``, step = epoch. ``on_epoch_end`` gets the full
    ``FitState`` so a caller can checkpoint.
    """

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def on_batch(self, epoch: int, index: int, total: int) -> None:
        pass

    def on_evaluation(self, epoch: int, evaluation: Evaluation) -> None:
        pass

    def on_epoch_end(self, state: FitState) -> None:
        pass


@dataclass
class FitState:
    """Everything needed to resume: model, optimizer, RNG streams and where we are."""

    model: VideoCVAE
    optimizer: torch.optim.Optimizer
    data_generator: torch.Generator  # CPU: shuffling and teacher-forcing draws
    noise_generator: torch.Generator  # on the device: eps
    seed: int  # the run's: seeds each evaluation's own noise (``evaluation_generator``)
    epoch: int = 0  # the next epoch to run
    best_val_psnr: float = -math.inf
    best_epoch: int = -1
    last_metrics: dict[str, float] = field(default_factory=dict)
    # CUDA graphs of the training step (``step_graphs``), made at the first CUDA epoch; a
    # cache, not part of the state: not checkpointed.
    graphs: StepGraphs | None = field(default=None, repr=False, compare=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_rng": self.data_generator.get_state(),
            "noise_rng": self.noise_generator.get_state().cpu(),
            "seed": self.seed,
            "epoch": self.epoch,
            "best_val_psnr": self.best_val_psnr,
            "best_epoch": self.best_epoch,
            "last_metrics": dict(self.last_metrics),
        }

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        # Generator states must be CPU ByteTensors, whatever map_location the blob was read with.
        self.data_generator.set_state(blob["data_rng"].cpu())
        self.noise_generator.set_state(blob["noise_rng"].cpu())
        self.seed = int(blob.get("seed", self.seed))  # checkpoints from before it: the run's
        self.epoch = int(blob["epoch"])
        self.best_val_psnr = float(blob["best_val_psnr"])
        self.best_epoch = int(blob["best_epoch"])
        self.last_metrics = dict(blob.get("last_metrics", {}))


def new_fit_state(model: VideoCVAE, config: FitConfig, *, seed: int,
                  optimizer: OptimizerKind = "adam", weight_decay: float = 0.0) -> FitState:
    """Seeded generators and a fresh optimizer for ``model`` (already on its device)."""
    device = next(model.parameters()).device
    data_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator(device=device).manual_seed(seed + 1_000_003)
    opt = make_optimizer(model.parameters(), kind=optimizer, lr=config.lr,
                         weight_decay=weight_decay)
    return FitState(model, opt, data_generator, noise_generator, seed)


def _draw(generator: torch.Generator, probability: float) -> bool:
    """Bernoulli(probability) from ``generator``; always consumes one number."""
    return bool(torch.rand((), generator=generator) < probability)


def train_epoch(state: FitState, clips: torch.Tensor, clip_labels: torch.Tensor,
                config: FitConfig, hooks: Hooks) -> dict[str, float]:
    """One pass over shuffled clips (N, T, 3, H, W) uint8; returns the epoch's train metrics."""
    model, epoch = state.model, state.epoch
    device = next(model.parameters()).device
    model.train()
    lr = set_lr(state.optimizer, config.lr, lr_factor(
        epoch, kind=config.lr_schedule, epochs=config.epochs,
        milestones=config.lr_milestones, gamma=config.lr_gamma))
    tf_ratio = config.teacher_forcing.ratio_at(epoch)
    epoch_tf = _draw(state.data_generator, tf_ratio)
    order = torch.randperm(clips.shape[0], generator=state.data_generator)
    # Indices go where the clips are once per epoch: indexing GPU clips with CPU indices would
    # copy them over, and wait for the GPU, on every batch.
    batches = order.to(clips.device).split(config.batch_size)
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    if state.graphs is None and cuda_graphs_wanted(config, device):
        state.graphs = step_graphs(model, detach_prev=config.detach_prev,
                                   precision=config.precision)
    step = state.graphs or forward_backward(model, detach_prev=config.detach_prev,
                                            precision=config.precision)
    beta = 0.0
    for index, batch in enumerate(batches):
        beta = kl_beta(config.kl, epoch=epoch, epochs=config.epochs, batch=index,
                       batches_per_epoch=len(batches))
        use_tf = epoch_tf
        if config.teacher_forcing.mode == "batch":
            use_tf = _draw(state.data_generator, tf_ratio)
        values = _train_step_tensors(
            model, state.optimizer, clips[batch].to(device, non_blocking=True),
            clip_labels[batch].to(device, non_blocking=True), beta=beta,
            teacher_forcing=use_tf and tf_ratio > 0, grad_clip=config.grad_clip,
            generator=state.noise_generator, detach_prev=config.detach_prev,
            precision=config.precision, step=step)
        totals += values.double()
        hooks.on_batch(epoch, index, len(batches))
    loss, mse, kl = (totals / len(batches)).tolist()  # one host sync per epoch
    if not all(math.isfinite(v) for v in (loss, mse, kl)):
        raise NonFiniteLossError(f"non-finite training loss at epoch {epoch}: loss={loss}",
                                 epoch=epoch)
    return {"train/loss": loss, "train/mse": mse, "train/kl": kl, "train/beta": beta,
            "train/tfr": tf_ratio, "train/lr": lr}


def fit(
    state: FitState,
    clips: torch.Tensor,
    clip_labels: torch.Tensor,
    val_frames: torch.Tensor,
    val_labels: torch.Tensor,
    config: FitConfig,
    *,
    hooks: Hooks | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> FitState:
    """Train from ``state.epoch`` to ``config.epochs``, evaluating every ``eval_every`` epochs
    and at the end. Logs per epoch: train/{loss,mse,kl,beta,tfr,lr}, and where it evaluates
    val/{loss,psnr,psnr_prior_mean}.

    clips, clip_labels: (N, T, 3, H, W) uint8 (on the device already, or moved per batch);
    val_frames, val_labels: (L, 3, H, W) uint8. A batch size above the number of clips is
    a ``DatasetError`` (``cvae.data.check_batch_size``), raised before any training.
    """
    check_batch_size(clips.shape[0], config.batch_size)
    hooks = hooks or Hooks()
    while state.epoch < config.epochs and not should_stop():
        metrics = train_epoch(state, clips, clip_labels, config, hooks)
        finish_epoch(state, config, metrics, val_frames, val_labels, hooks)
    return state


def finish_epoch(state: FitState, config: FitConfig, metrics: dict[str, float],
                 val_frames: torch.Tensor, val_labels: torch.Tensor, hooks: Hooks) -> None:
    """After ``state.epoch``'s training: evaluate when due (every ``eval_every`` epochs and at
    the end), track the best, advance the epoch, then log and call the epoch-end hook.
    Shared by ``fit`` and the packed trainer so both keep the same bookkeeping.

    An evaluation logs ``val/loss`` and ``val/psnr`` (``config``'s protocol), and
    ``val/psnr_prior_mean``: z = the prior's mean, deterministic, one rollout more (none when
    the protocol is the prior mean already)."""
    epoch = state.epoch
    if (epoch + 1) % config.eval_every == 0 or epoch == config.epochs - 1:
        evaluation = evaluate_after(state, config, val_frames, val_labels, epoch=epoch)
        metrics["val/loss"], metrics["val/psnr"] = evaluation.loss, evaluation.psnr
        prior_mean = evaluation if config.eval_latent == "prior_mean" else evaluate(
            state.model, val_frames, val_labels, latent="prior_mean",
            cuda_graphs=config.cuda_graphs)
        metrics["val/psnr_prior_mean"] = prior_mean.psnr
        if evaluation.psnr > state.best_val_psnr:
            state.best_val_psnr, state.best_epoch = evaluation.psnr, epoch
        hooks.on_evaluation(epoch, evaluation)
    state.last_metrics = metrics
    state.epoch = epoch + 1
    hooks.log_metrics(metrics, epoch)
    hooks.on_epoch_end(state)


def evaluate_after(state: FitState, config: FitConfig, val_frames: torch.Tensor,
                   val_labels: torch.Tensor, *, epoch: int) -> Evaluation:
    """``config``'s evaluation of ``state.model`` after ``epoch``, with that evaluation's own
    noise (``evaluation_generator(state.seed, epoch)``). ``finish_epoch`` and the runner's
    final artifacts both evaluate through here, so the same epoch gives the same evaluation
    wherever it is made."""
    device = next(state.model.parameters()).device
    return evaluate(state.model, val_frames, val_labels, latent=config.eval_latent,
                    samples=config.eval_samples, reduce=config.eval_reduce,
                    generator=evaluation_generator(state.seed, epoch, device),
                    cuda_graphs=config.cuda_graphs)
