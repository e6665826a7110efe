"""Training and evaluation throughput, three ways, on the same data and model.

    python -m benchmarks.throughput [--device cpu|cuda] [--profile smoke|cpu|full]
        [--members K] [--steps N] [--out FILE.json] [--bf16] [--compile]
        [--teacher-forcing on|off] [--workers W] [--threads N] [--kernels]
        [--cudnn-benchmark] [--packed-convs grouped,matmul_1x1,matmul] [--concurrent]

(a) reference: the course template's way: a DataLoader whose Dataset opens and resizes PNG
    files with PIL on every epoch, batch 2, fp32, NCHW, a Python loop over time steps calling
    the encoders per step, one optimizer step per batch, gradient clipping at 1.0;
(b) runner: one run through ``cvae.train.train_epoch`` (uint8 clips decoded once, the
    project's rollout: encoders, posterior and z once over all frames, only the
    autoregressive chain per step), model in channels_last; on CUDA, as in the runner, each
    step's forward and backward replay as one CUDA graph (``cvae.graphs.StepGraphs``);
(c) packed: K members through ``cvae.packed.PackedTrainer`` (one vmapped computation, a CUDA
    graph on CUDA), one row per ``--packed-convs`` form of the members' dense convolutions
    (grouped convolutions, or batched GEMMs for the 1x1 ones or for all).
On CUDA the graphed paths keep their graphs' memory, so each is timed alone after the rounds;
the rounds time (a) next to the eager (no graph) forms of (b) and (c).
``--concurrent`` (CUDA) adds (e): K single runs replaying their graphs on K CUDA streams.
``--bf16`` adds (b) and (c) with ``precision="bf16"`` (the training forward under bf16
autocast, as ``train.precision`` does in a spec) and their val PSNR after the timed steps.

One frame step = one predicted frame of one member, forward + backward. Model FLOPs per frame
step = 3 (forward + 2x backward) x 2 x MACs, with MACs counted from the convolution shapes:
one pass of every module per predicted frame (the lab's ~3.2 GMAC at 128/32/12/192, 32x64).
The detached previous-frame encoding (+12%, without teacher forcing; under it the rollout
reuses the ground-truth encoding) is not counted: GFLOP/s are model FLOPs, the MFU
convention, and the same count divides every path, so ratios are plain speed ratios.
Evaluation = ``cvae.train.evaluate``'s autoregressive rollout of the validation length (630).
On a CPU the whole process runs with the runner's malloc setting (``cvae.host``: freed
buffers are reused, not faulted in again each step), (a) included.

The paths are timed in rounds (one step of each per round, after warm-up rounds), so a
shared machine's changing load falls on all of them alike; the table also gives the range of
each path's ratio to (a) round by round (JSON: ``round_seconds``), i.e. how far one step's
noise moves it. On a busy CPU, ``--threads 1`` avoids OpenMP threads waiting on each other at
every operator.

The data are a synthetic PNG set in the lab layout written to a temporary folder (a moving
blob on grey; skeleton-like lines on white), so this benchmark depends on nothing but cvae.
Profiles set sizes only: smoke (tiny dims, for tests), cpu and full (lab dims).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cvae.host import reuse_freed_host_memory
from cvae.losses import kl_standard_normal, reconstruction_mse
from cvae.model import VideoCVAE, reparameterize
from cvae.packed import (
    CONV_IMPLS,
    PackedTrainer,
    convolutions_may_use_tf32,
    resolve_convolutions,
)
from cvae.schedules import ConstantKL, CyclicalKL, MonotonicKL, TeacherForcing
from cvae.train import (
    FitConfig,
    Hooks,
    _train_step_tensors,
    evaluate,
    new_fit_state,
    step_graphs,
    train_epoch,
)
from experiments.cli import Parser, int_at_least, writable_folder
from experiments.spec import SpecError


@dataclass(frozen=True)
class Profile:
    frame_dim: int
    label_dim: int
    latent_dim: int
    decoder_dim: int
    steps: int  # timed optimizer steps per path
    warmup: int  # untimed steps before
    eval_frames: int
    encoder_width: int = 16  # the lab's frame encoder widths are 16/32/64
    height: int = 32
    width: int = 64
    clip_length: int = 16
    batch_size: int = 2
    png_clips: int = 4  # clips in the PNG set (the reference loader cycles over it)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(16, 8, 4, 16, steps=2, warmup=1, eval_frames=64, encoder_width=4,
                     clip_length=8),
    "cpu": Profile(128, 32, 12, 192, steps=2, warmup=1, eval_frames=630),
    "full": Profile(128, 32, 12, 192, steps=30, warmup=5, eval_frames=630),
}

# Dense peak FLOP/s by GPU (spec sheets); MFU is reported against these, never guessed.
# "fp32" paths are measured against the TF32 tensor-core peak when cuDNN may use TF32 for
# fp32 convolutions (torch's default), else against the plain FP32 peak.
PEAKS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
}


# ---------------------------------------------------------------------------------------------
# Data: a synthetic PNG set in the lab layout
# ---------------------------------------------------------------------------------------------
def _synthetic_frame(t: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame t: a coloured blob moving on a grey studio; its label: coloured lines on white."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cy = height * (0.5 + 0.2 * np.sin(t / 7.0))
    cx = width * (0.5 + 0.3 * np.sin(t / 11.0))
    frame = np.full((height, width, 3), 200, np.float32) - 20 * y[..., None] / height
    blob = ((y - cy) / (0.25 * height)) ** 2 + ((x - cx) / (0.08 * width)) ** 2 < 1
    frame[blob] = (60, 90 + 40 * np.sin(t / 5.0), 150)
    label = np.full((height, width, 3), 255, np.float32)
    for angle, colour in zip((0.3, 1.9, 3.5, 5.0), ((255, 0, 0), (0, 200, 0), (0, 0, 255),
                                                    (255, 170, 0))):
        a = angle + 0.4 * np.sin(t / 6.0)
        along = (x - cx) * np.cos(a) + (y - cy) * np.sin(a)
        across = -(x - cx) * np.sin(a) + (y - cy) * np.cos(a)
        label[(np.abs(across) < 0.02 * width) & (along > 0) & (along < 0.2 * width)] = colour
    return frame.clip(0, 255).astype(np.uint8), label.astype(np.uint8)


def write_png_set(root: Path, *, frames: int, height: int, width: int) -> Path:
    """ROOT/train/train_img/frame{i}.png and ROOT/train/train_label/frame{i}.png, written at
    4x the training size (the loader resizes, as the template does)."""
    img_dir, label_dir = root / "train" / "train_img", root / "train" / "train_label"
    img_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for t in range(frames):
        frame, label = _synthetic_frame(t, 4 * height, 4 * width)
        Image.fromarray(frame).save(img_dir / f"frame{t}.png")
        Image.fromarray(label).save(label_dir / f"frame{t}.png")
    return root


def synthetic_sequence(length: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A validation sequence as uint8 tensors (L, 3, H, W), frames and labels."""
    pairs = [_synthetic_frame(1000 + t, height, width) for t in range(length)]
    frames = torch.from_numpy(np.stack([f for f, _ in pairs])).permute(0, 3, 1, 2)
    labels = torch.from_numpy(np.stack([lab for _, lab in pairs])).permute(0, 3, 1, 2)
    return frames.contiguous(), labels.contiguous()


class TemplateClips(Dataset):
    """The course template's loader: every item opens T frame and T label PNGs with PIL and
    resizes them (``transforms.Resize`` + ``ToTensor``), every epoch."""

    def __init__(self, root: Path, *, clip_length: int, height: int, width: int):
        self.frames = sorted((root / "train" / "train_img").glob("*.png"),
                             key=lambda p: int("".join(c for c in p.stem if c.isdigit())))
        self.labels = [root / "train" / "train_label" / p.name for p in self.frames]
        self.clip_length = clip_length
        self.transform = transforms.Compose([transforms.Resize((height, width)),
                                             transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.frames) // self.clip_length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = range(index * self.clip_length, (index + 1) * self.clip_length)
        return (torch.stack([self._load(self.frames[i]) for i in span]),
                torch.stack([self._load(self.labels[i]) for i in span]))  # (T, 3, H, W) each

    def _load(self, path: Path) -> torch.Tensor:
        return self.transform(Image.open(path).convert("RGB"))


def decode_once(dataset: TemplateClips) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's way: decode every clip once into uint8 (N, T, 3, H, W)."""
    pairs = [dataset[i] for i in range(len(dataset))]
    frames = torch.stack([f for f, _ in pairs])
    labels = torch.stack([lab for _, lab in pairs])
    return (frames * 255).round().to(torch.uint8), (labels * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Model FLOPs
# ---------------------------------------------------------------------------------------------
def conv_macs(model: nn.Module, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of the Conv2d layers of ``model`` that ``fn(*inputs)`` runs, per
    batch element: output elements x (in_channels / groups) x kernel area."""
    total = 0

    def hook(conv: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = conv.kernel_size
        total += output[0].numel() * (conv.in_channels // conv.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            fn(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def model_macs(model: VideoCVAE, height: int, width: int) -> dict[str, int]:
    """MACs of one frame step: ``train`` runs every module once (frame encoder, label
    encoder, learned prior if any, posterior head, fusion, generator); ``eval`` skips the
    posterior head."""
    model = copy.deepcopy(model).float().eval().cpu()
    frame = torch.zeros(1, 3, height, width)
    with torch.no_grad():
        frame_features = model.frame_encoder(frame)
        label_features = model.label_encoder(frame)
        z = torch.zeros(1, model.latent_dim, height, width)
        calls = [(model.frame_encoder, (frame,)), (model.label_encoder, (frame,)),
                 (model.decode_from_features, (frame_features, label_features, z))]
        if model.prior_head is not None:
            calls.append((model.prior_from_features, (frame_features, label_features)))
        shared = sum(conv_macs(model, fn, inputs) for fn, inputs in calls)
        posterior = conv_macs(model, model.posterior_from_features,
                              (frame_features, label_features))
    return {"train": shared + posterior, "eval": shared}


# ---------------------------------------------------------------------------------------------
# The three paths
# ---------------------------------------------------------------------------------------------
def reference_step(model: VideoCVAE, optimizer: torch.optim.Optimizer, frames: torch.Tensor,
                   labels: torch.Tensor, *, beta: float, teacher_forcing: bool) -> float:
    """The template's training_one_step (with the report's detach and sigmoid): per time step
    encode the previous frame, the label and the current frame, then decode."""
    frames, labels = frames.transpose(0, 1), labels.transpose(0, 1)  # (T, B, 3, H, W)
    loss = frames.new_zeros(())
    prev = frames[0]
    for t in range(1, frames.shape[0]):
        prev_features = model.frame_encoder(prev).detach()
        label_features = model.label_encoder(labels[t])
        mu, logvar = model.posterior_from_features(model.frame_encoder(frames[t]), label_features)
        z = reparameterize(mu, logvar, torch.randn_like(mu))
        x_hat = model.activate(model.decode_from_features(prev_features, label_features, z))
        loss = loss + reconstruction_mse(x_hat, frames[t]) + beta * kl_standard_normal(mu, logvar)
        prev = frames[t] if teacher_forcing else x_hat
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()  # the template reads the loss every batch (its progress bar)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, run: Callable[[], Any]) -> float:
    _synchronize(device)
    start = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - start


Stepper = Callable[[], None]  # one optimizer step (of every member) per call


def reference_stepper(model: VideoCVAE, dataset: TemplateClips, *, device: torch.device,
                      batch_size: int, teacher_forcing: bool, workers: int) -> Stepper:
    """One template step per call, data loading included: the loader goes epoch after
    epoch over the PNG set, opening and resizing every file again."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        drop_last=True)

    def batches():
        while True:
            yield from loader

    stream = batches()
    model.train()

    def step() -> None:
        frames, labels = next(stream)
        reference_step(model, optimizer, frames.to(device), labels.to(device), beta=1.0,
                       teacher_forcing=teacher_forcing)

    return step


def _member_config(index: int, *, profile: Profile, teacher_forcing: bool) -> FitConfig:
    """Members of an ablation: KL kinds and learning rates differ, the rest is the lab's."""
    kl = (CyclicalKL(cycles=10, ratio=1.0), MonotonicKL(ratio=0.5), ConstantKL(1.0))[index % 3]
    return FitConfig(epochs=1_000, batch_size=profile.batch_size, lr=1e-3 * (1 + index % 2),
                     lr_schedule="constant", kl=kl, grad_clip=1.0,
                     teacher_forcing=TeacherForcing(ratio=1.0 if teacher_forcing else 0.0,
                                                    decay_start=1_000))


def _one_batch_epochs(clips: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """Endless (clips, labels) pairs of one batch each, cycling over the decoded set: each is
    a one-step epoch for ``train_epoch``."""
    start = 0
    while True:
        index = (start + torch.arange(batch_size, device=clips.device)) % clips.shape[0]
        start += batch_size
        yield clips[index], labels[index]


def runner_stepper(state, config: FitConfig, clips: torch.Tensor, labels: torch.Tensor) -> Stepper:
    """One ``cvae.train.train_epoch`` of one batch per call (its per-epoch host sync
    included); ``config.precision`` says fp32 or bf16 autocast, as in the runner."""
    data = _one_batch_epochs(clips, labels, config.batch_size)

    def step() -> None:
        train_epoch(state, *next(data), config, Hooks())
        state.epoch += 1

    return step


def packed_stepper(trainer: PackedTrainer, clips: torch.Tensor,
                   labels: torch.Tensor) -> Stepper:
    data = _one_batch_epochs(clips, labels, trainer.configs[0].batch_size)

    def step() -> None:
        trainer.train_epoch(*next(data))
        for state in trainer.states:
            state.epoch += 1

    return step


def streams_stepper(states: list, configs: list[FitConfig], clips: torch.Tensor,
                    labels: torch.Tensor, *, teacher_forcing: bool) -> Stepper:
    """(e): K single runs, each replaying its CUDA-graphed training step (``cvae.train``'s)
    on its own CUDA stream, so that kernels of different members may run at once; no host
    sync in a round. The alternative to packing them into one vmapped graph."""
    device = clips.device
    streams = [torch.cuda.Stream(device) for _ in states]
    data = _one_batch_epochs(clips, labels, configs[0].batch_size)
    for state, config in zip(states, configs):
        state.graphs = step_graphs(state.model, detach_prev=config.detach_prev,
                                   precision=config.precision)

    def step() -> None:
        frames, frame_labels = next(data)
        main = torch.cuda.current_stream(device)
        for state, config, stream in zip(states, configs, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                _train_step_tensors(state.model, state.optimizer, frames, frame_labels,
                                    beta=1.0, teacher_forcing=teacher_forcing,
                                    grad_clip=config.grad_clip,
                                    generator=state.noise_generator,
                                    detach_prev=config.detach_prev, precision=config.precision,
                                    step=state.graphs)
        for stream in streams:
            main.wait_stream(stream)

    return step


def compile_model(model: VideoCVAE) -> None:
    """torch.compile each module the rollout calls (in place: state_dict keys unchanged).
    The modules share code (every ``nn.Sequential``, every residual block) and run at two
    batch sizes, with and without gradients: that is more graphs per code object than
    dynamo's default limit of 8."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    for name in ("frame_encoder", "label_encoder", "posterior_head", "decoder_fusion",
                 "generator", "prior_head"):
        module = getattr(model, name)
        if module is not None:
            module.compile()


def kernel_profile(device: torch.device, stepper: Stepper, step_seconds: float,
                   top: int = 6) -> dict[str, Any]:
    """What one more step spends its time on, from ``torch.profiler``.

    CUDA: every kernel (and copy) the step launched, their summed device time against the
    step's wall time from the timed rounds (``busy``: below 1, the GPU waits on the host, i.e.
    launch-bound), and the kernels that took the most time. CPU: the operators with the most
    self time. Names are cut to 90 characters."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _synchronize(device)
    with profile(activities=activities) as prof:
        stepper()
        _synchronize(device)
    totals: dict[str, float] = {}
    launches = 0
    if cuda:
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                launches += 1
                totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us()
    else:
        for event in prof.key_averages():
            totals[event.key] = event.self_cpu_time_total
    busy_us = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    result: dict[str, Any] = {
        "kind": "cuda kernels" if cuda else "cpu operators (self time)",
        "top": [{"name": name[:90], "seconds": us / 1e6, "share": us / busy_us if busy_us else 0}
                for name, us in ranked],
    }
    if cuda:
        result.update(launches=launches, device_seconds=busy_us / 1e6,
                      step_seconds=step_seconds, busy=busy_us / 1e6 / step_seconds)
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _peaks(device: torch.device) -> tuple[dict[str, float], str]:
    if device.type != "cuda":
        return {}, "no peak for CPUs: MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():
        if all(word in name for word in key.split()):
            tf32 = convolutions_may_use_tf32()
            basis = {"bf16": peaks["bf16"], "fp32": peaks["tf32" if tf32 else "fp32"]}
            fp32 = (f"fp32 paths: cuDNN may use TF32, dense TF32 {peaks['tf32'] / 1e12:.1f}"
                    if tf32 else f"fp32 paths: TF32 off, FP32 {peaks['fp32'] / 1e12:.1f}")
            return basis, (f"{name} as {key}: dense BF16 {peaks['bf16'] / 1e12:.1f} TFLOP/s; "
                           f"{fp32} TFLOP/s")
    return {}, f"{name}: no peak on record, MFU not reported"


def _rate(frame_steps: int, seconds: float, flops_per_step: float, peak: float | None,
          reference: float | None) -> dict[str, float | None]:
    rate = frame_steps / seconds
    achieved = rate * flops_per_step
    return {"frame_steps": frame_steps, "seconds": seconds, "frame_steps_per_s": rate,
            "gflops_per_s": achieved / 1e9,
            "speedup_vs_reference": rate / reference if reference else 1.0,
            "mfu": achieved / peak if peak else None}


def path_label(key: str, members: int, *, short: bool = False) -> str:
    """The table's name for a path key: reference, runner[_bf16], packed[_IMPL][_bf16] (IMPL
    a ``cvae.packed`` convolution form other than grouped), streams_graph; "_eager" at the
    end: the same without CUDA graphs."""
    eager = key.endswith("_eager")
    key = key.removesuffix("_eager")
    bf16 = key.endswith("_bf16")
    base = key.removesuffix("_bf16")
    if base == "reference":
        short_name, long_name = "(a)", "(a) reference: template loop, PIL, NCHW"
    elif base == "runner":
        short_name, long_name = "(b)", "(b) runner: cvae.train, 1 run, channels_last"
    elif base.startswith("packed"):
        impl = base.removeprefix("packed").removeprefix("_") or "grouped"
        short_name = "(c)" if impl == "grouped" else f"(c) {impl}"
        long_name = (f"(c) packed: {members} members, channels_last" if impl == "grouped"
                     else f"(c) packed: {members} members, convs {impl}")
    elif base == "streams_graph":
        short_name, long_name = "(e)", f"(e) {members} graphed single runs, {members} streams"
    else:
        short_name = long_name = base
    if bf16:
        short_name += " bf16"
        long_name = (long_name.replace("channels_last", "bf16") if "channels_last" in long_name
                     else long_name + ", bf16")
    if eager:
        short_name += " eager"
        long_name = long_name.replace(", channels_last", "") + ", eager (no CUDA graph)"
    return short_name if short else long_name


def _table(result: dict[str, Any]) -> str:
    dims = result["dims"]
    members = result["members"]
    lines = [
        (f"device {result['device']} ({result['device_name']}, {result['threads']} threads, "
         f"load {result['load_average']:.1f}"
         f"{', freed host memory reused' if result.get('host_malloc_reuse') else ''}); "
         f"torch {result['torch']}"),
        (f"profile {result['profile']}: dims {dims['frame']}/{dims['label']}/{dims['latent']}/"
         f"{dims['decoder']} at {result['frame_size'][0]}x{result['frame_size'][1]}, clips of "
         f"{result['clip_length']}, batch {result['batch_size']}, {result['steps']} timed steps "
         f"after {result['warmup_steps']} warm-up, teacher forcing "
         f"{'on' if result['teacher_forcing'] else 'off'}"),
        (f"model: {result['macs_per_frame_step'] / 1e9:.3f} GMAC per frame step forward (from "
         f"the conv shapes), {result['flops_per_frame_step'] / 1e9:.2f} GFLOP with backward"),
        f"peak: {result['peak_basis']}"
        + ("; cuDNN benchmark mode on" if result.get("cudnn_benchmark") else ""),
        "",
        f"{'path':<48}{'frame-steps/s':>14}{'x (a)':>8}{'GFLOP/s':>10}{'MFU':>8}",
    ]
    for key, p in result["paths"].items():
        label = path_label(key, members)
        mfu = f"{p['mfu']:.1%}" if p["mfu"] is not None else "-"
        lines.append(f"{label:<48}{p['frame_steps_per_s']:>14.2f}"
                     f"{p['speedup_vs_reference']:>8.2f}{p['gflops_per_s']:>10.1f}{mfu:>8}")
    for key, p in result.get("failed_paths", {}).items():
        lines.append(f"{path_label(key, members):<48}  failed: {p}")
    spread = round_ratios(result)
    if spread:
        lines.append(f"x (a) round by round ({result['steps']} rounds): " + ", ".join(
            f"{path_label(key, members, short=True)} {min(r):.2f}-{max(r):.2f}"
            for key, r in spread.items()))
    for key, p in result["paths"].items():
        if "step_gb" in p:
            what = ("at most, from the build on (graph pool, warm-up)"
                    if key in result.get("isolated", ()) else "allocated by one step")
            lines.append(f"{path_label(key, members, short=True)} memory: {p['step_gb']:.2f} GB "
                         f"{what} ({p['step_gb_per_member']:.2f} GB per member)")
    for key, p in result["paths"].items():
        if "profile" in p:
            lines += _profile_lines(key, p["profile"], members)
    runner = result["paths"]["runner"]
    for key, p in result["paths"].items():
        if key.startswith(PACK_PATHS) and not key.endswith("_bf16"):
            lines.append(f"{path_label(key, members, short=True)} vs {members} single runs one "
                         f"after another: {p['frame_steps_per_s'] / runner['frame_steps_per_s']:.2f}x")
    ev = result["eval"]
    lines.append(f"evaluation: {ev['frames']}-frame rollout (cvae.train.evaluate): "
                 f"{ev['frames_per_s']:.1f} frames/s, {ev['gflops_per_s']:.1f} GFLOP/s"
                 + (", a CUDA graph per frame" if "eager" in ev else ""))
    if "eager" in ev:
        lines.append(f"evaluation, eager (no CUDA graph): {ev['eager']['frames_per_s']:.1f} "
                     f"frames/s, {ev['eager']['gflops_per_s']:.1f} GFLOP/s")
    if "bf16_quality" in result:
        q = result["bf16_quality"]
        lines.append(f"bf16 effect, measured: after {q['steps']} steps from the same start, val "
                     f"PSNR (prior mean, {q['frames']} frames) fp32 {q['val_psnr_fp32']:.3f} dB, "
                     f"bf16 {q['val_psnr_bf16']:.3f} dB")
    return "\n".join(lines)


def round_ratios(result: dict[str, Any]) -> dict[str, list[float]]:
    """Each path's speed against (a) in every round (one step of each path, back to back) of
    the paths timed in rounds: how much of a ratio is the machine's noise. Empty with fewer
    than two rounds."""
    reference = result["paths"]["reference"].get("round_seconds", [])
    if len(reference) < 2:
        return {}
    return {key: [_members_of(key, result["members"]) * ref / own
                  for ref, own in zip(reference, p["round_seconds"], strict=True)]
            for key, p in result["paths"].items()
            if key != "reference" and "round_seconds" in p}


def _profile_lines(key: str, prof: dict[str, Any], members: int) -> list[str]:
    short = path_label(key, members, short=True)
    if "busy" in prof:
        lines = [(f"{short} profile: {prof['launches']} kernels per step, "
                 f"{prof['device_seconds'] * 1e3:.1f} ms of GPU time in a "
                 f"{prof['step_seconds'] * 1e3:.1f} ms step (GPU busy {prof['busy']:.0%})")]
    else:
        lines = [f"{short} profile: {prof['kind']}"]
    return lines + [f"    {entry['share']:>6.1%}  {entry['name']}" for entry in prof["top"]]


def _print_profile(key: str, prof: dict[str, Any], members: int) -> None:
    print("\n".join(_profile_lines(key, prof, members)), flush=True)


PACK_PATHS = ("packed", "streams")  # path keys that train K members


def _members_of(key: str, members: int) -> int:
    """How many members a path trains: K for packed and streams paths, else 1."""
    return members if key.startswith(PACK_PATHS) else 1


def _print_rates(seconds: dict[str, float], steps: int, members: int, frames: int) -> None:
    """Frame-steps/s as soon as they are measured (the table comes at the end; a run cut
    short by a time limit keeps these lines)."""
    for name, total in seconds.items():
        count = _members_of(name, members)
        print(f"timed: {path_label(name, members)}: {steps * count * frames / total:.2f} "
              "frame-steps/s", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    profile = PROFILES[args.profile]
    steps = args.steps or profile.steps
    dims = {"frame_dim": profile.frame_dim, "label_dim": profile.label_dim,
            "latent_dim": profile.latent_dim, "decoder_dim": profile.decoder_dim,
            "encoder_width": profile.encoder_width}
    teacher_forcing = args.teacher_forcing == "on"
    B, T = profile.batch_size, profile.clip_length
    peaks, peak_basis = _peaks(device)
    # The runner's CPU malloc setting (cvae.host). It holds for the whole process, so (a)
    # runs with it too; its buffers at batch 2 are small, and alone it timed the same.
    host_malloc = device.type == "cpu" and reuse_freed_host_memory()
    # Off unless asked, as in the runner (see --cudnn-benchmark).
    torch.backends.cudnn.benchmark = device.type == "cuda" and args.cudnn_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        root = write_png_set(Path(tmp), frames=profile.png_clips * T, height=profile.height,
                             width=profile.width)
        dataset = TemplateClips(root, clip_length=T, height=profile.height, width=profile.width)
        clips, labels = (x.to(device) for x in decode_once(dataset))
        val_frames, val_labels = synthetic_sequence(profile.eval_frames, profile.height,
                                                    profile.width)

        torch.manual_seed(0)
        initial = VideoCVAE(**dims)
        macs = model_macs(initial, profile.height, profile.width)
        flops_per_step = 3 * 2 * macs["train"]
        config = _member_config(0, profile=profile, teacher_forcing=teacher_forcing)

        def single(precision: str, graphs: bool = True):
            model = copy.deepcopy(initial).to(device, memory_format=torch.channels_last)
            if args.compile:
                compile_model(model)
            member = replace(config, precision=precision, cuda_graphs=graphs)
            state = new_fit_state(model, member, seed=0)
            return state, runner_stepper(state, member, clips, labels)

        def member_states(precision: str = "fp32", graphs: bool = True):
            states, configs = [], []
            for k in range(args.members):
                torch.manual_seed(k)
                model = VideoCVAE(**dims).to(device, memory_format=torch.channels_last)
                member = replace(_member_config(k, profile=profile,
                                                teacher_forcing=teacher_forcing),
                                 precision=precision, cuda_graphs=graphs)
                states.append(new_fit_state(model, member, seed=k))
                configs.append(member)
            return states, configs

        def packed(precision: str, convolutions: str = "grouped", graphs: bool = True):
            trainer = PackedTrainer(*member_states(precision, graphs), convolutions=convolutions)
            return packed_stepper(trainer, clips, labels)

        def packed_key(impl: str, precision: str = "fp32") -> str:
            return ("packed" + ("" if impl == "grouped" else f"_{impl}")
                    + ("_bf16" if precision == "bf16" else ""))

        # What the runner does: on CUDA, CUDA graphs of every step; those paths keep their
        # graphs' memory, so each is timed alone after the rounds (the rounds time the eager
        # forms next to the reference). On a CPU everything goes in the rounds.
        cuda = device.type == "cuda"
        impls = tuple(dict.fromkeys(resolve_convolutions(impl, device)
                                    for impl in args.packed_convs))
        state_fp32, runner = single("fp32")
        state_bf16 = None
        builders: dict[str, Callable[[], Stepper]] = {"runner": lambda: runner}
        for impl in impls:
            builders[packed_key(impl)] = lambda impl=impl: packed("fp32", impl)
        if args.bf16:
            def runner_bf16() -> Stepper:
                nonlocal state_bf16
                state_bf16, stepper = single("bf16")
                return stepper

            builders["runner_bf16"] = runner_bf16
            for impl in impls:
                builders[packed_key(impl, "bf16")] = lambda impl=impl: packed("bf16", impl)
        if args.concurrent:
            builders["streams_graph"] = lambda: streams_stepper(
                *member_states(), clips, labels, teacher_forcing=teacher_forcing)
        steppers: dict[str, Stepper] = {
            "reference": reference_stepper(copy.deepcopy(initial).to(device), dataset,
                                           device=device, batch_size=B,
                                           teacher_forcing=teacher_forcing,
                                           workers=args.workers),
        }
        if cuda:
            steppers["runner_eager"] = single("fp32", graphs=False)[1]
            steppers[packed_key(impls[0]) + "_eager"] = packed("fp32", impls[0], graphs=False)
        else:
            steppers.update((name, build()) for name, build in builders.items())
            builders = {}

        # Timed in rounds, one step of every path per round, so that a change in the load
        # of a shared machine falls on all paths alike.
        failed: dict[str, str] = {}  # paths that could not run here (out of memory)
        for _ in range(profile.warmup):
            for name, stepper in list(steppers.items()):
                try:
                    stepper()
                except torch.cuda.OutOfMemoryError as error:
                    failed[name] = f"out of memory: {str(error).splitlines()[0][:120]}"
                    print(f"{name}: {failed[name]}", flush=True)
                    del steppers[name], stepper
                    torch.cuda.empty_cache()
        seconds = dict.fromkeys(steppers, 0.0)
        rounds: dict[str, list[float]] = {name: [] for name in steppers}  # each round's step
        step_bytes = dict.fromkeys(steppers, 0)  # CUDA: most memory one step took on top
        for _ in range(steps):
            for name, stepper in steppers.items():
                if cuda:
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                rounds[name].append(_timed(device, stepper))
                seconds[name] += rounds[name][-1]
                if cuda:
                    step_bytes[name] = max(step_bytes[name],
                                           torch.cuda.max_memory_allocated(device) - before)
        _print_rates(seconds, steps, args.members, B * (T - 1))
        profiles: dict[str, Any] = {}
        for name, stepper in steppers.items() if args.kernels else ():
            profiles[name] = kernel_profile(device, stepper, seconds[name] / steps)
            _print_profile(name, profiles[name], args.members)
        steppers = {}  # the eager paths' memory goes back before the graphed ones

        # CUDA: the graphed paths, each alone on the GPU.
        isolated = list(builders)
        for name, build in builders.items():
            gc.collect()  # what the last path left (cycles included) goes back before this one
            torch.cuda.empty_cache()
            stepper = None
            try:
                # Memory: the peak from before the build on, graph pools and the eager
                # warm-up included (a graph keeps its step's memory between replays).
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                stepper = build()
                for _ in range(profile.warmup):  # the first two: eager warm-up, capture
                    stepper()
                total = sum(_timed(device, stepper) for _ in range(steps))
                step_bytes[name] = torch.cuda.max_memory_allocated(device) - before
                seconds[name] = total
                _print_rates({name: total}, steps, args.members, B * (T - 1))
                if args.kernels:
                    profiles[name] = kernel_profile(device, stepper, total / steps)
                    _print_profile(name, profiles[name], args.members)
            except torch.cuda.OutOfMemoryError as error:
                failed[name] = f"out of memory: {str(error).splitlines()[0][:120]}"
                print(f"{name}: {failed[name]}", flush=True)
            finally:
                stepper = None

        paths: dict[str, dict[str, Any]] = {}
        reference_rate = None
        for name, total in seconds.items():
            members = _members_of(name, args.members)
            peak = peaks.get("bf16" if name.endswith("bf16") else "fp32")
            paths[name] = _rate(steps * members * B * (T - 1), total, flops_per_step, peak,
                                reference_rate)
            if device.type == "cuda":
                paths[name]["step_gb"] = step_bytes[name] / 1e9
                paths[name]["step_gb_per_member"] = step_bytes[name] / 1e9 / members
            if name in profiles:
                paths[name]["profile"] = profiles[name]
            if rounds.get(name):
                paths[name]["round_seconds"] = rounds[name]
            reference_rate = reference_rate or paths[name]["frame_steps_per_s"]

        # Evaluation throughput, on the runner's model (on CUDA a graph per frame step, as
        # in the runner, and eager for comparison).
        def time_evaluation(graphs: bool) -> dict[str, float]:
            evaluate(state_fp32.model, val_frames[:4], val_labels[:4],
                     cuda_graphs=graphs)  # warm-up
            generator = torch.Generator(device=device).manual_seed(0)
            seconds = _timed(device, lambda: evaluate(state_fp32.model, val_frames, val_labels,
                                                      generator=generator, cuda_graphs=graphs))
            rate = (profile.eval_frames - 1) / seconds
            return {"frames": profile.eval_frames, "seconds": seconds, "frames_per_s": rate,
                    "gflops_per_s": rate * 2 * macs["eval"] / 1e9}

        eval_result = time_evaluation(True)
        if cuda:
            eval_result["eager"] = time_evaluation(False)

        extra: dict[str, Any] = {}
        if args.bf16:
            # Same start, same seed, same steps; both evaluated in fp32 with z = prior mean.
            psnr = {name: evaluate(state.model, val_frames, val_labels, latent="prior_mean").psnr
                    for name, state in (("fp32", state_fp32), ("bf16", state_bf16))}
            extra["bf16_quality"] = {"steps": profile.warmup + steps,
                                     "frames": profile.eval_frames,
                                     "val_psnr_fp32": psnr["fp32"], "val_psnr_bf16": psnr["bf16"]}

    result = {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_name()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "host_malloc_reuse": host_malloc,
        "profile": args.profile,
        "dims": {"frame": profile.frame_dim, "label": profile.label_dim,
                 "latent": profile.latent_dim, "decoder": profile.decoder_dim,
                 "encoder_width": profile.encoder_width},
        "frame_size": [profile.height, profile.width],
        "clip_length": T,
        "batch_size": B,
        "members": args.members,
        "steps": steps,
        "warmup_steps": profile.warmup,
        "teacher_forcing": teacher_forcing,
        "compile": args.compile,
        "kernels": args.kernels,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "reference_workers": args.workers,
        "macs_per_frame_step": macs["train"],
        "flops_per_frame_step": flops_per_step,
        "eval_macs_per_frame": macs["eval"],
        "peak_flops": peaks,
        "peak_basis": peak_basis,
        "packed_convs": list(args.packed_convs),
        "isolated": isolated,
        "concurrent": args.concurrent,
        "paths": paths,
        "failed_paths": failed,
        "eval": eval_result,
        **extra,
    }
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _convs_list(text: str) -> tuple[str, ...]:
    impls = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [impl for impl in impls if impl not in CONV_IMPLS]
    if unknown or not impls:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'}: choose from {', '.join(CONV_IMPLS)}")
    return impls


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = Parser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", choices=tuple(PROFILES), default="cpu")
    parser.add_argument("--members", type=int_at_least(1), default=3,
                        help="K members for the packed path")
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help="timed optimizer steps per path (default: the profile's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--bf16", action="store_true",
                        help="also time bf16 autocast and measure its val PSNR effect")
    parser.add_argument("--kernels", action="store_true",
                        help="profile one more step of each path: GPU kernels (count, busy "
                             "fraction, the costliest) or CPU operators")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="CUDA: let cuDNN time its algorithms per shape (off in the runner: "
                             "on an H100 it had not finished the warm-up of a 15-member pack "
                             "after 200 s, and once failed with "
                             "CUDNN_STATUS_EXECUTION_FAILED_CUDART)")
    parser.add_argument("--packed-convs", type=_convs_list, default=("auto",),
                        metavar="IMPL[,IMPL]",
                        help="how the packed path runs the members' dense convolutions, one "
                             f"(c) row each: {', '.join(CONV_IMPLS)} (default auto, as the "
                             "runner: matmul_1x1 on CUDA, grouped on a CPU)")
    parser.add_argument("--concurrent", action="store_true",
                        help="CUDA: also time (e), K single runs replaying their CUDA graphs "
                             "on K streams")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the runner path's modules")
    parser.add_argument("--teacher-forcing", choices=("on", "off"), default="off",
                        help="off: the report's final setting (tfr 0)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers of the reference (the template's default is 4)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.concurrent and args.device != "cuda":
        parser.error("--concurrent times CUDA streams: it needs --device cuda")
    if args.out is not None:  # checked before the runs, so that their results are not lost
        try:
            writable_folder(args.out.parent or ".")
        except SpecError as err:
            parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    result = run(args)
    print(_table(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
