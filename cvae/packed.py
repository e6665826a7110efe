"""Train the K members of an ablation (arms x seeds) as one batched computation.

Members share the architecture, so every step stacks each parameter over the members,
(K, ...), and runs ONE vmapped rollout (``torch.func.vmap`` over ``functional_call`` on a
meta-device copy of the model): a convolution over stacked weights becomes one grouped
convolution with K times the groups, so K small runs cost about one launch sequence on a GPU.

What each member keeps to itself, exactly as when trained alone with ``cvae.train``:
- its ``FitState``: the model's parameters, its own torch.optim optimizer (Adam, AdamW, any
  lr and weight decay), its data and noise ``torch.Generator``s;
- its ``FitConfig``: lr schedule, KL beta schedule, teacher forcing, gradient clipping;
- its output activation (sigmoid or identity, a per-member mask when they differ);
- its BatchNorm statistics: the buffers are stacked (K, C) during an epoch; under vmap the
  in-place running-stat update of ``batch_norm`` touches each member's own slice with its own
  batch statistics; they are written back to the member models at the end of the epoch.

The parameter stack is differentiable, so ``backward`` leaves each member's gradient in its
own model's ``.grad``; gradient clipping (``clip_grad_norm_``, one global norm per member)
and the optimizer step then run per member with torch's own code. Random numbers are drawn
from each member's generators in the same order and shapes as ``cvae.train.train_epoch``
(epoch teacher-forcing draw, shuffle, per-batch draws; eps per time step), so a packed member
sees the same shuffles, teacher-forcing draws and eps as alone: the result is the single-run
result within floating-point tolerance (tests/test_packed.py).

Because the member ``FitState``s stay the source of truth, checkpoints, ``evaluate`` and
everything else of the single-run code apply to them unchanged (``unpack`` returns them).

    trainer = PackedTrainer(states, configs)          # states from cvae.train.new_fit_state
    fit_packed(trainer, clips, clip_labels, val_frames, val_labels, hooks=per_member_hooks)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from cvae.data.lab import check_batch_size
from cvae.graphs import StepGraphs
from cvae.model import VideoCVAE
from cvae.schedules import kl_beta
from cvae.train import (
    FitConfig,
    FitState,
    Hooks,
    NonFiniteLossError,
    _draw,
    autocast,
    autocast_dtype,
    cuda_graphs_wanted,
    draw_eps,
    finish_epoch,
    lr_factor,
    rollout,
    rollout_loss,
    set_lr,
    to_unit,
)


class PackedNonFiniteLossError(NonFiniteLossError):
    """Some members produced a non-finite loss. From ``PackedTrainer.train_epoch``: the
    epoch was completed for everyone, ``members`` are the failed indices and ``metrics``
    every member's epoch metrics, so a caller can go on without them. From ``fit_packed``:
    the others have finished, ``members`` are indices into the original list."""

    def __init__(self, message: str, *, members: list[int], metrics: list[dict[str, float]]):
        super().__init__(message)
        self.members = members
        self.metrics = metrics


# ---------------------------------------------------------------------------------------------
# Compatibility
# ---------------------------------------------------------------------------------------------
def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def packing_problems(states: Sequence[FitState], configs: Sequence[FitConfig]) -> list[str]:
    """Why these members cannot train packed (empty list: they can).

    Must match: architecture (dims, prior), device and dtype, batch size, epochs, the
    current epoch, ``detach_prev`` and the precision. May differ: seed, lr and its schedule,
    optimizer (each member steps its own), KL schedule, teacher forcing, output activation,
    gradient clipping and the evaluation settings.
    """
    if len(states) != len(configs):
        return [f"{len(states)} states but {len(configs)} configs"]
    if not states:
        return ["no members"]
    problems = []
    first_model, first_config = states[0].model, configs[0]
    first_param = next(first_model.parameters())
    for k, (state, config) in enumerate(zip(states, configs)):
        model = state.model
        if type(model) is not type(first_model) or _shapes(model) != _shapes(first_model):
            problems.append(f"member {k}: architecture differs from member 0 (dims or prior)")
        param = next(model.parameters())
        if (param.device, param.dtype) != (first_param.device, first_param.dtype):
            problems.append(f"member {k}: on {param.device}/{param.dtype}, "
                            f"member 0 on {first_param.device}/{first_param.dtype}")
        for name in ("batch_size", "epochs", "detach_prev", "precision"):
            if getattr(config, name) != getattr(first_config, name):
                problems.append(f"member {k}: {name}={getattr(config, name)!r}, "
                                f"member 0 has {getattr(first_config, name)!r}")
        if state.epoch != states[0].epoch:
            problems.append(f"member {k}: at epoch {state.epoch}, member 0 at {states[0].epoch}")
    return problems


def packable(states: Sequence[FitState], configs: Sequence[FitConfig]) -> bool:
    """True when ``PackedTrainer(states, configs)`` accepts these members."""
    return not packing_problems(states, configs)


# ---------------------------------------------------------------------------------------------
# One member's training rollout (runs under vmap, one member's tensors at a time)
# ---------------------------------------------------------------------------------------------
class _NativeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that skips cuDNN. On CUDA, torch's batch-norm entry point asks its input
    for its memory format before choosing cuDNN, which a vmapped tensor cannot answer
    ("NYI: querying is_contiguous inside of vmap"); with cuDNN off it goes straight to the
    native kernel, whose vmap rule normalizes each member with its own statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enabled = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = False  # read by F.batch_norm at the call
        try:
            return super().forward(x)
        finally:
            torch.backends.cudnn.enabled = enabled


class _PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution as a matrix product over channels. Under vmap a convolution over
    stacked weights becomes one grouped convolution (groups = K); this becomes one batched
    GEMM over the members instead. Same parameters, same result (in the convolution's
    precision: ``matmuls_as_precise_as_convolutions``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x.movedim(1, -1), self.weight.flatten(1).t())  # (B, H, W, O)
        if self.bias is not None:
            out = out + self.bias
        return out.movedim(-1, 1)


class _UnfoldConv2d(nn.Conv2d):
    """A dense k x k convolution as im2col (``F.unfold``) and a matrix product: under vmap,
    a batched GEMM over the members instead of a grouped convolution. Costs k*k times the
    input's memory for the columns. Zero padding only (the model pads reflectively with its
    own layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)  # (B, C*kh*kw, L)
        out = torch.matmul(self.weight.flatten(1), cols)  # (B, O, L)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.unflatten(-1, (out_h, out_w))


def convolutions_may_use_tf32() -> bool:
    """Whether cuDNN's fp32 convolutions may use TF32. Through the ``allow_tf32`` flag; where
    TF32 was set per operator with torch's newer ``fp32_precision`` settings in a way the flag
    cannot express (torch then refuses to read it), from the convolutions' own setting, or
    the first level above it that has one."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # "mix of the legacy and new APIs"
        for level in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
            precision = getattr(level, "fp32_precision", "none")
            if precision != "none":
                return precision == "tf32"
        return False


@contextmanager
def matmuls_as_precise_as_convolutions(device: torch.device) -> Iterator[None]:
    """On CUDA, matrix products in TF32 exactly when cuDNN's convolutions are. Torch's
    defaults differ (convolutions may use TF32, matrix products may not), so without this the
    convolutions that ``_PointwiseConv2d`` and ``_UnfoldConv2d`` compute as matrix products
    would run in full FP32, slower than, and not the same computation as, the convolution they
    stand for. Elsewhere nothing changes. The setting is restored on exit. Where matrix
    products' TF32 was set through torch's newer ``fp32_precision`` API, which torch will not
    mix with the ``allow_tf32`` flag, that choice stands as it is."""
    saved = None
    if device.type == "cuda":
        try:
            saved = torch.backends.cuda.matmul.allow_tf32
        except RuntimeError:  # "mix of the legacy and new APIs": leave the user's setting
            saved = None
    if saved is None:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = convolutions_may_use_tf32()
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


ConvImpl = Literal["auto", "grouped", "matmul_1x1", "matmul"]
CONV_IMPLS: tuple[str, ...] = ("auto", "grouped", "matmul_1x1", "matmul")


def resolve_convolutions(impl: str, device: torch.device) -> str:
    """"auto": what measured fastest on the device type. H100 (15 lab-size members, eager):
    1x1 convolutions as batched GEMMs 1.36x grouped convolutions in fp32 (509 vs 373
    frame-steps/s), 1.66x in bf16; this 2-core CPU (2 members): grouped 5.30 vs 4.96."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"convolutions={impl!r}; choose one of {CONV_IMPLS}")
    if impl == "auto":
        return "matmul_1x1" if device.type == "cuda" else "grouped"
    return impl


def _swap_convolutions(model: nn.Module, impl: str) -> None:
    """Re-class the dense convolutions of the shell model for ``impl``: "grouped" keeps
    ``nn.Conv2d`` (vmap makes grouped convolutions), "matmul_1x1" turns 1x1 convolutions into
    batched GEMMs, "matmul" every dense one (1x1 and k x k). Depthwise convolutions stay."""
    if impl not in CONV_IMPLS[1:]:
        raise ValueError(f"convolutions={impl!r}; choose one of {CONV_IMPLS[1:]}")
    for module in model.modules():
        if type(module) is not nn.Conv2d or module.groups != 1 or impl == "grouped":
            continue
        if module.padding_mode != "zeros":
            continue
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0):
            module.__class__ = _PointwiseConv2d
        elif impl == "matmul":
            module.__class__ = _UnfoldConv2d


class _MemberRollout(nn.Module):
    """Shell whose ``forward`` is ``cvae.train.rollout`` + ``rollout_loss`` for ONE member;
    ``functional_call`` swaps in that member's parameters and buffers. The rollout is the
    single-run code itself; only the output activation and teacher forcing may be per-member
    masks (``torch.where``) when members differ in them.
    """

    def __init__(self, model: VideoCVAE, convolutions: str = "grouped"):
        super().__init__()
        self.model = copy.deepcopy(model).to("meta")  # structure only: tensors come per call
        for module in self.model.modules():
            if type(module) is nn.BatchNorm2d:
                module.__class__ = _NativeBatchNorm2d
        _swap_convolutions(self.model, convolutions)

    def forward(
        self,
        frames: torch.Tensor,  # (B, T, 3, H, W) uint8
        labels: torch.Tensor,  # (B, T, 3, H, W) uint8
        eps: torch.Tensor,  # (B, T-1, N, H, W)
        beta: torch.Tensor,  # ()
        teacher_forcing: torch.Tensor,  # () bool, read only when teacher_mode == "mixed"
        sigmoid: torch.Tensor,  # () bool, read only when activation == "mixed"
        *,
        teacher_mode: str,  # "all" | "none" | "mixed": which members use teacher forcing
        activation: str,  # "sigmoid" | "identity" | "mixed"
        detach_prev: bool,
    ) -> torch.Tensor:
        teacher = {"all": True, "none": False}.get(teacher_mode, teacher_forcing)
        activate = {"sigmoid": torch.sigmoid, "identity": lambda raw: raw}.get(
            activation, lambda raw: torch.where(sigmoid, torch.sigmoid(raw), raw))
        out = rollout(self.model, to_unit(frames), to_unit(labels), eps,
                      teacher_forcing=teacher, detach_prev=detach_prev, activate=activate)
        return rollout_loss(out, beta)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack member tensors on a new dim 0, keeping channels_last 4-D weights channels_last
    (so the grouped convolution vmap builds stays in that layout)."""
    first = tensors[0]
    if (first.dim() == 4 and not first.is_contiguous()
            and first.is_contiguous(memory_format=torch.channels_last)):
        # (K, O, kh, kw, I) contiguous viewed as (K, O, I, kh, kw): channels_last per member.
        return torch.stack([t.permute(0, 2, 3, 1) for t in tensors]).permute(0, 1, 4, 2, 3)
    return torch.stack(tensors)


def _mode(flags: Sequence[bool], *, yes: str, no: str) -> str:
    return yes if all(flags) else no if not any(flags) else "mixed"


class _PackedForwardBackward:
    """The vmapped forward of every member and the gradients of each member's loss: what a
    CUDA graph captures (``StepGraphs``). ``params``: each member's parameter list;
    ``buffers``: the stacked BatchNorm buffers (the trainer keeps both the same tensors for
    its whole life). A separate object, not a trainer method, so that the trainer and its
    graphs hold no reference cycle and a dropped trainer frees its graphs' memory at once."""

    def __init__(self, shell: _MemberRollout, params: list[list[nn.Parameter]],
                 buffers: dict[str, torch.Tensor], *, activation: str, detach_prev: bool,
                 autocast_dtype: torch.dtype | None, autocast_cache: bool):
        self.shell, self.params, self.buffers = shell, params, buffers
        self.names = [name for name, _ in shell.model.named_parameters()]
        self.activation, self.detach_prev = activation, detach_prev
        self.autocast_dtype, self.autocast_cache = autocast_dtype, autocast_cache

    def __call__(self, key: tuple, frames: torch.Tensor, labels: torch.Tensor,
                 eps: torch.Tensor, beta: torch.Tensor, teacher_forcing: torch.Tensor,
                 sigmoid: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Returns (K, 3) detached values and the gradients, member by member, parameter by
        parameter; ``key[-1]`` is the teacher-forcing mode (all, none, mixed)."""
        # (K, ...) per parameter; differentiable, so each member's gradient reaches its own.
        params = {f"model.{name}": _stack([member[i] for member in self.params])
                  for i, name in enumerate(self.names)}
        options = {"teacher_mode": key[-1], "detach_prev": self.detach_prev,
                   "activation": self.activation}

        def member(p, b, *args):
            return functional_call(self.shell, (p, b), args, options)

        flat = [param for member_params in self.params for param in member_params]
        with matmuls_as_precise_as_convolutions(frames.device):  # forward and backward
            # Autocast for the forward only; no weight cache under graphs (it cannot outlive
            # a replay).
            with autocast(frames.device, self.autocast_dtype, cache=self.autocast_cache):
                values = vmap(member)(params, self.buffers, frames, labels, eps, beta,
                                      teacher_forcing, sigmoid)  # (K, 3): loss, mse, kl
            # Members are independent: d(sum of losses)/d theta_k = d loss_k / d theta_k.
            grads = torch.autograd.grad(values[:, 0].sum(), flat, allow_unused=True)
        return values.detach(), grads


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class PackedTrainer:
    """K members trained in lockstep as one batched computation.

    ``states``: one ``FitState`` per member (``cvae.train.new_fit_state``; models already on
    the device, in any memory format, all the same architecture); ``configs``: one
    ``FitConfig`` each. Members whose configs say ``precision="bf16"`` run the forward under
    bf16 autocast, as ``cvae.train`` does for a single run.

    ``convolutions`` says how the members' dense convolutions run together: "grouped" (vmap's
    own rule: one grouped convolution, groups = K), "matmul_1x1" (1x1 convolutions as one
    batched GEMM) or "matmul" (every dense convolution as im2col + batched GEMM); "auto"
    (default): matmul_1x1 on CUDA, grouped elsewhere (``resolve_convolutions``). The same
    arithmetic either way; which is fastest depends on the device (``benchmarks.throughput
    --packed-convs``).

    On CUDA (unless a config says ``cuda_graphs=False``) each step's vmapped forward and
    backward replay as a CUDA graph (``cvae.graphs.StepGraphs``).
    """

    def __init__(self, states: Sequence[FitState], configs: Sequence[FitConfig], *,
                 convolutions: ConvImpl = "auto"):
        problems = packing_problems(states, configs)
        if problems:
            raise ValueError("members cannot be packed: " + "; ".join(problems))
        self.states, self.configs = list(states), list(configs)
        self.autocast_dtype = autocast_dtype(self.configs[0].precision)
        self.convolutions = resolve_convolutions(convolutions, self.device)
        self._sigmoid = [s.model.output_activation == "sigmoid" for s in self.states]
        # The same tensors every step (a CUDA graph reads and writes these very ones): member
        # parameters, and BatchNorm buffers stacked (K, ...) once, refreshed every epoch.
        self._params = [list(state.model.parameters()) for state in self.states]
        self._buffers = {f"model.{name}": torch.stack([s.model.get_buffer(name)
                                                       for s in self.states])
                         for name, _ in self.states[0].model.named_buffers()}
        wanted = all(cuda_graphs_wanted(config, self.device) for config in self.configs)
        self._forward = _PackedForwardBackward(
            _MemberRollout(self.states[0].model, self.convolutions), self._params, self._buffers,
            activation=_mode(self._sigmoid, yes="sigmoid", no="identity"),
            detach_prev=self.configs[0].detach_prev, autocast_dtype=self.autocast_dtype,
            autocast_cache=not wanted)
        self.graphs = StepGraphs(self._forward) if wanted else None

    @property
    def size(self) -> int:
        return len(self.states)

    @property
    def epoch(self) -> int:
        return self.states[0].epoch

    @property
    def device(self) -> torch.device:
        return next(self.states[0].model.parameters()).device

    def unpack(self) -> list[FitState]:
        """The member states, up to date: parameters, BatchNorm buffers, optimizer state and
        generators live there between epochs, so checkpoints and ``evaluate`` use them as is."""
        return self.states

    # -- one epoch -------------------------------------------------------------------------
    def train_epoch(self, clips: torch.Tensor, clip_labels: torch.Tensor,
                    hooks: Sequence[Hooks] | None = None) -> list[dict[str, float]]:
        """One pass of every member over its own shuffle of ``clips`` (N, T, 3, H, W) uint8;
        returns one metrics dict per member with the keys of ``cvae.train.train_epoch``.

        Like ``cvae.train.train_epoch`` it reads ``state.epoch`` and leaves it to the caller
        (``fit_packed``) to advance.
        """
        states, configs, device = self.states, self.configs, self.device
        dtype = next(states[0].model.parameters()).dtype
        K, epoch = self.size, self.epoch
        batch_size = configs[0].batch_size
        if hooks is not None and len(hooks) != K:
            raise ValueError(f"{len(hooks)} hooks for {K} members")
        self._forward.shell.train()  # the shell's BatchNorm mode is the one vmap runs

        # Host-side schedule of the whole epoch, drawn in train_epoch's order per member.
        lrs, tf_ratios, orders, use_tf, betas = [], [], [], [], []
        batches_per_epoch = -(-clips.shape[0] // batch_size)
        for state, config in zip(states, configs):
            state.model.train()
            lrs.append(set_lr(state.optimizer, config.lr, lr_factor(
                epoch, kind=config.lr_schedule, epochs=config.epochs,
                milestones=config.lr_milestones, gamma=config.lr_gamma)))
            ratio = config.teacher_forcing.ratio_at(epoch)
            epoch_tf = _draw(state.data_generator, ratio)
            orders.append(torch.randperm(clips.shape[0], generator=state.data_generator))
            draws = [epoch_tf] * batches_per_epoch
            if config.teacher_forcing.mode == "batch":
                draws = [_draw(state.data_generator, ratio) for _ in range(batches_per_epoch)]
            tf_ratios.append(ratio)
            use_tf.append([d and ratio > 0 for d in draws])
            betas.append([kl_beta(config.kl, epoch=epoch, epochs=config.epochs, batch=index,
                                  batches_per_epoch=batches_per_epoch)
                          for index in range(batches_per_epoch)])

        # Device copies made once per epoch: no host sync inside the batch loop.
        order = torch.stack(orders).to(clips.device)  # (K, N)
        beta_all = torch.tensor(betas, dtype=dtype).T.contiguous().to(device)  # (n, K)
        tf_all = torch.tensor(use_tf).T.contiguous().to(device)  # (n, K)
        sigmoid = torch.tensor(self._sigmoid, device=device)  # (K,)
        self._refresh_buffers()

        totals = torch.zeros(K, 3, device=device, dtype=torch.float64)
        for index, batch in enumerate(order.split(batch_size, dim=1)):  # batch: (K, b)
            values = self._step(
                clips[batch].to(device, non_blocking=True),
                clip_labels[batch].to(device, non_blocking=True),
                beta=beta_all[index], teacher_forcing=tf_all[index],
                sigmoid=sigmoid, teacher_flags=[flags[index] for flags in use_tf])
            totals += values.double()
            for hook in hooks or ():
                hook.on_batch(epoch, index, batches_per_epoch)
        self._write_back_buffers()

        means = (totals / batches_per_epoch).tolist()  # one host sync per epoch
        metrics = [{"train/loss": loss, "train/mse": mse, "train/kl": kl,
                    "train/beta": betas[k][-1], "train/tfr": tf_ratios[k], "train/lr": lrs[k]}
                   for k, (loss, mse, kl) in enumerate(means)]
        failed = [k for k, values in enumerate(means) if not all(map(math.isfinite, values))]
        if failed:
            raise PackedNonFiniteLossError(
                f"non-finite training loss at epoch {epoch} for members {failed}",
                members=failed, metrics=metrics)
        return metrics

    # -- one batched step ------------------------------------------------------------------
    def _step(self, frames: torch.Tensor, labels: torch.Tensor, *, beta: torch.Tensor,
              teacher_forcing: torch.Tensor, sigmoid: torch.Tensor,
              teacher_flags: list[bool]) -> torch.Tensor:
        """frames, labels: (K, B, T, 3, H, W) uint8. One forward and backward for all members
        (replayed as a CUDA graph on CUDA), then each member clips and steps its own
        optimizer. Returns (K, 3)."""
        states, configs = self.states, self.configs
        _, B, T, _, H, W = frames.shape  # (K, B, T, 3, H, W)
        # eps exactly as alone: T-1 draws of (B, N, H, W) from each member's noise generator.
        shape = (B, states[0].model.latent_dim, H, W)
        dtype = next(states[0].model.parameters()).dtype
        eps = torch.stack([draw_eps(s.noise_generator, shape, T - 1, device=frames.device,
                                    dtype=dtype) for s in states])  # (K, B, T-1, N, H, W)
        key = (B, T, H, W, _mode(teacher_flags, yes="all", no="none"))
        step = self.graphs or self._forward
        values, grads = step(key, frames, labels, eps, beta, teacher_forcing, sigmoid)
        grads = iter(grads)
        for state, config, params in zip(states, configs, self._params):
            for param in params:
                param.grad = next(grads)  # a graph's static gradient: the next replay rewrites it
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            state.optimizer.step()
        return values

    # -- BatchNorm buffers -----------------------------------------------------------------
    def _buffer_pairs(self):
        """(slice of the stack, the member's own buffer), for every buffer of every member."""
        for key, stacked in self._buffers.items():
            name = key.removeprefix("model.")
            for k, state in enumerate(self.states):
                yield stacked[k], state.model.get_buffer(name)

    @torch.no_grad()
    def _refresh_buffers(self) -> None:
        """Copy each member's BatchNorm buffers into the stack (a checkpoint may have been
        loaded into the members since the last epoch)."""
        for stacked, own in self._buffer_pairs():
            stacked.copy_(own)

    @torch.no_grad()
    def _write_back_buffers(self) -> None:
        for stacked, own in self._buffer_pairs():
            own.copy_(stacked)


# ---------------------------------------------------------------------------------------------
# fit, packed
# ---------------------------------------------------------------------------------------------
def fit_packed(
    trainer: PackedTrainer,
    clips: torch.Tensor,
    clip_labels: torch.Tensor,
    val_frames: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    hooks: Sequence[Hooks] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[FitState]:
    """``cvae.train.fit`` for every member at once: the same epochs, metrics, evaluations
    (per member with ``cvae.train.finish_epoch``: its own evaluation protocol, with the noise
    of its own seed and epoch), best-PSNR bookkeeping and hook calls, one ``Hooks`` per
    member.

    A member whose loss turns non-finite stops there (its state stays at the start of that
    epoch, as ``fit`` leaves it) while the others train on; at the end
    ``PackedNonFiniteLossError`` names every failed member (indices into the original list).
    """
    check_batch_size(clips.shape[0], trainer.configs[0].batch_size)
    hooks = list(hooks) if hooks is not None else [Hooks() for _ in trainer.states]
    if len(hooks) != trainer.size:
        raise ValueError(f"{len(hooks)} hooks for {trainer.size} members")
    states = list(trainer.states)
    active = list(range(trainer.size))  # original indices of the members still training
    failed: list[int] = []
    epochs = trainer.configs[0].epochs
    while active and trainer.epoch < epochs and not should_stop():
        member_hooks = [hooks[i] for i in active]
        try:
            all_metrics = trainer.train_epoch(clips, clip_labels, member_hooks)
        except PackedNonFiniteLossError as error:
            keep = [k for k in range(trainer.size) if k not in error.members]
            failed += [active[k] for k in error.members]
            all_metrics = [error.metrics[k] for k in keep]
            active = [active[k] for k in keep]
            member_hooks = [hooks[i] for i in active]
            if not keep:
                break
            trainer = PackedTrainer([trainer.states[k] for k in keep],
                                    [trainer.configs[k] for k in keep],
                                    convolutions=trainer.convolutions)
        for state, config, hook, metrics in zip(trainer.states, trainer.configs, member_hooks,
                                                all_metrics):
            finish_epoch(state, config, metrics, val_frames, val_labels, hook)
    if failed:
        raise PackedNonFiniteLossError(f"non-finite training loss for members {sorted(failed)}",
                                       members=sorted(failed), metrics=[])
    return states
