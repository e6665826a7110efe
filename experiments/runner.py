"""The runner: one resolved spec and seed in, one MLflow run out.

- Idempotent: a (spec_hash, seed) already FINISHED in the experiment is skipped.
- Resumable: a RUNNING (process killed) or KILLED (Ctrl-C, a full disk) run resumes from the
  ``checkpoints/last.pt`` in its artifact store, into the same run id, with no metric step
  logged twice (the checkpoints are written before the epoch's metrics are logged).
- Two checkpoints: each epoch end uploads the previous epoch's as ``checkpoints/previous.pt``
  before the new ``checkpoints/last.pt``. A ``last.pt`` that cannot be read is replaced by
  ``previous.pt`` on resume; with neither readable the run is marked FAILED (one line), and a
  rerun starts a clean run beside it. ``checkpoints/best.pt`` is uploaded whenever the best
  validation PSNR improves, so every finished run has one, resumed or not.
- One owner per run: the process training a run holds a lease, the tags ``lease_owner``
  (host:pid), ``lease_since``, ``lease_heartbeat`` (Unix seconds, refreshed every
  ``CVAE_LEASE_HEARTBEAT`` = 10 s by a thread) and ``lease_token``, removed when the run
  ends. Another process refuses a run whose lease is live (``RunBusyError``: "run ... is
  being trained by pid P on host H since ...; rerun when it stops") and takes it over once
  the heartbeat is older than ``CVAE_LEASE_GRACE`` = 60 s, or at once when the owner was
  on this host and its pid is gone. A claim is settled through MLflow alone (any store): a
  new run is created with its lease, and after ``heartbeat / 20`` s the claimant looks for
  rivals of the same (spec_hash, seed): the earliest-started live one (then the lowest run
  id) wins, a FINISHED one is reused, and a loser deletes the run it created. An owner
  checks its lease at every epoch end and between batches; one that finds another process
  holding its run (it was paused, or cut off from the store, beyond the grace) stops
  without writing to it. Clocks of machines sharing a store must agree within a second.
- A non-finite loss ends the run FAILED with the reason in the ``stop_reason`` tag and
  raises ``NonFiniteLossError`` (with its ``epoch``).
- A full or read-only disk (ENOSPC, EDQUOT, EROFS) while a checkpoint or artifact is written
  ends the run KILLED, resumable from its last good checkpoint, and raises a one-line
  ``TrackingError``.
- Nothing is left RUNNING by an exception that reaches us, and the run's temporary folder
  (``cvae-run-*`` in the system's temporary directory) is removed however the run ends.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvae.checkpoints import (
    CheckpointError,
    load_training_checkpoint,
    save_lab_checkpoint,
    save_training_checkpoint,
)
from cvae.data import check_batch_size
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
from experiments.tracking import RunBusyError

DEVICES = ("cpu", "cuda", "mps")
# Errors of a disk that is full or read-only: the run is fine, its storage is not.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


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


def rng_seed(spec: ExperimentSpec) -> int:
    """The seed of a run's random streams (initialisation, clip order, noise): the spec's
    seed, salted by ``train.replicate`` when it is not 0, so a replicate of a spec (the same
    science) draws other random numbers at every seed."""
    if spec.train.replicate == 0:
        return spec.seed
    digest = hashlib.sha256(f"{spec.seed}:{spec.train.replicate}".encode()).digest()
    return int.from_bytes(digest[:6], "big")  # < 2**48: the noise stream's offset fits int64


def fit_config(spec: ExperimentSpec) -> FitConfig:
    return FitConfig(
        epochs=spec.train.epochs, batch_size=spec.train.batch_size,
        lr=spec.optim.lr * spec.optim.lr_scale,
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
    seed = rng_seed(spec)
    seed_everything(seed)
    if device == "cpu":
        reuse_freed_host_memory()  # no page faults on every step's buffers (cvae.host)
    # channels_last everywhere: on this 2-core CPU at the cpu profile it trains 1.17x (one
    # thread) to 1.44x (two threads) faster than NCHW (its 1x1 convolutions avoid a slow path).
    model = build_model(spec).to(device).to(memory_format=torch.channels_last)
    return new_fit_state(model, fit_config(spec), seed=seed, optimizer=spec.optim.kind,
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
    # The run's name and progress label (default: ``run_name(ARM, SEED)``, ARM-s07).
    label: str | None = None


def run_params(spec: ExperimentSpec) -> dict[str, Any]:
    """The run's MLflow params: the resolved spec's values, flattened (``kl.cycles``, ...).
    Not its ``description``: that prose is written for the spec as registered (the report's
    "40 cycles"), which a profile resolves to other numbers; it goes in the run's note."""
    return {key: value for key, value in flatten(spec).items() if key != "description"}


def run_note(spec: ExperimentSpec, profile: str) -> str:
    """The run's description in the MLflow UI: the spec's, and what the params are."""
    return (f"{spec.description}\n\n(The spec as registered. This run resolved it under the "
            f"`{profile}` profile: its params hold the values it trained with, such as the "
            "epochs, widths and epoch-indexed schedules.)")


def run_name(arm: str, seed: int) -> str:
    """A run's name, ``kl_cyclical-s07``: the seed in two digits, so that the MLflow runs
    table sorted by name lists each arm's seeds in order (s02 before s10)."""
    return f"{arm}-s{seed:02d}"


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.5 h``: how long, for progress lines."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


class _Progress:
    """A run's progress: on a terminal a tqdm bar (epoch, ETA, loss, last val PSNR); else
    (a log file, a pipe, a queue worker) one line per epoch, with the run's ETA."""

    def __init__(self, label: str, total_epochs: int, start_epoch: int, enabled: bool,
                 position: int = 0):
        from tqdm.auto import tqdm

        self.label, self.total, self.epoch = label, total_epochs, start_epoch
        self.started, self.first = time.monotonic(), start_epoch
        self.bar = tqdm(total=total_epochs, initial=start_epoch, desc=label, unit="epoch",
                        disable=not enabled, leave=True, dynamic_ncols=True,
                        position=position or None)

    def update(self, metrics: dict[str, float]) -> None:
        self.epoch += 1
        if self.bar.disable:
            print(self.line(metrics), flush=True)
            return
        post = {"loss": f"{metrics.get('train/loss', math.nan):.4g}"}
        if "val/psnr" in metrics:
            post["val_psnr"] = f"{metrics['val/psnr']:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def line(self, metrics: dict[str, float]) -> str:
        each = (time.monotonic() - self.started) / max(1, self.epoch - self.first)
        parts = [f"[{self.label}] epoch {self.epoch}/{self.total}",
                 f"train loss {metrics.get('train/loss', math.nan):.4g}",
                 f"β {metrics.get('train/beta', math.nan):.3g}",
                 f"tfr {metrics.get('train/tfr', math.nan):.2f}"]
        if "val/psnr" in metrics:
            parts.append(f"val PSNR {metrics['val/psnr']:.2f} dB")
        parts += [f"{each:.1f} s/epoch", f"run ETA {duration(each * (self.total - self.epoch))}"]
        return " · ".join(parts)

    def close(self) -> None:
        self.bar.close()


class MlflowHooks(Hooks):
    """Checkpoints, then metrics, at each epoch end; the last evaluation kept for the end.
    Nothing is written once another process holds the run (``_Claim.verify``)."""

    def __init__(self, client: Any, run_id: str, workdir: Path, *, already_logged: int,
                 progress: _Progress, extra: Hooks | None, claim: _Claim):
        self.client, self.run_id, self.workdir = client, run_id, workdir
        self.already_logged = already_logged
        self.progress, self.extra, self.claim = progress, extra, claim
        self.last_evaluation: Evaluation | None = None

    def on_batch(self, epoch: int, index: int, total: int) -> None:
        self.claim.check()
        if self.extra:
            self.extra.on_batch(epoch, index, total)

    def on_evaluation(self, epoch: int, evaluation: Evaluation) -> None:
        self.last_evaluation = evaluation

    def on_epoch_end(self, state: FitState) -> None:
        epoch = state.epoch - 1
        self.claim.verify()
        if state.best_epoch == epoch:
            # Uploaded when it improves, not at the end: a run resumed later (even after its
            # last epoch) finishes with the best weights of all its epochs.
            best = {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
            save_training_checkpoint({"model": best, "epoch": state.epoch,
                                      "val_psnr": state.best_val_psnr}, self.workdir / "best.pt")
            self.client.log_artifact(self.run_id, str(self.workdir / "best.pt"), "checkpoints")
        self._checkpoint(state)
        self.claim.verify(rivals=False)  # not paused mid-upload while another took over
        if epoch > self.already_logged:
            log_metrics(self.client, self.run_id, state.last_metrics, epoch)
        self.progress.update(state.last_metrics)
        if self.extra:
            self.extra.log_metrics(state.last_metrics, epoch)
            if self.last_evaluation is not None and "val/psnr" in state.last_metrics:
                self.extra.on_evaluation(epoch, self.last_evaluation)
            self.extra.on_epoch_end(state)

    def _checkpoint(self, state: FitState) -> None:
        """The previous epoch's checkpoint goes up as ``previous.pt`` before the new
        ``last.pt``: a ``last.pt`` cut short (a full disk, a dropped connection) leaves a
        good one in the store."""
        last, previous = self.workdir / "last.pt", self.workdir / "previous.pt"
        if last.exists():
            os.replace(last, previous)
            self.client.log_artifact(self.run_id, str(previous), "checkpoints")
        save_training_checkpoint(state.state_dict(), last)
        self.client.log_artifact(self.run_id, str(last), "checkpoints")


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


# ---------------------------------------------------------------------------------------------
# One owner per run (see the module docstring)
# ---------------------------------------------------------------------------------------------
class CheckpointUnreadableError(tracking.TrackingError):
    """Neither of a run's checkpoints can be read: the run is marked FAILED (a rerun starts a
    clean run beside it)."""


def _resume_point(experiment_id: str, spec: ExperimentSpec, timing: tracking.LeaseTiming
                  ) -> tuple[Any | None, str]:
    """(existing run, what to do): 'skip' a FINISHED one, 'busy' when a live process holds an
    unfinished one, 'resume' a RUNNING/KILLED one, 'new' otherwise (FAILED runs are kept as
    they are; a fresh run starts beside them)."""
    runs = tracking.find_runs(experiment_id, spec_hash=spec_hash(spec), seed=spec.seed)
    for run in runs:
        if run.info.status == "FINISHED":
            return run, "skip"
    unfinished = [r for r in runs if r.info.status in ("RUNNING", "KILLED", "SCHEDULED")]
    for run in unfinished:
        if tracking.lease_is_live(run.data.tags, timing):
            return run, "busy"
    return (unfinished[0], "resume") if unfinished else (None, "new")


def _busy(run: Any, name: str) -> RunBusyError:
    return RunBusyError(f"run {run.info.run_id} ({name}) is being trained by "
                        f"{tracking.lease_holder(run.data.tags)}; rerun when it stops")


def _rank(run: Any) -> tuple[int, str]:
    """Rivals for one (spec_hash, seed): the earliest started wins, then the lowest id."""
    return run.info.start_time or 0, run.info.run_id


@dataclass
class _Claim:
    """This process's hold on one run: its lease, and the checks that it still holds it."""

    client: Any
    lease: tracking.Lease
    experiment_id: str
    spec: ExperimentSpec
    run_id: str
    name: str  # "ARM seed S": how the one-line messages name the run
    created: bool  # this process created the run (a duplicate it deletes when it loses)
    withdrawn: bool = False

    @property
    def holds(self) -> bool:
        return self.lease.lost is None and not self.withdrawn

    def check(self) -> None:
        """What the heartbeat thread found, without a query (between batches)."""
        if self.lease.lost is not None:
            raise RunBusyError(
                f"run {self.run_id} ({self.name}) was taken over by {self.lease.lost} (no "
                f"heartbeat from this process for over {self.lease.timing.grace:g} s); this "
                "process stopped without writing to it")

    def contest(self, *, rivals: bool = True) -> tuple[str, Any] | None:
        """None while this process holds the run; else ("taken", the run) when another
        process's lease is on it, or ("finished" | "busy", rival) for another run of the
        same (spec_hash, seed) that is FINISHED or live and ranks first (``_rank``)."""
        run = self.client.get_run(self.run_id)
        if not self.lease.held(run.data.tags):
            return "taken", run
        if not rivals:
            return None
        for rival in tracking.find_runs(self.experiment_id, spec_hash=spec_hash(self.spec),
                                        seed=self.spec.seed):
            if rival.info.run_id == self.run_id:
                continue
            if rival.info.status == "FINISHED":
                return "finished", rival
            if tracking.lease_is_live(rival.data.tags, self.lease.timing) and \
                    _rank(rival) < _rank(run):
                return "busy", rival
        return None

    def verify(self, *, rivals: bool = True) -> None:
        """Raise ``RunBusyError`` unless this process still holds the run and no rival run
        ranks first (this process then gives its run up: ``withdraw``)."""
        self.check()
        found = self.contest(rivals=rivals)
        if found is None:
            return
        kind, run = found
        if kind == "taken":
            self.lease.lost = tracking.lease_holder(run.data.tags)
            self.check()
        self.withdraw()
        if kind == "finished":
            raise RunBusyError(f"run {run.info.run_id} ({self.name}) was finished by another "
                               f"process; this process gave up its duplicate run {self.run_id}")
        raise _busy(run, self.name)

    def withdraw(self) -> None:
        """Give the run up to a rival: deleted (reports ignore it) if this process created
        it, else KILLED as it was before the claim, the lease removed."""
        self.lease.release(self.client)
        self.withdrawn = True
        self.client.set_terminated(self.run_id, "KILLED")
        if self.created:
            self.client.delete_run(self.run_id)


def _claim(client: Any, experiment_id: str, spec: ExperimentSpec, context: RunContext, *,
           device: str, name: str, label: str, timing: tracking.LeaseTiming
           ) -> RunOutcome | tuple[_Claim, Any | None]:
    """Take the run of (spec, seed) with a new lease: resume the unfinished one or create
    it; then, after the settle time, check that no rival won. Returns the claim and the
    resumed run (None for a new run), or the outcome of a rival that finished."""
    from mlflow.entities import RunTag

    # Looked up again right before writing: loading the data took a while.
    existing, action = _resume_point(experiment_id, spec, timing)
    if action == "skip":
        return _reused(existing, label)
    if action == "busy":
        raise _busy(existing, name)
    lease = tracking.Lease(timing)
    if action == "resume":
        run_id = existing.info.run_id
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in lease.tags().items()])
        client.update_run(run_id, status="RUNNING")
    else:
        arm = context.arm or spec.name
        tags = {
            "study": context.study, "arm": arm, "group": context.group or arm,
            "seed": str(spec.seed), "spec_hash": spec_hash(spec), "profile": context.profile,
            "device": device, "git_commit": tracking.git_commit(), "spec_name": spec.name,
            **context.extra_tags, **lease.tags(),
        }
        if context.parent_run_id:
            tags["mlflow.parentRunId"] = context.parent_run_id
        if spec.description:
            tags[tracking.NOTE_TAG] = run_note(spec, context.profile)
        run_id = client.create_run(experiment_id, run_name=label, tags=tags).info.run_id
        _log_params_and_tags(client, run_id, run_params(spec), {})
    lease.run_id = run_id
    claim = _Claim(client, lease, experiment_id, spec, run_id, name, created=action == "new")
    try:
        _settle(timing)
        found = claim.contest()
    except BaseException as err:  # Ctrl-C, the store gone: not left RUNNING
        _mark(client, claim, err)
        raise
    if found is None:
        lease.start()
        return claim, existing
    kind, run = found
    if kind == "taken":  # another process resuming the same run wrote its lease after ours
        raise _busy(run, name)
    claim.withdraw()
    if kind == "finished":
        return _reused(run, label)
    raise _busy(run, name)


def _settle(timing: tracking.LeaseTiming) -> None:
    """Wait until rivals that claimed the run with us have written their claims."""
    time.sleep(timing.settle)


def _reused(run: Any, label: str) -> RunOutcome:
    print(f"[{label}] already finished as run {run.info.run_id}; skipping", flush=True)
    return RunOutcome(run.info.run_id, "FINISHED", skipped=True, metrics=dict(run.data.metrics),
                      best_val_psnr=float(run.data.tags.get("best_val_psnr", "nan")),
                      best_epoch=int(run.data.tags.get("best_epoch", "-1")))


# ---------------------------------------------------------------------------------------------
# Checkpoints and the temporary folder
# ---------------------------------------------------------------------------------------------
def _download_checkpoint(run_id: str, name: str, dst: Path) -> Path | None:
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"checkpoints/{name}", dst_path=str(dst))
    except Exception:  # noqa: BLE001  (not logged yet: killed in the first epoch)
        return None
    return Path(path)


def _restore(claim: _Claim, state: FitState, workdir: Path, device: str, label: str) -> None:
    """Load the run's ``last.pt`` into ``state``, or its ``previous.pt`` when ``last.pt``
    cannot be read; from epoch 0 when none was logged (killed in its first epoch). The one
    loaded becomes the local ``last.pt``, so the next epoch end uploads it as
    ``previous.pt``. None readable: ``CheckpointUnreadableError``."""
    problems: list[str] = []
    for name in ("last.pt", "previous.pt"):
        path = _download_checkpoint(claim.run_id, name, workdir / "download")
        if path is None:
            continue
        try:
            state.load_state_dict(load_training_checkpoint(path, map_location=device))
        except Exception as err:  # noqa: BLE001  (unreadable, or not this run's state)
            problems.append(str(err) if isinstance(err, CheckpointError) else
                            f"{name} does not fit this run ({tracking.first_line(err)})")
            continue
        if problems:
            print(f"[{label}] checkpoints/{problems[0]}; falling back to checkpoints/{name}",
                  flush=True)
        shutil.copyfile(path, workdir / "last.pt")
        return
    if problems:
        raise CheckpointUnreadableError(
            f"run {claim.run_id} ({claim.name}) has no readable checkpoint "
            f"({'; '.join(problems)}); it is marked FAILED: rerun the same command to start "
            "a clean run")


def _workdir() -> Path:
    """The run's temporary folder (local checkpoints, final artifacts), removed at its end."""
    try:
        return Path(tempfile.mkdtemp(prefix="cvae-run-"))
    except OSError as err:
        raise tracking.TrackingError(f"cannot create a temporary folder in "
                                     f"{tempfile.gettempdir()}: {err.strerror or err}") from None


def _storage_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


def _storage_error(err: OSError, which: str) -> tracking.TrackingError:
    """A full or read-only disk as one line: ``which`` run(s) stopped KILLED, resumable."""
    where = f" ({err.filename})" if err.filename else ""
    return tracking.TrackingError(
        f"{which} stopped: {err.strerror or err}{where}; it is KILLED with its last good "
        "checkpoint: free space (or make the disk writable) and rerun the same command to "
        "resume")


# ---------------------------------------------------------------------------------------------
# A run's life: prepare, train, finish or stop
# ---------------------------------------------------------------------------------------------
@dataclass
class _Member:
    """A run being trained: its MLflow run, its state and its hooks (run_experiment, run_pack)."""

    spec: ExperimentSpec
    label: str
    state: FitState
    workdir: Path
    hooks: MlflowHooks
    bar: _Progress
    resumed_from: int
    claim: _Claim

    @property
    def run_id(self) -> str:
        return self.claim.run_id


def _prepare(client: Any, spec: ExperimentSpec, context: RunContext, device: str,
             data: Data | None, *, progress: bool | None, hooks: Hooks | None,
             position: int = 0) -> RunOutcome | tuple[_Member, Data]:
    """Skip a FINISHED (spec, seed) (returns its RunOutcome), refuse one that another live
    process trains (``RunBusyError``), resume a RUNNING/KILLED one from its checkpoint, or
    create the run; the state is built and loaded, nothing trained yet. ``data`` None:
    loaded here, before any run exists (bad data creates no run)."""
    experiment_id = context.experiment_id or tracking.get_or_create_experiment(context.study)
    arm = context.arm or spec.name
    label = context.label or run_name(arm, spec.seed)
    name = f"{arm} seed {spec.seed}"
    timing = tracking.lease_timing()
    existing, action = _resume_point(experiment_id, spec, timing)
    if action == "skip":
        return _reused(existing, label)
    if action == "busy":  # before the data load: refused at once
        raise _busy(existing, name)
    data = data or load_data(spec.data, context.profile)
    check_batch_size(data.clips.shape[0], spec.train.batch_size)  # before any run exists
    state = build_state(spec, device)
    workdir = _workdir()
    try:
        claimed = _claim(client, experiment_id, spec, context, device=device, name=name,
                         label=label, timing=timing)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if isinstance(claimed, RunOutcome):
        shutil.rmtree(workdir, ignore_errors=True)
        return claimed
    claim, resumed = claimed
    run_id = claim.run_id
    try:
        if resumed is not None:
            if "stop_reason" in resumed.data.tags:
                client.delete_tag(run_id, "stop_reason")
            _restore(claim, state, workdir, device, label)
            print(f"[{label}] resuming run {run_id} at epoch {state.epoch}", flush=True)
            already = tracking.last_logged_step(run_id)
            if state.epoch - 1 > already and state.last_metrics:
                log_metrics(client, run_id, state.last_metrics, state.epoch - 1)
                already = state.epoch - 1
        else:
            floor = copy_first_floor(data.val_frames)
            log_metrics(client, run_id, {"val/psnr_copy_first": float(floor.mean())}, 0)
            client.log_text(run_id, to_json(spec), "spec.json")
            already = -1
    except BaseException as err:
        _end(client, claim, workdir, err)
        if _storage_full(err):
            raise _storage_error(err, f"run {run_id} ({name})") from None
        raise
    enabled = sys.stderr.isatty() if progress is None else progress  # else a line per epoch
    bar = _Progress(label, spec.train.epochs, state.epoch, enabled, position=position)
    hooks = MlflowHooks(client, run_id, workdir, already_logged=already, progress=bar,
                        extra=hooks, claim=claim)
    return _Member(spec, label, state, workdir, hooks, bar, state.epoch, claim), data


def _finish(client: Any, member: _Member, data: Data) -> RunOutcome:
    """Final evaluation artifacts, best-epoch tags, FINISHED; the lease released and the
    temporary folder removed."""
    state, spec = member.state, member.spec
    member.bar.close()
    member.claim.verify()
    # Resumed after its last epoch, a run has no evaluation in memory: the last epoch's is
    # made again, with that epoch's own noise, so it is the one the run logged.
    evaluation = member.hooks.last_evaluation or evaluate_after(
        state, fit_config(spec), data.val_frames, data.val_labels, epoch=state.epoch - 1)
    _log_final_artifacts(client, member.run_id, spec, state, evaluation, data, member.workdir)
    client.set_tag(member.run_id, "best_val_psnr", f"{state.best_val_psnr:.6f}")
    client.set_tag(member.run_id, "best_epoch", str(state.best_epoch))
    client.set_terminated(member.run_id, "FINISHED")
    member.claim.lease.release(client)
    shutil.rmtree(member.workdir, ignore_errors=True)
    return RunOutcome(member.run_id, "FINISHED", resumed_from_epoch=member.resumed_from,
                      metrics=dict(state.last_metrics), best_val_psnr=state.best_val_psnr,
                      best_epoch=state.best_epoch)


def _stop(client: Any, member: _Member, err: BaseException) -> None:
    """End a run that did not finish (``_end``)."""
    member.bar.close()
    _end(client, member.claim, member.workdir, err)


def _end(client: Any, claim: _Claim, workdir: Path, err: BaseException) -> None:
    """``_mark`` the run, then remove its temporary folder. Never raises."""
    _mark(client, claim, err)
    shutil.rmtree(workdir, ignore_errors=True)


def _mark(client: Any, claim: _Claim, err: BaseException) -> None:
    """FAILED for a non-finite loss, an unreadable checkpoint or an error; KILLED (resumable)
    for Ctrl-C/SIGTERM, a pruned trial, a full or read-only disk, or another member's lost
    lease; the reason goes in ``stop_reason``; then the lease is released. A run another
    process holds now is left as it is. Never raises: the store itself may be what failed
    (a RUNNING run is resumed once its lease expires)."""
    if claim.holds:
        if isinstance(err, (NonFiniteLossError, CheckpointUnreadableError)):
            status, reason = "FAILED", str(err)
        elif isinstance(err, KeyboardInterrupt):
            status, reason = "KILLED", "interrupted"
        else:
            status = "KILLED" if type(err).__name__ == "TrialPruned" or _storage_full(err) \
                or isinstance(err, RunBusyError) else "FAILED"
            reason = tracking.first_line(err, with_type=True)
        try:
            client.set_tag(claim.run_id, "stop_reason", reason)
            client.set_terminated(claim.run_id, status)
        except Exception:  # noqa: BLE001  (the store is gone: the lease expires by itself)
            claim.lease.stop()
            return
        claim.lease.release(client)
    else:
        claim.lease.stop()


def run_experiment(
    spec: ExperimentSpec,
    *,
    context: RunContext,
    device: str = "cpu",
    data: Data | None = None,
    progress: bool | None = None,
    hooks: Hooks | None = None,
) -> RunOutcome:
    """Train ``spec`` (already profile-resolved) and record it; see the module docstring.
    Raises ``NonFiniteLossError`` when the loss diverges (the run is FAILED) and
    ``RunBusyError`` when another live process trains this (spec, seed)."""
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
        if _storage_full(err):
            raise _storage_error(err, f"run {member.run_id} ({member.claim.name})") from None
        raise


def run_pack(
    specs: list[ExperimentSpec],
    contexts: list[RunContext],
    *,
    device: str,
    data: Data,
    progress: bool | None = None,
) -> list[RunOutcome | NonFiniteLossError | RunBusyError]:
    """Train several runs as packs (``cvae.packed``): one MLflow run per member, logged as if
    it ran alone (same tags, params, metrics per epoch, checkpoints, artifacts).

    Members that are already FINISHED are skipped; resumed members restart from their own
    checkpoints, packed with the members at the same epoch (a pack trains in lockstep).
    Members that cannot be packed with the others (another architecture, optimizer type,
    batch size, ...) train alone. Returns one outcome per spec, in order, or the
    ``NonFiniteLossError`` of a member whose loss turned non-finite (its run is FAILED; the
    others finish), or the ``RunBusyError`` of a member that another live process trains
    (left to it; the others train). Ctrl-C ends every unfinished member KILLED, resumable
    as a pack.
    """
    from mlflow.tracking import MlflowClient

    from cvae.packed import packable

    tracking.configure()
    client = MlflowClient()
    results: list[RunOutcome | NonFiniteLossError | RunBusyError | None] = [None] * len(specs)
    members: dict[int, _Member] = {}
    try:
        for i, (spec, context) in enumerate(zip(specs, contexts)):
            try:
                prepared = _prepare(client, spec, context, device, data, progress=progress,
                                    hooks=None, position=len(members))
            except RunBusyError as err:
                results[i] = err
                continue
            if isinstance(prepared, RunOutcome):
                results[i] = prepared
            else:
                members[i] = prepared[0]
        for pack in _packs(members, packable):
            errors = _train_pack([members[i] for i in pack], data)
            for k, i in enumerate(pack):
                if k in errors:
                    _stop(client, members.pop(i), errors[k])
                    results[i] = errors[k]
                else:  # removed once finished: a failing _finish leaves it to be stopped
                    results[i] = _finish(client, members[i], data)
                    del members[i]
    except BaseException as err:
        for member in members.values():
            _stop(client, member, err)
        if _storage_full(err):
            raise _storage_error(err, "every unfinished run of the pack") from None
        raise
    return [r for r in results if r is not None]


def _train_pack(pack: list[_Member], data: Data) -> dict[int, NonFiniteLossError]:
    """Train the members of one pack (alone when there is one); the non-finite losses, by
    position in the pack (the others trained to the end)."""
    from cvae.packed import PackedNonFiniteLossError, PackedTrainer, fit_packed

    states = [member.state for member in pack]
    configs = [fit_config(member.spec) for member in pack]
    if len(pack) == 1:
        try:
            fit(states[0], data.clips, data.clip_labels, data.val_frames, data.val_labels,
                configs[0], hooks=pack[0].hooks)
        except NonFiniteLossError as err:
            return {0: err}
        return {}
    print(f"packed: {', '.join(member.label for member in pack)} train together from epoch "
          f"{states[0].epoch}", flush=True)
    try:
        fit_packed(PackedTrainer(states, configs), data.clips, data.clip_labels,
                   data.val_frames, data.val_labels, hooks=[member.hooks for member in pack])
    except PackedNonFiniteLossError as err:
        return {k: NonFiniteLossError(
            f"non-finite training loss at epoch {pack[k].state.epoch} (trained in a pack)",
            epoch=pack[k].state.epoch) for k in err.members}
    return {}


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
    if state.model.prior_head is None:
        lab = save_lab_checkpoint(state.model, out / "lab_format.ckpt", lr=spec.optim.lr,
                                  teacher_forcing_ratio=spec.teacher_forcing.ratio,
                                  epoch=state.epoch)
        client.log_artifact(run_id, str(lab), "checkpoints")
    summary = {"final_val_psnr": evaluation.psnr, "copy_first_psnr": float(floor.mean()),
               "best_val_psnr": state.best_val_psnr, "best_epoch": state.best_epoch}
    client.log_text(run_id, json.dumps(summary, indent=2), "summary.json")
