"""The runner: one resolved spec and seed in, one MLflow run out.

- Idempotent: a (spec_hash, seed) already FINISHED in the experiment is skipped.
- Resumable: a RUNNING (process killed) or KILLED (Ctrl-C) run resumes from the
  ``checkpoints/last.pt`` in its artifact store, into the same run id, with no metric step
  logged twice (the checkpoint is written before the epoch's metrics are logged).
- A non-finite loss ends the run FAILED with the reason in the ``stop_reason`` tag.
- Nothing is left RUNNING by an exception that reaches us.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvae.checkpoints import load_training_checkpoint, save_lab_checkpoint, save_training_checkpoint
from cvae.host import reuse_freed_host_memory
from cvae.model import VideoCVAE
from cvae.train import (
    Evaluation,
    FitConfig,
    FitState,
    Hooks,
    NonFiniteLossError,
    copy_first_floor,
    evaluate_after,
    fit,
    new_fit_state,
)
from experiments import tracking
from experiments.data import Data, load_data
from experiments.spec import ExperimentSpec, SpecError, flatten, spec_hash, to_json

DEVICES = ("cpu", "cuda", "mps")


def pick_device(requested: str | None = None) -> str:
    """cuda > mps > cpu unless told; asking for a device that is absent is a SpecError."""
    if requested is None:
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested not in DEVICES:
        raise SpecError(f"--device {requested!r}; choose one of: {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda: no CUDA device is available here; use --device cpu")
    if requested == "mps" and not (getattr(torch.backends, "mps", None)
                                   and torch.backends.mps.is_available()):
        raise SpecError("--device mps: MPS is not available here; use --device cpu")
    return requested


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit_config(spec: ExperimentSpec) -> FitConfig:
    return FitConfig(
        epochs=spec.train.epochs, batch_size=spec.train.batch_size, lr=spec.optim.lr,
        lr_schedule=spec.lr_schedule.kind, lr_milestones=spec.lr_schedule.milestones,
        lr_gamma=spec.lr_schedule.gamma, kl=spec.kl, teacher_forcing=spec.teacher_forcing,
        grad_clip=spec.train.grad_clip, detach_prev=spec.train.detach_prev,
        precision=spec.train.precision,
        # CUDA graphs of each step on CUDA (same results, faster); CVAE_CUDA_GRAPHS=0: eager.
        cuda_graphs=os.environ.get("CVAE_CUDA_GRAPHS", "1") != "0",
        eval_every=spec.eval.every, eval_latent=spec.eval.latent,
        eval_samples=spec.eval.samples, eval_reduce=spec.eval.reduce,
    )


def build_model(spec: ExperimentSpec) -> VideoCVAE:
    m = spec.model
    return VideoCVAE(frame_dim=m.frame_dim, label_dim=m.label_dim, latent_dim=m.latent_dim,
                     decoder_dim=m.decoder_dim, encoder_width=m.encoder_width,
                     output_activation=m.output_activation,
                     prior=m.prior)


def build_state(spec: ExperimentSpec, device: str) -> FitState:
    """Seeded model and optimizer on ``device``: what a fresh run and a resumed run share."""
    seed_everything(spec.seed)
    if device == "cpu":
        reuse_freed_host_memory()  # no page faults on every step's buffers (cvae.host)
    # channels_last everywhere: on this 2-core CPU at the cpu profile it trains 1.17x (one
    # thread) to 1.44x (two threads) faster than NCHW (its 1x1 convolutions avoid a slow path).
    model = build_model(spec).to(device).to(memory_format=torch.channels_last)
    return new_fit_state(model, fit_config(spec), seed=spec.seed, optimizer=spec.optim.kind,
                         weight_decay=spec.optim.weight_decay)


@dataclass
class RunOutcome:
    run_id: str
    status: str  # FINISHED | FAILED | KILLED
    skipped: bool = False
    resumed_from_epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    best_val_psnr: float = math.nan
    best_epoch: int = -1


@dataclass
class RunContext:
    """Where a run is filed and how it is labelled."""

    study: str = "adhoc"
    arm: str | None = None
    group: str | None = None
    profile: str = "cpu"
    experiment_id: str | None = None
    parent_run_id: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    label: str | None = None  # the run's name and progress label (default: ARM-sSEED)


class _Progress:
    """A tqdm bar per run (epoch, batches, ETA, loss, last val PSNR); silent off a terminal."""

    def __init__(self, label: str, total_epochs: int, start_epoch: int, enabled: bool,
                 position: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_epochs, initial=start_epoch, desc=label, unit="epoch",
                        disable=not enabled, leave=True, dynamic_ncols=True,
                        position=position or None)

    def update(self, metrics: dict[str, float]) -> None:
        post = {"loss": f"{metrics.get('train/loss', math.nan):.4g}"}
        if "val/psnr" in metrics:
            post["val_psnr"] = f"{metrics['val/psnr']:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class MlflowHooks(Hooks):
    """Checkpoint, then log, at each epoch end; keep the best model and the last evaluation."""

    def __init__(self, client: Any, run_id: str, workdir: Path, *, already_logged: int,
                 progress: _Progress, extra: Hooks | None):
        self.client, self.run_id, self.workdir = client, run_id, workdir
        self.already_logged = already_logged
        self.progress, self.extra = progress, extra
        self.last_evaluation: Evaluation | None = None
        self.best_model: dict[str, torch.Tensor] | None = None

    def on_batch(self, epoch: int, index: int, total: int) -> None:
        if self.extra:
            self.extra.on_batch(epoch, index, total)

    def on_evaluation(self, epoch: int, evaluation: Evaluation) -> None:
        self.last_evaluation = evaluation

    def on_epoch_end(self, state: FitState) -> None:
        epoch = state.epoch - 1
        if state.best_epoch == epoch:
            self.best_model = {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
            save_training_checkpoint({"model": self.best_model, "epoch": state.epoch,
                                      "val_psnr": state.best_val_psnr},
                                     self.workdir / "best.pt")
        save_training_checkpoint(state.state_dict(), self.workdir / "last.pt")
        self.client.log_artifact(self.run_id, str(self.workdir / "last.pt"), "checkpoints")
        if epoch > self.already_logged:
            log_metrics(self.client, self.run_id, state.last_metrics, epoch)
        self.progress.update(state.last_metrics)
        if self.extra:
            self.extra.log_metrics(state.last_metrics, epoch)
            if self.last_evaluation is not None and "val/psnr" in state.last_metrics:
                self.extra.on_evaluation(epoch, self.last_evaluation)
            self.extra.on_epoch_end(state)


def log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(1000 * time.time())
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start:start + 1000], synchronous=True)


def _log_params_and_tags(client: Any, run_id: str, params: dict[str, Any],
                         tags: dict[str, str]) -> None:
    from mlflow.entities import Param, RunTag

    items = [Param(k, tracking.mask_secrets(str(v))[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])
    tag_items = [RunTag(k, tracking.mask_secrets(str(v))) for k, v in tags.items()]
    for start in range(0, len(tag_items), 100):
        client.log_batch(run_id, tags=tag_items[start:start + 100])


def _resume_point(client: Any, experiment_id: str, spec: ExperimentSpec
                  ) -> tuple[Any | None, str]:
    """(existing run, what to do): 'skip' a FINISHED one, 'resume' a RUNNING/KILLED one,
    'new' otherwise (FAILED runs are kept as they are; a fresh run starts beside them)."""
    runs = tracking.find_runs(experiment_id, spec_hash=spec_hash(spec), seed=spec.seed)
    for run in runs:
        if run.info.status == "FINISHED":
            return run, "skip"
    for run in runs:
        if run.info.status in ("RUNNING", "KILLED", "SCHEDULED"):
            return run, "resume"
    return None, "new"


def _download_checkpoint(run_id: str, dst: Path) -> Path | None:
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="checkpoints/last.pt", dst_path=str(dst))
    except Exception:  # noqa: BLE001  (no checkpoint logged yet: killed in the first epoch)
        return None
    return Path(path)


@dataclass
class _Member:
    """A run being trained: its MLflow run, its state and its hooks (run_experiment, run_pack)."""

    spec: ExperimentSpec
    run_id: str
    label: str
    state: FitState
    workdir: Path
    hooks: MlflowHooks
    bar: _Progress
    resumed_from: int


def _prepare(client: Any, spec: ExperimentSpec, context: RunContext, device: str,
             data: Data | None, *, progress: bool | None, hooks: Hooks | None,
             position: int = 0) -> RunOutcome | tuple[_Member, Data]:
    """Skip a FINISHED (spec, seed) (returns its RunOutcome), resume a RUNNING/KILLED one from
    its checkpoint, or create the run; the state is built and loaded, nothing trained yet.
    ``data`` None: loaded here, before any run exists (bad data creates no run)."""
    experiment_id = context.experiment_id or tracking.get_or_create_experiment(context.study)
    arm = context.arm or spec.name
    label = context.label or f"{arm}-s{spec.seed}"
    existing, action = _resume_point(client, experiment_id, spec)
    if action == "skip":
        print(f"[{label}] already finished as run {existing.info.run_id}; skipping", flush=True)
        return RunOutcome(existing.info.run_id, "FINISHED", skipped=True,
                          metrics=dict(existing.data.metrics),
                          best_val_psnr=float(existing.data.tags.get("best_val_psnr", "nan")),
                          best_epoch=int(existing.data.tags.get("best_epoch", "-1")))
    data = data or load_data(spec.data, context.profile)
    state = build_state(spec, device)
    workdir = Path(tempfile.mkdtemp(prefix="cvae-run-"))
    tags = {
        "study": context.study, "arm": arm, "group": context.group or arm,
        "seed": str(spec.seed), "spec_hash": spec_hash(spec), "profile": context.profile,
        "device": device, "git_commit": tracking.git_commit(), "spec_name": spec.name,
        **context.extra_tags,
    }
    if action == "resume":
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
        if "stop_reason" in existing.data.tags:
            client.delete_tag(run_id, "stop_reason")
        ckpt = _download_checkpoint(run_id, workdir / "download")
        if ckpt is not None:
            state.load_state_dict(load_training_checkpoint(ckpt, map_location=device))
        print(f"[{label}] resuming run {run_id} at epoch {state.epoch}", flush=True)
    else:
        if context.parent_run_id:
            tags["mlflow.parentRunId"] = context.parent_run_id
        run = client.create_run(experiment_id, run_name=label, tags=tags)
        run_id = run.info.run_id
        _log_params_and_tags(client, run_id, flatten(spec), {})
    already = tracking.last_logged_step(run_id) if action == "resume" else -1
    if action == "resume" and state.epoch - 1 > already and state.last_metrics:
        log_metrics(client, run_id, state.last_metrics, state.epoch - 1)
        already = state.epoch - 1
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = _Progress(label, spec.train.epochs, state.epoch, enabled, position=position)
    member = _Member(spec, run_id, label, state, workdir,
                     MlflowHooks(client, run_id, workdir, already_logged=already, progress=bar,
                                 extra=hooks), bar, state.epoch)
    try:
        if action == "new":
            floor = copy_first_floor(data.val_frames)
            log_metrics(client, run_id, {"val/psnr_copy_first": float(floor.mean())}, 0)
            client.log_text(run_id, to_json(spec), "spec.json")
    except BaseException as err:
        _stop(client, member, err)
        raise
    return member, data


def _finish(client: Any, member: _Member, data: Data) -> RunOutcome:
    """Final evaluation artifacts, best-epoch tags, FINISHED."""
    state, spec = member.state, member.spec
    member.bar.close()
    # Resumed after its last epoch, a run has no evaluation in memory: the last epoch's is
    # made again, with that epoch's own noise, so it is the one the run logged.
    evaluation = member.hooks.last_evaluation or evaluate_after(
        state, fit_config(spec), data.val_frames, data.val_labels, epoch=state.epoch - 1)
    _log_final_artifacts(client, member.run_id, spec, state, evaluation, data, member.workdir)
    client.set_tag(member.run_id, "best_val_psnr", f"{state.best_val_psnr:.6f}")
    client.set_tag(member.run_id, "best_epoch", str(state.best_epoch))
    client.set_terminated(member.run_id, "FINISHED")
    return RunOutcome(member.run_id, "FINISHED", resumed_from_epoch=member.resumed_from,
                      metrics=dict(state.last_metrics), best_val_psnr=state.best_val_psnr,
                      best_epoch=state.best_epoch)


def _stop(client: Any, member: _Member, err: BaseException) -> None:
    """End a run that did not finish: FAILED for a non-finite loss or an error, KILLED for
    Ctrl-C/SIGTERM or a pruned trial; the reason goes in ``stop_reason``. Never raises: the
    store itself may be what failed (a RUNNING run is resumed by the next invocation)."""
    member.bar.close()
    if isinstance(err, NonFiniteLossError):
        status, reason = "FAILED", str(err)
    else:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) or \
            type(err).__name__ == "TrialPruned" else "FAILED"
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else \
            tracking.mask_secrets(f"{type(err).__name__}: {err}".splitlines()[0])
    try:
        client.set_tag(member.run_id, "stop_reason", reason)
        client.set_terminated(member.run_id, status)
    except Exception:  # noqa: BLE001, S110
        pass


def run_experiment(
    spec: ExperimentSpec,
    *,
    context: RunContext,
    device: str = "cpu",
    data: Data | None = None,
    progress: bool | None = None,
    hooks: Hooks | None = None,
) -> RunOutcome:
    """Train ``spec`` (already profile-resolved) and record it; see the module docstring."""
    from mlflow.tracking import MlflowClient

    tracking.configure()
    client = MlflowClient()
    prepared = _prepare(client, spec, context, device, data, progress=progress, hooks=hooks)
    if isinstance(prepared, RunOutcome):
        return prepared
    member, data = prepared
    try:
        fit(member.state, data.clips, data.clip_labels, data.val_frames, data.val_labels,
            fit_config(spec), hooks=member.hooks)
        return _finish(client, member, data)
    except BaseException as err:
        _stop(client, member, err)
        raise


def run_pack(
    specs: list[ExperimentSpec],
    contexts: list[RunContext],
    *,
    device: str,
    data: Data,
    progress: bool | None = None,
) -> list[RunOutcome | NonFiniteLossError]:
    """Train several runs as packs (``cvae.packed``): one MLflow run per member, logged as if
    it ran alone (same tags, params, metrics per epoch, checkpoints, artifacts).

    Members that are already FINISHED are skipped; resumed members restart from their own
    checkpoints, packed with the members at the same epoch (a pack trains in lockstep).
    Members that cannot be packed with the others (another architecture, optimizer type,
    batch size, ...) train alone. Returns one outcome per spec, in order, or the
    ``NonFiniteLossError`` of a member whose loss turned non-finite (its run is FAILED; the
    others finish). Ctrl-C ends every unfinished member KILLED, resumable as a pack.
    """
    from mlflow.tracking import MlflowClient

    from cvae.packed import PackedNonFiniteLossError, PackedTrainer, fit_packed, packable

    tracking.configure()
    client = MlflowClient()
    results: list[RunOutcome | NonFiniteLossError | None] = [None] * len(specs)
    members: dict[int, _Member] = {}
    try:
        for i, (spec, context) in enumerate(zip(specs, contexts)):
            prepared = _prepare(client, spec, context, device, data, progress=progress,
                                hooks=None, position=len(members))
            if isinstance(prepared, RunOutcome):
                results[i] = prepared
            else:
                members[i] = prepared[0]
        for pack in _packs(members, packable):
            states = [members[i].state for i in pack]
            configs = [fit_config(members[i].spec) for i in pack]
            failed: list[int] = []
            errors: dict[int, NonFiniteLossError] = {}
            if len(pack) == 1:
                try:
                    fit(states[0], data.clips, data.clip_labels, data.val_frames,
                        data.val_labels, configs[0], hooks=members[pack[0]].hooks)
                except NonFiniteLossError as err:
                    failed, errors = [0], {0: err}
            else:
                print(f"packed: {', '.join(members[i].label for i in pack)} train together "
                      f"from epoch {states[0].epoch}", flush=True)
                try:
                    fit_packed(PackedTrainer(states, configs), data.clips, data.clip_labels,
                               data.val_frames, data.val_labels,
                               hooks=[members[i].hooks for i in pack])
                except PackedNonFiniteLossError as err:
                    failed = err.members
                    errors = {k: NonFiniteLossError(
                        f"non-finite training loss at epoch {members[pack[k]].state.epoch} "
                        "(trained in a pack)") for k in failed}
            for k, i in enumerate(pack):
                member = members.pop(i)
                if k in failed:
                    _stop(client, member, errors[k])
                    results[i] = errors[k]
                else:
                    results[i] = _finish(client, member, data)
    except BaseException as err:
        for member in members.values():
            _stop(client, member, err)
        raise
    return [r for r in results if r is not None]


def _packs(members: dict[int, _Member], packable: Any) -> list[list[int]]:
    """Members grouped into packs: the same epoch (lockstep) and packable together."""
    packs: list[list[int]] = []
    for i, member in members.items():
        for pack in packs:
            candidates = [members[j] for j in pack] + [member]
            if packable([m.state for m in candidates], [fit_config(m.spec) for m in candidates]):
                pack.append(i)
                break
        else:
            packs.append([i])
    return packs


# ---------------------------------------------------------------------------------------------
# Final artifacts
# ---------------------------------------------------------------------------------------------
def _log_final_artifacts(client: Any, run_id: str, spec: ExperimentSpec, state: FitState,
                         evaluation: Evaluation, data: Data, workdir: Path) -> None:
    from experiments import artifacts

    floor = copy_first_floor(data.val_frames)
    out = workdir / "final"
    out.mkdir(parents=True, exist_ok=True)
    csv = artifacts.write_psnr_csv(evaluation.psnr_per_frame, floor, out / "psnr_per_frame.csv")
    png = artifacts.plot_psnr_per_frame(evaluation.psnr_per_frame, floor, out / "psnr_per_frame.png",
                                        title=f"{spec.name} seed {spec.seed}")
    gif = artifacts.write_prediction_gif(data.val_frames, evaluation.predictions, data.val_labels,
                                         out / "prediction.gif")
    npz = artifacts.write_prediction_arrays(data.val_frames, evaluation.predictions,
                                            out / "val_prediction.npz")
    for path in (csv, png, gif, npz):
        client.log_artifact(run_id, str(path))
    if (workdir / "best.pt").exists():
        client.log_artifact(run_id, str(workdir / "best.pt"), "checkpoints")
    if state.model.prior_head is None:
        lab = save_lab_checkpoint(state.model, out / "lab_format.ckpt", lr=spec.optim.lr,
                                  teacher_forcing_ratio=spec.teacher_forcing.ratio,
                                  epoch=state.epoch)
        client.log_artifact(run_id, str(lab), "checkpoints")
    summary = {"final_val_psnr": evaluation.psnr, "copy_first_psnr": float(floor.mean()),
               "best_val_psnr": state.best_val_psnr, "best_epoch": state.best_epoch}
    client.log_text(run_id, json.dumps(summary, indent=2), "summary.json")
