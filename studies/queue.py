"""A grid as an Optuna work queue: each (arm, seed) one enqueued trial; and the worker
processes that every study and tuning command starts the same way (``start_workers``).

Any number of workers on any number of machines take disjoint work from one Optuna study on
PostgreSQL (RDB storage with heartbeats; ``studies.storage`` has the policy). A worker that dies
stops beating; after the grace period the next worker that looks fails its trial, and the retry
callback enqueues a copy, which resumes the same MLflow run from its last checkpoint in the
artifact store (the runner's resume). Every run is filed in one MLflow experiment, created once
here with the study's parent run, so workers need only the storage and the study name.

    # once, anywhere: MLflow experiment + parent run, then the grid (arms x seeds) as trials
    python -m studies.queue coordinate --storage URL --study NAME --ablation kl \\
        --seeds 0 1 2 [--profile cpu] [--epochs N] [--data PATH] [--wait]
    # on every machine, as many as it has devices (MLFLOW_TRACKING_URI = the shared server)
    python -m studies.queue worker --storage URL --study NAME [--device cuda]
    python -m studies.queue status --storage URL --study NAME

URL is a database URL (``postgresql+psycopg2://user:pass@host:5432/optuna`` for several
machines, ``sqlite:///mlruns/optuna.db``) or a journal file ending in ``.journal`` or ``.log``
(several processes on one machine; no heartbeats, so no automatic retry of a killed worker's
pair). Only ``coordinate`` creates a SQLite or journal file; ``worker`` and ``status`` refuse
one that does not exist. Passwords are masked in every message, tag and parameter.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from cvae.train import FitState, Hooks, NonFiniteLossError
from experiments import tracking
from experiments.cli import Parser, cpu_count, guarded, int_at_least, pin_threads, seed_arg
from experiments.registry import ABLATIONS, PROFILES, Arm, get_ablation
from experiments.runner import DEVICES, RunOutcome, duration, pick_device, run_experiment
from experiments.spec import ExperimentSpec, SpecError
from experiments.tracking import RunBusyError, first_line
from studies import storage as storages
from studies.grid import Grid, StudyRun, add_seeds, adopt

SEED_RANGE = (0, 2**31 - 1)  # arms and seeds are fixed params; the distributions only name them
BUSY_POLL = 15.0  # seconds between looks at a pair's run that another live process trains


def say(message: str) -> None:
    print(tracking.mask_secrets(message), flush=True)


# ---------------------------------------------------------------------------------------------
# The queue: a study whose trials are the grid's pairs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Queue:
    """The Optuna study holding the pairs, the grid read back from it, and the MLflow
    experiment and parent run its workers file their runs under."""

    url: str
    study: optuna.Study
    grid: Grid
    experiment_id: str
    parent_run_id: str


def read_queue(url: str, study: optuna.Study) -> Queue:
    """The grid a coordinator stored in the study's user attrs."""
    attrs = study.user_attrs
    missing = [k for k in ("ablation", "profile", "experiment_id", "parent_run_id")
               if k not in attrs]
    if missing:
        what = (f"it is a `python -m studies.tune` study of spec {attrs.get('spec')}, "
                f"profile {attrs.get('profile')}" if "search_space" in attrs
                else f"no {', '.join(missing)} in its user attrs")
        raise SpecError(f"study {study.study_name!r} is not a work queue made by "
                        f"`python -m studies.queue coordinate` ({what})")
    grid = Grid(attrs.get("experiment", study.study_name), get_ablation(attrs["ablation"]),
                tuple(attrs.get("seeds") or (0,)), attrs["profile"], epochs=attrs.get("epochs"),
                data=attrs.get("data"))
    return Queue(url, study, grid, attrs["experiment_id"], attrs["parent_run_id"])


def load_queue(url: str, name: str, beats: storages.Beats | None = None) -> Queue:
    """The queue for the commands that use one but never create it (``worker``, ``status``):
    a SQLite or journal file that does not exist is an error, not created, and so is a study
    that is not a queue. ``beats``: open it with heartbeats and retries."""
    storages.check_url(url)
    nothing = f"no study {name!r} in {tracking.mask_secrets(url)}"
    hint = "create it with `python -m studies.queue coordinate`"
    path = storages.storage_file(url)
    if path is not None and not path.is_file():
        raise SpecError(f"{nothing} (no file {path}); {hint}")
    storage = beating_storage(url, beats) if beats else storages.open_storage(url)
    with storages.storage_errors(url):
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise SpecError(f"{nothing}; {hint}") from None
        return read_queue(url, study)


def coordinate(url: str, name: str, grid: Grid, *, read_data: bool = False,
               beats: storages.Beats = storages.DEFAULT_BEATS, device: str | None = None,
               private: bool = False) -> Queue:
    """Create the MLflow experiment and the parent run once (the studies' own, so a queue and
    ``python -m studies.<name>`` of one configuration share it and its report), then enqueue
    each (arm, seed) once, however many coordinators run at once. A dataset folder is read
    here first: bad data fails before anything exists; the synthetic data too when
    ``read_data`` (workers start on this machine: its cache is made once). The queue comes
    back with ``beats``: a coordinator that waits fails and retries dead workers' pairs.
    ``device``: the parent's ``device`` tag (the local workers'; None when they run
    elsewhere). A ``private`` queue (a temporary file removed at the end) is not named on the
    parent."""
    from experiments.data import load_data
    from studies.grid import open_study

    storages.check_url(url)
    tracking.configure()
    for spec_data in {run.spec.data for run in grid.runs}:
        if read_data or spec_data.source != "synthetic":
            load_data(spec_data, grid.profile)
    with storages.exclusive(url):
        study = _queue_study(url, name, grid, beats)
        client, run = open_study(grid, device=device, runner="queue")
        add_seeds(client, run.parent_run_id, grid.seeds)
        if not private:
            client.set_tag(run.parent_run_id, "optuna_study", name)
            client.set_tag(run.parent_run_id, "optuna_storage", tracking.mask_secrets(url))
        else:
            _forget_gone_queue(client, run.parent_run_id)
        with storages.storage_errors(url):
            counts = _enqueue(study, grid, run)
        if not (counts["waiting"] or counts["running"]):
            close_parent(study, run.parent_run_id)  # nothing new: open_study reopened it
    say(f"study {name}: {len(grid.chosen)} arms x {len(grid.seeds)} seeds queued in {url} "
        f"({counts_line(counts)}); MLflow experiment {run.experiment_id}, parent run "
        f"{run.parent_run_id}")
    return Queue(url, study, grid, run.experiment_id, run.parent_run_id)


def _plan(grid: Grid) -> dict[str, Any]:
    """What a queue's pairs run: stored in its user attrs, the same for every coordinator."""
    return {"ablation": grid.ablation.name, "profile": grid.profile, "epochs": grid.epochs,
            "data": grid.data}


def _queue_study(url: str, name: str, grid: Grid, beats: storages.Beats) -> optuna.Study:
    """The queue's Optuna study, created or loaded; one that queues another plan, or files
    its runs in another tracking store, is refused."""
    with storages.storage_errors(url):
        study = optuna.create_study(storage=beating_storage(url, beats), study_name=name,
                                    direction="maximize", load_if_exists=True)
    attrs, wanted = study.user_attrs, _plan(grid)
    had = {k: attrs.get(k) for k in wanted}
    if "ablation" in attrs and had != wanted:
        raise SpecError(f"study {name!r} already queues {_describe(had)}; this asks for "
                        f"{_describe(wanted)}: use another --study")
    if "ablation" in attrs and \
            attrs.get("experiment_id") != tracking.get_or_create_experiment(grid.study):
        raise tracking.TrackingError(
            f"study {name!r} files its runs in MLflow experiment {attrs['experiment_id']} of "
            "another tracking store; set MLFLOW_TRACKING_URI to the store the study was "
            "created with")
    return study


def _enqueue(study: optuna.Study, grid: Grid, run: StudyRun) -> dict[str, int]:
    """The plan into the study's user attrs, each (arm, seed) enqueued once; the counts."""
    attrs = study.user_attrs
    seeds = sorted(set(attrs.get("seeds") or ()) | set(grid.seeds))
    for key, value in {**_plan(grid), "seeds": seeds, "experiment": grid.study,
                       "experiment_id": run.experiment_id,
                       "parent_run_id": run.parent_run_id}.items():
        if attrs.get(key, ...) != value:
            study.set_user_attr(key, value)
    for pair in grid.runs:
        study.enqueue_trial({"arm": pair.arm.name, "seed": pair.seed}, skip_if_exists=True)
    return pair_states(study)


def _forget_gone_queue(client: Any, parent_run_id: str) -> None:
    """Remove the parent's ``optuna_storage`` and ``optuna_study`` tags when the file they
    name is gone (an earlier version tagged its private temporary queue)."""
    tags = client.get_run(parent_run_id).data.tags
    path = storages.storage_file(tags["optuna_storage"]) if "optuna_storage" in tags else None
    if path is not None and not path.exists():
        for key in ("optuna_storage", "optuna_study"):
            if key in tags:
                client.delete_tag(parent_run_id, key)


def _describe(attrs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in attrs.items())


def _pair(trial: FrozenTrial) -> tuple[str, int] | None:
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    if "arm" not in params or "seed" not in params:
        return None
    return str(params["arm"]), int(params["seed"])


def pair_states(study: optuna.Study) -> dict[str, int]:
    """Pairs (arm, seed) by their most advanced trial: complete > running > waiting > failed."""
    rank = {TrialState.COMPLETE: 4, TrialState.RUNNING: 3, TrialState.WAITING: 2,
            TrialState.FAIL: 1, TrialState.PRUNED: 1}
    names = {4: "complete", 3: "running", 2: "waiting", 1: "failed"}
    best: dict[tuple[str, int], int] = {}
    for trial in study.get_trials(deepcopy=False):
        pair = _pair(trial)
        if pair is not None:
            best[pair] = max(best.get(pair, 0), rank[trial.state])
    counts = dict.fromkeys(names.values(), 0)
    for value in best.values():
        counts[names[value]] += 1
    return counts


def counts_line(counts: dict[str, int]) -> str:
    return (f"{counts['complete']}/{sum(counts.values())} complete, {counts['running']} "
            f"running, {counts['waiting']} waiting, {counts['failed']} failed")


def epochs_done(study: optuna.Study) -> int:
    """Finished epochs over the study's pairs (a pair counts its furthest trial)."""
    best: dict[tuple[str, int], int] = {}
    for trial in study.get_trials(deepcopy=False):
        pair = _pair(trial)
        if pair is not None:
            best[pair] = max(best.get(pair, 0), int(trial.user_attrs.get("epochs_done", 0)))
    return sum(best.values())


def close_parent(study: optuna.Study, parent_run_id: str) -> None:
    """The last one out ends the parent run (several may try; ending it twice is harmless)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(parent_run_id).info.status == "RUNNING":
        counts = pair_states(study)
        client.set_tag(parent_run_id, "pairs", counts_line(counts))
        client.set_terminated(parent_run_id, "FINISHED" if counts["failed"] == 0 else "FAILED")


def wait(queue: Queue, *, workers: Sequence[subprocess.Popen] = (), poll: float = 2.0,
         progress: bool | None = None) -> dict[str, int]:
    """Poll until no pair waits or runs (a bar over the pairs' epochs on a terminal, a line
    whenever the counts change otherwise); with local ``workers``, stop too once they have
    all exited (nobody is left to take the waiting pairs). Without local workers a dead remote
    worker's trial is failed here after the grace period. Returns the pair counts by state."""
    from tqdm.auto import tqdm

    study, url, started = queue.study, queue.url, time.monotonic()
    retry = LoggedRetry(me=me(), max_retry=storages.MAX_RETRY)
    enabled = sys.stderr.isatty() if progress is None else progress
    total = queue.grid.epochs_each * len(pair_list(study))
    bar = tqdm(total=total, desc=study.study_name, unit="epoch", disable=not enabled,
               dynamic_ncols=True)
    last = ""
    try:
        while True:
            with storages.storage_errors(url):
                if not workers:
                    optuna.storages.fail_stale_trials(study)
                requeue_dead(study, retry)
                counts, done = pair_states(study), epochs_done(study)
            bar.update(max(0, min(done, total) - bar.n))
            bar.set_postfix(running=counts["running"], waiting=counts["waiting"],
                            complete=counts["complete"], refresh=False)
            if not enabled and counts_line(counts) != last:
                last = counts_line(counts)
                say(f"study {study.study_name}: {last}{_eta(done, total, started)}")
            if counts["waiting"] == 0 and counts["running"] == 0:
                return counts
            if workers and all(w.poll() is not None for w in workers):
                return counts
            time.sleep(poll)
    finally:
        bar.close()


def _eta(done: int, total: int, started: float) -> str:
    """`` · 40% of the epochs · study ETA 9 min`` from the epochs done since ``started``."""
    if not (0 < done < total):
        return ""
    elapsed = time.monotonic() - started
    return (f" · {done / total:.0%} of the epochs · study ETA "
            f"{duration(elapsed / done * (total - done))}")


def pair_list(study: optuna.Study) -> set[tuple[str, int]]:
    return {p for t in study.get_trials(deepcopy=False) if (p := _pair(t)) is not None}


# ---------------------------------------------------------------------------------------------
# Taking trials: heartbeats, retries, claims (shared with studies.tune)
# ---------------------------------------------------------------------------------------------
class Heartbeat:
    """Beats for one trial on a thread while it runs (``Study.optimize`` does this itself;
    the ask/tell style used here must do it). Each beat also runs ``check``: the look for
    dead workers' trials, so that a worker busy with a long pair still puts a dead one's back
    in the queue within about grace + heartbeat (at once for a process of this host)."""

    def __init__(self, storage: BaseStorage, trial_id: int, interval: int | None,
                 check: Callable[[], None] | None = None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.check = check
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")

    def __enter__(self) -> None:
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
                if self.check is not None:
                    self.check()
            except Exception as err:  # noqa: BLE001  (a database blip: the next beat retries)
                say(f"heartbeat for trial id {self.trial_id} failed: {first_line(err)}")


class LoggedRetry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial (a WAITING copy with the same params),
    saying what it does; ``requeue`` applies it to a trial this worker stopped itself."""

    def __init__(self, *, me: str, max_retry: int | None) -> None:
        super().__init__(max_retry=max_retry)
        self.me = me

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.requeue(study, trial, "stopped beating: its worker is gone")

    def requeue(self, study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
        history = trial.system_attrs.get("retry_history", [])
        pair = _pair(trial)
        what = f"{pair[0]} seed {pair[1]}" if pair else str(trial.params)
        if self._max_retry is not None and len(history) >= self._max_retry:
            say(f"worker {self.me}: trial {trial.number} ({what}) {reason}; retried "
                f"{len(history)} times already: left FAILED")
        else:
            say(f"worker {self.me}: trial {trial.number} ({what}) {reason}; marked FAIL and "
                "enqueued for retry")
        super().__call__(study, trial)


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_here(study: optuna.Study, **attrs: Any) -> list[FrozenTrial]:
    """RUNNING trials whose worker was a process of this host that is gone (SIGKILL): found
    at once, heartbeats or not (a journal has none), given the user ``attrs`` and failed
    here (not those another process failed first)."""
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if tracking.owner_gone(trial.user_attrs.get("worker", "")):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                for key, value in {"stop_reason": "its worker process is gone", **attrs}.items():
                    study._storage.set_trial_user_attr(trial._trial_id, key, value)
                if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    found.append(study._storage.get_trial(trial._trial_id))
    return found


def requeue_dead(study: optuna.Study, retry: LoggedRetry) -> None:
    """Each pair whose worker here was killed goes back in the queue (its run resumes)."""
    for trial in dead_here(study):
        retry.requeue(study, trial, "lost its worker process (killed)")


def beating_storage(url: str, beats: storages.Beats) -> BaseStorage:
    """``url``'s storage with heartbeats, stale checks and retries (a journal has none)."""
    if storages.is_journal(url):
        return storages.open_storage(url)
    return storages.open_storage(url, heartbeat=beats.heartbeat, grace=beats.grace,
                                 on_stale=LoggedRetry(me=me(), max_retry=beats.max_retry))


def pop_waiting(study: optuna.Study, *, heartbeat: bool = False) -> int | None:
    """Claim the oldest WAITING trial (WAITING -> RUNNING succeeds for exactly one worker),
    as ``study.ask()`` does, except that it never creates a new trial when the queue is
    empty: a worker must not invent pairs outside the grid."""
    storage = study._storage  # the study's own (cached) storage, which must see the claim
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                if heartbeat:
                    # At once: a RUNNING trial that never beat is never found stale, so a
                    # worker dying before its first beat would hold the pair forever.
                    storage.record_heartbeat(trial._trial_id)
                return trial._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def tell(study: optuna.Study, trial: optuna.Trial, state: TrialState,
         value: float | None = None) -> bool:
    """Tell the result; False when a stale check failed this trial meanwhile (we were
    presumed dead: the retry owns the trial now)."""
    try:
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        say(f"worker {me()}: trial {trial.number} was failed meanwhile by a stale check "
            "(no heartbeat within the grace period); its retry owns it")
        return False
    return True


@contextlib.contextmanager
def requeue_on_error(study: optuna.Study, trial: optuna.Trial, retry: LoggedRetry) -> Iterator[None]:
    """Any error but a result (a non-finite loss, a pruned trial) or Ctrl-C/SIGTERM: the trial
    is FAIL with its ``stop_reason`` and a copy goes back in the queue, then it re-raises."""
    try:
        yield
    except (NonFiniteLossError, optuna.TrialPruned):
        raise
    except BaseException as err:
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else first_line(err)
        with contextlib.suppress(Exception):
            trial.set_user_attr("stop_reason", reason)
            if tell(study, trial, TrialState.FAIL):
                retry.requeue(study, study._storage.get_trial(trial._trial_id), reason)
        raise


# ---------------------------------------------------------------------------------------------
# A grid worker
# ---------------------------------------------------------------------------------------------
class EpochsDone(Hooks):
    """Records a trial's finished epochs (user attr ``epochs_done``) for progress displays."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_epoch_end(self, state: FitState) -> None:
        with contextlib.suppress(Exception):  # progress only: never fail a run over it
            self.trial.set_user_attr("epochs_done", int(state.epoch))


@dataclass
class Worker:
    """One process taking (arm, seed) trials from a queue (``serve``)."""

    url: str
    queue: Queue
    device: str
    data: dict[Any, Any]
    heartbeat: int | None
    retry: LoggedRetry
    completed: int = 0
    failed: int = 0

    def serve(self, *, linger: bool, poll: float) -> None:
        """Take trials until none waits (and, with ``linger``, none runs elsewhere: a dead
        worker's pair comes back after the grace period and is taken here)."""
        study = self.queue.study
        while True:
            with storages.storage_errors(self.url):
                self.look()
                trial_id = pop_waiting(study, heartbeat=bool(self.heartbeat))
                if trial_id is None:
                    if linger and pair_states(study)["running"] > 0:
                        time.sleep(poll)
                        continue
                    return
            self.run(trial_id)

    def look(self) -> None:
        """Dead workers' pairs back in the queue: stale heartbeats, processes here gone."""
        optuna.storages.fail_stale_trials(self.queue.study)
        requeue_dead(self.queue.study, self.retry)

    def run(self, trial_id: int) -> None:
        """One pair: a complete trial carries the final val PSNR; a non-finite loss is a
        result (FAIL with a ``stop_reason``, not retried); any other error or Ctrl-C/SIGTERM
        puts the pair back in the queue and stops this worker."""
        queue, study = self.queue, self.queue.study
        with storages.storage_errors(self.url):
            trial = optuna.Trial(study, trial_id)
            name = trial.suggest_categorical("arm", [a.name for a in queue.grid.ablation.arms])
            seed = trial.suggest_int("seed", *SEED_RANGE)
            origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(
                study._storage.get_trial(trial_id))
        again = f" (retry of trial {origin})" if origin is not None else ""
        say(f"worker {me()}: trial {trial.number}: {name} seed {seed}{again}")
        started = time.monotonic()
        with Heartbeat(study._storage, trial_id, self.heartbeat, self.look), \
                requeue_on_error(study, trial, self.retry):
            try:
                trial.set_user_attr("worker", me())
                arm = queue.grid.arm(name)
                spec = queue.grid.spec(arm, seed)
                outcome = self.train(trial, arm, spec)
            except NonFiniteLossError as err:
                trial.set_user_attr("stop_reason", first_line(err))
                tell(study, trial, TrialState.FAIL)
                self.failed += 1
                say(f"worker {me()}: trial {trial.number}: {name} seed {seed} FAILED: "
                    f"{first_line(err)} (a result: not retried)")
                return
        if outcome.skipped:  # finished earlier outside the queue: file it under this parent
            from mlflow.tracking import MlflowClient

            adopt(MlflowClient(), outcome.run_id, queue.parent_run_id)
        value = outcome.metrics.get("val/psnr", outcome.best_val_psnr)
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        trial.set_user_attr("epochs_done", spec.train.epochs)
        tell(study, trial, TrialState.COMPLETE, value)
        self.completed += 1
        what = "reused" if outcome.skipped else f"{time.monotonic() - started:.0f} s"
        say(f"worker {me()}: trial {trial.number}: {name} seed {seed} done: val/psnr "
            f"{value:.2f} dB (run {outcome.run_id}, {what})")


    def train(self, trial: optuna.Trial, arm: Arm, spec: ExperimentSpec) -> RunOutcome:
        """The pair's run. Another live process training it (a worker presumed dead whose
        trial was retried, but which still beats its run's lease): wait for it to finish or
        to die, then reuse or resume the run, holding the pair meanwhile."""
        queue = self.queue
        context = queue.grid.context(arm, experiment_id=queue.experiment_id,
                                     parent_run_id=queue.parent_run_id,
                                     optuna_study=queue.study.study_name,
                                     optuna_trial=str(trial.number))
        while True:
            try:
                return run_experiment(spec, device=self.device, data=self.data[spec.data],
                                      progress=False, hooks=EpochsDone(trial), context=context)
            except RunBusyError as err:
                say(f"worker {me()}: trial {trial.number}: {first_line(err)}; waiting")
                time.sleep(BUSY_POLL)


def run_worker(url: str, name: str, *, device: str | None = None,
               beats: storages.Beats = storages.DEFAULT_BEATS, linger: bool = True,
               poll: float = 2.0) -> Worker:
    """Serve the queue ``name`` until it is empty; the plan (ablation, profile, epochs, MLflow
    experiment and parent run) comes from the queue. Journals have no heartbeats."""
    from mlflow.tracking import MlflowClient

    from experiments.data import load_data

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per resume
    queue = load_queue(url, name, beats)
    heartbeat = None if storages.is_journal(url) else beats.heartbeat
    retry = LoggedRetry(me=me(), max_retry=beats.max_retry)
    device = pick_device(device)
    tracking.configure()
    _require_experiment(MlflowClient(), queue.experiment_id, queue.grid.study)
    data: dict[Any, Any] = {}  # once per worker, before any trial: bad data fails here
    for arm in queue.grid.ablation.arms:
        spec = queue.grid.spec(arm, 0)
        if spec.data not in data:
            data[spec.data] = load_data(spec.data, queue.grid.profile)
    say(f"worker {me()}: study {name} ({queue.grid.ablation.name}, profile "
        f"{queue.grid.profile}) on {device}; heartbeat {heartbeat or 'off'}")
    worker = Worker(url, queue, device, data, heartbeat, retry)
    worker.serve(linger=linger, poll=poll)
    with storages.storage_errors(url):
        counts = pair_states(queue.study)
        if counts["waiting"] == 0 and counts["running"] == 0:
            close_parent(queue.study, queue.parent_run_id)
    say(f"worker {me()}: queue empty; {worker.completed} completed, {worker.failed} failed "
        f"here ({counts_line(counts)} in the study)")
    return worker


def _require_experiment(client: Any, experiment_id: str, name: str) -> None:
    """The study's experiment (id and ``name``) must be in this worker's tracking store (a
    worker pointed at another store would file its runs under someone else's experiment id,
    or fail late)."""
    from mlflow.exceptions import MlflowException

    try:
        experiment = client.get_experiment(experiment_id)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST on most stores
        experiment = None
    if experiment is None or experiment.name != name:
        raise tracking.TrackingError(
            f"MLflow experiment {experiment_id} ({name!r}) is not in "
            f"{tracking.mask_secrets(tracking.tracking_uri())}: set MLFLOW_TRACKING_URI to the "
            "store the study was created with")


# ---------------------------------------------------------------------------------------------
# Worker processes on this machine (the study commands and studies.tune)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def workers(module: str, argv: Sequence[Sequence[str]], *, threads: int,
            storage: str) -> Iterator[list[subprocess.Popen]]:
    """``python -m MODULE ARGV[i]`` for each i, with ``threads`` torch threads each, this
    process's tracking store, and the ``storage`` URL in their environment (never on a command
    line: ``ps`` shows those to every user). Their output goes through this process, above
    its progress bar. On any exception (Ctrl-C reached them too) they are terminated
    (SIGTERM: each ends its run KILLED, resumable) before it propagates."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "OMP_NUM_THREADS": str(threads), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           storages.ENV_URL: storage}
    env.pop(storages.ENV_FILE, None)
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1)
             for args in argv]
    relays = [threading.Thread(target=_relay, args=(stream, out), daemon=True)
              for proc in procs for stream, out in ((proc.stdout, sys.stdout),
                                                    (proc.stderr, sys.stderr))]
    for relay in relays:
        relay.start()
    try:
        yield procs
        for proc in procs:
            proc.wait()
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait()
        raise
    finally:
        for relay in relays:
            relay.join(timeout=5)


def _relay(stream: Any, out: Any) -> None:
    """A worker's lines, printed above this process's progress bar (``tqdm.write``)."""
    from tqdm.auto import tqdm

    for line in stream:
        tqdm.write(line.rstrip("\n"), file=out)


@dataclass(frozen=True)
class Queueing:
    """How a study uses a work queue: ``storage`` None is a private journal file, removed at
    the end (several processes on this machine); a URL is a shared queue (PostgreSQL for
    several machines). ``wait`` off: return once the pairs are queued."""

    storage: str | None = None
    name: str | None = None  # the Optuna study (default: the study's name)
    wait: bool = True
    beats: storages.Beats = storages.DEFAULT_BEATS


def run_queued(grid: Grid, how: Queueing, *, device: str, jobs: int,
               progress: bool | None = None) -> StudyRun | None:
    """Run the grid through a work queue with ``jobs`` worker processes here; other
    machines' workers (``--worker`` with the same storage) take pairs too, and ``jobs`` 0
    leaves all the work to them. Returns None when ``how.wait`` is off."""
    import tempfile

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = how.name or grid.study
    with contextlib.ExitStack() as stack:
        own = how.storage is None
        url = f"{stack.enter_context(tempfile.TemporaryDirectory(prefix='cvae-queue-'))}" \
              "/queue.log" if own else how.storage
        queue = coordinate(url, name, grid, read_data=jobs > 0, beats=how.beats,
                           device=device if jobs > 0 else None, private=own)
        if not how.wait:
            return None
        threads = max(1, cpu_count() // max(jobs, 1)) if device == "cpu" else 1
        if jobs > 0:
            say(f"{grid.study}: {jobs} worker process(es) here, {threads} thread(s) each")
        elif not own:
            say(f"{grid.study}: waiting for workers: on each machine, this command with "
                f"--worker (the same storage, in ${storages.ENV_URL})")
        argv = [["worker", "--study", name, "--device", device, "--threads", str(threads),
                 "--heartbeat", str(how.beats.heartbeat), "--grace", str(how.beats.grace)]]
        try:
            with workers("studies.queue", argv * jobs, threads=threads, storage=url) as procs:
                # Our own queue: once its workers have exited nobody else will take a pair.
                # A shared one: workers elsewhere may, so only the queue's counts say.
                counts = wait(queue, workers=procs if own else (), progress=progress)
        except BaseException:
            if own:
                close_parent_run(queue.parent_run_id, "KILLED")
            raise
    ran = StudyRun(grid.study, queue.experiment_id, queue.parent_run_id)
    if counts["failed"]:
        ran.failures.append(f"{counts['failed']} pair(s) failed (see the worker lines above)")
    stuck = counts["waiting"] + counts["running"]
    if stuck:
        ran.failures.append(f"{stuck} pair(s) not done: every worker here exited "
                            f"(codes {[p.returncode for p in procs]})")
    return ran


def close_parent_run(run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


# ---------------------------------------------------------------------------------------------
# Status and command line
# ---------------------------------------------------------------------------------------------
def status_table(url: str, name: str) -> str:
    queue = load_queue(url, name)
    with storages.storage_errors(url):
        lines = [f"{'trial':>5}  {'arm':<24} {'seed':>4}  {'state':<8} {'val/psnr':>8}  worker"]
        for t in queue.study.get_trials(deepcopy=False):
            arm, seed = _pair(t) or ("?", -1)
            value = f"{t.value:.2f}" if t.value is not None else "-"
            retry = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
            note = f"  (retry of {retry})" if retry is not None else ""
            lines.append(f"{t.number:>5}  {arm:<24} {seed:>4}  {t.state.name:<8} {value:>8}  "
                         f"{t.user_attrs.get('worker', '')}{note}")
        lines.append(counts_line(pair_states(queue.study)))
    return "\n".join(lines)


_positive_int = int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m studies.queue", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{coordinate,worker,status}", parser_class=Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--storage", default=None, metavar="URL",
                       help="Optuna storage: postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB, "
                            "sqlite:///PATH, or a journal file PATH.journal or PATH.log "
                            f"(default: ${storages.ENV_URL}, or the file ${storages.ENV_FILE})")
        p.add_argument("--study", required=True, metavar="NAME",
                       help="the Optuna study, also the MLflow experiment and `study` tag")

    p_coord = sub.add_parser("coordinate", help="create the MLflow experiment and parent run, "
                                                "enqueue arms x seeds")
    common(p_coord)
    p_coord.add_argument("--ablation", required=True, choices=list(ABLATIONS),
                         help="which registered ablation")
    p_coord.add_argument("--seeds", type=seed_arg, nargs="+", default=[0, 1, 2],
                         help="default: 0 1 2")
    p_coord.add_argument("--profile", choices=PROFILES, default="cpu",
                         help="smoke | cpu | full (default: cpu)")
    p_coord.add_argument("--epochs", type=_positive_int, default=None,
                         help="override the profile's epochs")
    p_coord.add_argument("--data", default=None, metavar="PATH",
                         help="a lab-layout folder, the same path on every worker "
                              "(default: the synthetic dance data)")
    p_coord.add_argument("--wait", action="store_true",
                         help="poll until every pair is done, printing progress")
    p_coord.add_argument("--poll", type=float, default=5.0, help="seconds between polls")

    p_work = sub.add_parser("worker", help="take (arm, seed) trials until the queue is empty")
    common(p_work)
    p_work.add_argument("--device", choices=DEVICES, default=None,
                        help="default: cuda > mps > cpu")
    storages.add_flags(p_work)
    p_work.add_argument("--max-retry", type=int, default=storages.MAX_RETRY,
                        help=f"retries of a pair whose worker died (default: "
                             f"{storages.MAX_RETRY})")
    p_work.add_argument("--poll", type=float, default=2.0,
                        help="seconds between looks while others run (default: 2)")
    p_work.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: the cores this process may use)")
    p_work.add_argument("--no-linger", dest="linger", action="store_false",
                        help="exit as soon as nothing is waiting, instead of staying until "
                             "the pairs running elsewhere are done (to take over a dead "
                             "worker's pair)")

    p_status = sub.add_parser("status", help="the study's trials and pair counts")
    common(p_status)
    return parser


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = storages.given(args.storage)
    if url is None:
        raise SpecError(f"give --storage URL, or set ${storages.ENV_URL} (or "
                        f"${storages.ENV_FILE}, a file only you can read)")
    if args.command == "coordinate":
        grid = Grid(args.study, get_ablation(args.ablation), tuple(args.seeds), args.profile,
                    epochs=args.epochs, data=args.data)  # described by its ablation
        queue = coordinate(url, args.study, grid)
        if not args.wait:
            return 0
        counts = wait(queue, poll=args.poll, progress=False)
        close_parent(queue.study, queue.parent_run_id)
        return 1 if counts["failed"] else 0
    if args.command == "worker":
        beats = storages.Beats(args.heartbeat, args.grace, args.max_retry)
        pin_threads(args.threads)
        worker = run_worker(url, args.study, device=args.device, beats=beats,
                            linger=args.linger, poll=args.poll)
        return 1 if worker.failed else 0
    print(status_table(url, args.study))
    return 0


if __name__ == "__main__":
    sys.exit(main())
