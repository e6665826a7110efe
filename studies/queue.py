"""An ablation grid as an Optuna work queue: each (arm, seed) one enqueued trial.

Any number of workers on any number of machines take disjoint work from one Optuna study on
PostgreSQL (RDB storage with heartbeats). A worker that dies stops beating; after the grace
period the next worker that looks fails its trial, and the retry callback enqueues a copy,
which resumes the same MLflow run from its last checkpoint in the artifact store (the
runner's resume). Every run is filed in one MLflow experiment, created once here together
with the study's parent run, so workers need only the storage URL and the study name.

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
import fcntl
import hashlib
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from cvae.train import FitState, Hooks, NonFiniteLossError
from experiments import tracking
from experiments.cli import guarded, int_at_least, seed_arg
from experiments.registry import ABLATIONS, PROFILES, Ablation, get_ablation
from experiments.runner import DEVICES, RunContext, pick_device, run_experiment
from experiments.spec import ExperimentSpec, SpecError
from studies.common import config_key, parent_run, resolve_arm, select_arms
from studies.results import PARENT_ID_TAG
from studies.tuning import check_storage_kind, is_journal

# Arms and seeds are fixed params of enqueued trials; the distributions only name them.
SEED_RANGE = (0, 2**31 - 1)
# One advisory-lock key for every coordinator of every study: enqueueing is quick, and the
# same lock also covers the creation of Optuna's tables in a fresh database.
LOCK_NAME = "cvae-ablate.studies.queue"
LOCK_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big", signed=True)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def say(message: str) -> None:
    print(tracking.mask_secrets(message), flush=True)


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------
def _check_url(url: str) -> None:
    check_storage_kind(url)
    if not is_journal(url):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(url)
        except (ArgumentError, ValueError) as err:  # ValueError: a port that is not a number
            raise SpecError(f"--storage {tracking.mask_secrets(url)!r} is not a valid database "
                            f"URL ({_first_line(err)})") from None
    path = _storage_file(url)
    if path is not None and not path.resolve().parent.is_dir():
        raise SpecError(f"--storage {url}: folder {path.resolve().parent} does not exist")


def _storage_file(url: str) -> Path | None:
    """The journal or SQLite file of a checked ``url``; None for a database server or an
    in-memory SQLite database."""
    if is_journal(url):
        return Path(url).expanduser()
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).expanduser()
    return None


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Database failures become one-line ``TrackingError``s naming the (masked) storage."""
    from sqlalchemy.exc import DBAPIError, NoSuchModuleError, SQLAlchemyError

    where = f"optuna storage {tracking.mask_secrets(url)}"
    try:
        yield
    except NoSuchModuleError as err:
        raise SpecError(f"{where}: unknown database kind ({_first_line(err)})") from None
    except ModuleNotFoundError as err:
        hint = " (SQLAlchemy 2.1 reads postgresql:// as psycopg 3; write postgresql+psycopg2://)" \
            if "psycopg" in str(err) else ""
        raise tracking.TrackingError(f"{where}: no driver: {err}{hint}") from None
    except DBAPIError as err:
        raise tracking.TrackingError(f"{where} unreachable: {_first_line(err.orig or err)}") \
            from None
    except SQLAlchemyError as err:
        raise tracking.TrackingError(f"{where}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return tracking.mask_secrets(text.splitlines()[0] if text else type(err).__name__)


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # several local processes wait for the lock
    return {"pool_pre_ping": True}


def open_storage(url: str, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None,
                 on_stale: Any | None = None) -> BaseStorage:
    """An Optuna storage for ``url``; heartbeats need a database (RDB) storage."""
    _check_url(url)
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(Path(url).expanduser())))
    with storage_errors(url):
        return RDBStorage(url, engine_kwargs=_engine_kwargs(url),
                          heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                          heartbeat_stale_trial_callback=on_stale)


def load_queue(url: str, study_name: str, **options: Any) -> tuple[optuna.Study, Plan]:
    """The queue's study and its plan, for the commands that use a queue but never create one
    (``worker``, ``status``): a SQLite or journal file that does not exist is an error, not
    created, and so is a study that is not a queue; ``options`` go to ``open_storage``."""
    _check_url(url)
    nothing = f"no study {study_name!r} in {tracking.mask_secrets(url)}"
    hint = "create it with `python -m studies.queue coordinate`"
    path = _storage_file(url)
    if path is not None and not path.is_file():
        raise SpecError(f"{nothing} (no file {path}); {hint}")
    storage = open_storage(url, **options)
    with storage_errors(url):
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            raise SpecError(f"{nothing}; {hint}") from None
        return study, Plan.from_study(study)


@contextlib.contextmanager
def grid_lock(url: str) -> Iterator[None]:
    """Serialise coordinators: ``enqueue_trial(skip_if_exists=True)`` looks, then inserts, so
    two coordinators starting together can both insert the same (arm, seed).

    PostgreSQL: a session advisory lock; MySQL: ``GET_LOCK``; SQLite and journal files (one
    machine): ``flock`` on a file beside the database; in-memory SQLite: nothing to share.
    """
    if is_journal(url) or url.startswith("sqlite"):
        path = _storage_file(url)
        if path is None:
            yield
            return
        # Not "<path>.lock": Optuna's journal file lock uses that name itself.
        with open(f"{path}.grid-lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    import sqlalchemy

    with storage_errors(url):
        engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
        connection = engine.connect()
    try:
        with storage_errors(url):
            if engine.dialect.name == "postgresql":
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                                   {"key": LOCK_KEY})
            elif engine.dialect.name in ("mysql", "mariadb"):
                connection.execute(sqlalchemy.text("SELECT GET_LOCK(:name, 600)"),
                                   {"name": LOCK_NAME})
        yield
    finally:
        connection.close()  # ends the session, and with it a session-level lock
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What every trial of the study runs: stored in the study's user attrs by the
    coordinator, read back by workers."""

    ablation: str
    profile: str
    epochs: int | None
    data: str | None
    experiment_id: str
    parent_run_id: str
    experiment: str = ""  # the MLflow experiment's name (the runs' `study` tag)

    def spec(self, arm_name: str, seed: int) -> tuple[ExperimentSpec, str]:
        """(the resolved spec, its group) for one pair."""
        ablation = get_ablation(self.ablation)
        arm = next((a for a in ablation.arms if a.name == arm_name), None)
        if arm is None:
            raise SpecError(f"ablation {self.ablation!r} has no arm {arm_name!r}; arms: "
                            f"{', '.join(a.name for a in ablation.arms)}")
        spec = resolve_arm(arm, profile=self.profile, seed=seed, epochs=self.epochs,
                           data=self.data)
        return spec, arm.group

    @classmethod
    def from_study(cls, study: optuna.Study) -> Plan:
        attrs = study.user_attrs
        missing = [k for k in ("ablation", "profile", "experiment_id", "parent_run_id")
                   if k not in attrs]
        if missing:
            what = (f"it is a `python -m studies.tune` study of spec {attrs.get('spec')}, "
                    f"profile {attrs.get('profile')}" if "search_space" in attrs
                    else f"no {', '.join(missing)} in its user attrs")
            raise SpecError(f"study {study.study_name!r} is not a work queue made by "
                            f"`python -m studies.queue coordinate` ({what})")
        return cls(attrs["ablation"], attrs["profile"], attrs.get("epochs"), attrs.get("data"),
                   attrs["experiment_id"], attrs["parent_run_id"],
                   attrs.get("experiment", study.study_name))


def enqueue_grid(storage: str | BaseStorage, study_name: str, arms: Sequence[str],
                 seeds: Sequence[int]) -> optuna.Study:
    """Create (or load) the study and enqueue each (arm, seed) once, however many processes
    call this at the same time (the lock makes ``skip_if_exists`` look-then-insert atomic)."""
    url = storage if isinstance(storage, str) else getattr(storage, "url", None)
    with grid_lock(url) if url else contextlib.nullcontext():
        if isinstance(storage, str):
            storage = open_storage(storage)
        with storage_errors(url or ""):
            study = optuna.create_study(storage=storage, study_name=study_name,
                                        direction="maximize", load_if_exists=True)
            _enqueue(study, arms, seeds)
    return study


def _enqueue(study: optuna.Study, arms: Sequence[str], seeds: Sequence[int]) -> None:
    for seed in seeds:
        for arm in arms:
            study.enqueue_trial({"arm": arm, "seed": int(seed)}, skip_if_exists=True)


def coordinate(storage_url: str, study_name: str, *, ablation: str, seeds: Sequence[int],
               profile: str, epochs: int | None = None, data: str | None = None,
               wait: bool = False, poll_interval: float = 5.0,
               arms: Sequence[str] | None = None, doc: str | None = None,
               experiment: str | None = None, read_synthetic: bool = False) -> Coordinated:
    """Create the MLflow experiment (``experiment``, default: named after the study) and the
    parent run once, enqueue
    the grid (``arms``: a subset of the ablation's, default all), then return, or with
    ``wait`` poll until no pair is waiting or running. Returns the pair counts by state (see
    ``pair_states``) with the experiment and parent run ids."""
    from mlflow.tracking import MlflowClient

    abl = get_ablation(ablation)
    chosen = [a.name for a in select_arms(abl, arms)]
    if not seeds:
        raise SpecError("--seeds needs at least one seed")
    if any(s < 0 for s in seeds):
        raise SpecError(f"--seeds {' '.join(map(str, seeds))}: seeds must be >= 0")
    draft = Plan(ablation, profile, epochs, data, "", "")
    for arm in abl.arms:  # every spec resolves (bad epochs, profile) before anything exists
        resolved_epochs = draft.spec(arm.name, seeds[0])[0].train.epochs
    _check_url(storage_url)
    # A dataset folder is read here first: bad data fails before anything exists, not in
    # every worker, and its decoded cache is made once. The synthetic data cannot be bad; it
    # is made here too when ``read_synthetic`` (workers are about to start on this machine).
    from experiments.data import load_data

    for spec_data in {draft.spec(name, seeds[0])[0].data for name in chosen}:
        if read_synthetic or spec_data.source != "synthetic":
            load_data(spec_data, profile)
    tracking.configure()
    wanted = {"ablation": ablation, "profile": profile, "epochs": epochs, "data": data}
    with grid_lock(storage_url):
        storage = open_storage(storage_url)
        with storage_errors(storage_url):
            study = optuna.create_study(storage=storage, study_name=study_name,
                                        direction="maximize", load_if_exists=True)
            attrs = study.user_attrs
        experiment = experiment or study_name
        experiment_id = tracking.get_or_create_experiment(experiment)
        client = MlflowClient()
        if "ablation" in attrs:
            had = {k: attrs.get(k) for k in wanted}
            if had != wanted:
                raise SpecError(f"study {study_name!r} already queues {_describe(had)}; "
                                f"this asks for {_describe(wanted)}: use another --study")
            if attrs.get("experiment_id") != experiment_id:
                raise tracking.TrackingError(
                    f"study {study_name!r} files its runs in MLflow experiment "
                    f"{attrs.get('experiment_id')} of another tracking store; set "
                    "MLFLOW_TRACKING_URI to the store the study was created with")
        # The studies' own parent run (studies.common): one per configuration, so a queue
        # and `python -m studies.<name>` of the same configuration share it and its report.
        key = config_key(experiment, abl, profile=profile, epochs=epochs, data=data)
        parent_run_id = parent_run(client, experiment_id, experiment, abl, profile=profile,
                                   device="queue", epochs=resolved_epochs, data=data, key=key,
                                   doc=doc or __doc__)
        old_seeds = client.get_run(parent_run_id).data.tags.get("seeds", "").split()
        client.set_tag(parent_run_id, "seeds", " ".join(
            str(s) for s in sorted({int(s) for s in old_seeds} | set(seeds))))
        client.set_tag(parent_run_id, "optuna_study", study_name)
        client.set_tag(parent_run_id, "optuna_storage", tracking.mask_secrets(storage_url))
        with storage_errors(storage_url):
            for key, value in {**wanted, "experiment_id": experiment_id,
                               "parent_run_id": parent_run_id,
                               "experiment": experiment}.items():
                if attrs.get(key, ...) != value:
                    study.set_user_attr(key, value)
            _enqueue(study, chosen, seeds)
            counts = pair_states(study)
        if not (counts["waiting"] or counts["running"]):
            _close_parent(study, parent_run_id)  # nothing new: parent_run opened it again
    say(f"study {study_name}: {len(chosen)} arms x {len(seeds)} seeds queued in "
        f"{storage_url} ({_counts_line(counts)}); MLflow experiment {experiment_id}, "
        f"parent run {parent_run_id}")
    if not wait:
        return Coordinated(counts, experiment_id, parent_run_id)
    last = ""
    while True:
        with storage_errors(storage_url):
            optuna.storages.fail_stale_trials(study)
            counts = pair_states(study)
        line = _counts_line(counts)
        if line != last:
            say(f"study {study_name}: {line}")
            last = line
        if counts["waiting"] == 0 and counts["running"] == 0:
            _close_parent(study, parent_run_id)
            return Coordinated(counts, experiment_id, parent_run_id)
        time.sleep(poll_interval)


@dataclass(frozen=True)
class Coordinated:
    counts: dict[str, int]  # pairs by state: complete, running, waiting, failed
    experiment_id: str
    parent_run_id: str


def _describe(attrs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in attrs.items())


def pair_states(study: optuna.Study) -> dict[str, int]:
    """Pairs (arm, seed) by their most advanced trial: complete > running > waiting > failed."""
    rank = {TrialState.COMPLETE: 4, TrialState.RUNNING: 3, TrialState.WAITING: 2,
            TrialState.FAIL: 1, TrialState.PRUNED: 1}
    best: dict[tuple[str, int], TrialState] = {}
    for trial in study.get_trials(deepcopy=False):
        pair = _pair(trial)
        if pair is None:
            continue
        if pair not in best or rank[trial.state] > rank[best[pair]]:
            best[pair] = trial.state
    names = {TrialState.COMPLETE: "complete", TrialState.RUNNING: "running",
             TrialState.WAITING: "waiting", TrialState.FAIL: "failed", TrialState.PRUNED: "failed"}
    counts = {"complete": 0, "running": 0, "waiting": 0, "failed": 0}
    for state in best.values():
        counts[names[state]] += 1
    return counts


def _pair(trial: FrozenTrial) -> tuple[str, int] | None:
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    if "arm" not in params or "seed" not in params:
        return None
    return str(params["arm"]), int(params["seed"])


def _counts_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return (f"{counts['complete']}/{total} complete, {counts['running']} running, "
            f"{counts['waiting']} waiting, {counts['failed']} failed")


def _close_parent(study: optuna.Study, parent_run_id: str) -> None:
    """The last one out ends the parent run (several may try; ending it twice is harmless)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(parent_run_id).info.status == "RUNNING":
        counts = pair_states(study)
        client.set_tag(parent_run_id, "pairs", _counts_line(counts))
        client.set_terminated(parent_run_id, "FINISHED" if counts["failed"] == 0 else "FAILED")


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
class Heartbeat:
    """Beats for one trial on a thread while it runs. ``Study.optimize`` does this itself;
    the ask/tell style used here (to never create a trial outside the grid) must do it."""

    def __init__(self, storage: BaseStorage, trial_id: int, interval: int | None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
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
            except Exception as err:  # noqa: BLE001  (a database blip: the next beat retries)
                say(f"heartbeat for trial id {self.trial_id} failed: {_first_line(err)}")


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
        what = f"{pair[0]} seed {pair[1]}" if pair else "?"
        if self._max_retry is not None and len(history) >= self._max_retry:
            say(f"worker {self.me}: trial {trial.number} ({what}) {reason}; retried "
                f"{len(history)} times already: left FAILED")
        else:
            say(f"worker {self.me}: trial {trial.number} ({what}) {reason}; marked FAIL and "
                "enqueued for retry")
        super().__call__(study, trial)


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage object the study itself uses (Optuna wraps an RDB storage in a cache that
    must see every trial a worker claims, or ``Trial`` cannot find it)."""
    return study._storage


def pop_waiting(study: optuna.Study, *, heartbeat: bool = False) -> int | None:
    """Claim the oldest WAITING trial (WAITING -> RUNNING succeeds for exactly one worker),
    as ``study.ask()`` does, except that it never creates a new trial when the queue is
    empty: a worker must not invent pairs outside the grid."""
    storage = study_storage(study)
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


class EpochsDone(Hooks):
    """Records a trial's finished epochs (user attr ``epochs_done``) for progress displays."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_epoch_end(self, state: FitState) -> None:
        with contextlib.suppress(Exception):  # progress only: never fail a run over it
            self.trial.set_user_attr("epochs_done", int(state.epoch))


def epochs_done(study: optuna.Study) -> int:
    """Finished epochs over the study's pairs (a complete pair counts ``epochs_done`` of its
    last trial; a retried pair its furthest trial)."""
    best: dict[tuple[str, int], int] = {}
    for trial in study.get_trials(deepcopy=False):
        pair = _pair(trial)
        if pair is not None:
            best[pair] = max(best.get(pair, 0), int(trial.user_attrs.get("epochs_done", 0)))
    return sum(best.values())


@dataclass
class WorkerSummary:
    completed: int = 0
    failed: int = 0


def run_worker(storage_url: str, study_name: str, *, device: str | None = None,
               heartbeat_interval: int | None = 30, grace_period: int | None = 120,
               max_retry: int | None = 3, poll_interval: float = 2.0, linger: bool = True,
               ablation: str | None = None, profile: str | None = None,
               epochs: int | None = None, experiment_id: str | None = None,
               parent_run_id: str | None = None, threads: int | None = None) -> WorkerSummary:
    """Take (arm, seed) trials until none is waiting (and, with ``linger``, none is running
    elsewhere: a dead worker's pair comes back after ``grace_period`` and is taken here).

    Complete trials carry the final val PSNR; a non-finite loss is a result (FAIL, with a
    ``stop_reason`` user attr, not retried). Any other error or Ctrl-C/SIGTERM puts the pair
    back in the queue and stops this worker. The plan (ablation, profile, epochs, MLflow
    experiment and parent run) comes from the study; the keyword arguments override it.
    """
    from mlflow.tracking import MlflowClient

    from experiments.data import load_data

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per resume
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    me = f"{socket.gethostname()}:{os.getpid()}"
    journal = is_journal(storage_url)
    retry = LoggedRetry(me=me, max_retry=max_retry)
    beats = None if journal else heartbeat_interval
    study, stored = load_queue(storage_url, study_name, heartbeat_interval=beats,
                               grace_period=grace_period if beats else None,
                               on_stale=retry if beats else None)
    plan = Plan(ablation or stored.ablation, profile or stored.profile,
                epochs if epochs is not None else stored.epochs, stored.data,
                experiment_id or stored.experiment_id, parent_run_id or stored.parent_run_id,
                stored.experiment)
    device = pick_device(device)
    abl = get_ablation(plan.ablation)
    tracking.configure()
    client = MlflowClient()
    _require_experiment(client, plan.experiment_id, plan.experiment or study_name)
    # Data once per worker, before taking any trial: bad data fails here, not per pair.
    data = {}
    for arm in abl.arms:
        spec, _ = plan.spec(arm.name, 0)
        if spec.data not in data:
            data[spec.data] = load_data(spec.data, plan.profile)

    say(f"worker {me}: study {study_name} ({plan.ablation}, profile {plan.profile}) on {device}; "
        f"heartbeat {beats or 'off'}")
    summary = WorkerSummary()
    while True:
        with storage_errors(storage_url):
            optuna.storages.fail_stale_trials(study)
            trial_id = pop_waiting(study, heartbeat=bool(beats))
            if trial_id is None:
                counts = pair_states(study)
                if linger and beats and counts["running"] > 0:
                    time.sleep(poll_interval)
                    continue
                break
        _run_trial(study, study_storage(study), trial_id, plan, abl, device, data, beats, retry, me,
                   summary, storage_url)
    with storage_errors(storage_url):
        counts = pair_states(study)
        if counts["waiting"] == 0 and counts["running"] == 0:
            _close_parent(study, plan.parent_run_id)
    say(f"worker {me}: queue empty; {summary.completed} completed, {summary.failed} failed "
        f"here ({_counts_line(counts)} in the study)")
    return summary


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


def _run_trial(study: optuna.Study, storage: BaseStorage, trial_id: int, plan: Plan,
               abl: Ablation, device: str, data: dict, beats: int | None,
               retry: LoggedRetry, me: str, summary: WorkerSummary,
               storage_url: str) -> None:
    with storage_errors(storage_url):
        trial = optuna.Trial(study, trial_id)
        arm = trial.suggest_categorical("arm", [a.name for a in abl.arms])
        seed = trial.suggest_int("seed", *SEED_RANGE)
        frozen = storage.get_trial(trial_id)
    origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    again = f" (retry of trial {origin})" if origin is not None else ""
    say(f"worker {me}: trial {trial.number}: {arm} seed {seed}{again}")
    started = time.monotonic()
    with Heartbeat(storage, trial_id, beats):
        try:
            trial.set_user_attr("worker", me)
            spec, group = plan.spec(arm, seed)
            outcome = run_experiment(
                spec, device=device, data=data[spec.data], progress=False,
                hooks=EpochsDone(trial),
                context=RunContext(study=plan.experiment or study.study_name, arm=arm,
                                   group=group,
                                   profile=plan.profile, experiment_id=plan.experiment_id,
                                   parent_run_id=plan.parent_run_id,
                                   extra_tags={"optuna_study": study.study_name,
                                               "optuna_trial": str(trial.number)}))
        except NonFiniteLossError as err:
            trial.set_user_attr("stop_reason", _first_line(err))
            _tell(study, trial, TrialState.FAIL, me)
            summary.failed += 1
            say(f"worker {me}: trial {trial.number}: {arm} seed {seed} FAILED: "
                f"{_first_line(err)} (a result: not retried)")
            return
        except BaseException as err:
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else _first_line(err)
            with contextlib.suppress(Exception):
                trial.set_user_attr("stop_reason", reason)
                if _tell(study, trial, TrialState.FAIL, me):
                    retry.requeue(study, storage.get_trial(trial_id), reason)
            raise
    if outcome.skipped:  # finished earlier outside the queue: file it under this parent
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if PARENT_ID_TAG not in client.get_run(outcome.run_id).data.tags:
            client.set_tag(outcome.run_id, PARENT_ID_TAG, plan.parent_run_id)
    value = outcome.metrics.get("val/psnr", outcome.best_val_psnr)
    trial.set_user_attr("mlflow_run_id", outcome.run_id)
    trial.set_user_attr("epochs_done", spec.train.epochs)
    _tell(study, trial, TrialState.COMPLETE, me, value)
    summary.completed += 1
    what = "reused" if outcome.skipped else f"{time.monotonic() - started:.0f} s"
    say(f"worker {me}: trial {trial.number}: {arm} seed {seed} done: val/psnr {value:.2f} dB "
        f"(run {outcome.run_id}, {what})")


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, me: str,
          value: float | None = None) -> bool:
    """Tell the result; False when a stale check failed this trial meanwhile (we were
    presumed dead: the retry owns the pair now)."""
    try:
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        say(f"worker {me}: trial {trial.number} was failed meanwhile by a stale check "
            "(no heartbeat within the grace period); its retry owns the pair")
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------
def status_table(storage_url: str, study_name: str) -> str:
    study, _ = load_queue(storage_url, study_name)
    with storage_errors(storage_url):
        lines = [f"{'trial':>5}  {'arm':<24} {'seed':>4}  {'state':<8} {'val/psnr':>8}  worker"]
        for t in study.get_trials(deepcopy=False):
            arm, seed = _pair(t) or ("?", -1)
            value = f"{t.value:.2f}" if t.value is not None else "-"
            retry = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
            note = f"  (retry of {retry})" if retry is not None else ""
            lines.append(f"{t.number:>5}  {arm:<24} {seed:>4}  {t.state.name:<8} {value:>8}  "
                         f"{t.user_attrs.get('worker', '')}{note}")
        lines.append(_counts_line(pair_states(study)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
_positive_int = int_at_least(1)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, nothing echoed back unmasked
        self.exit(2, f"{self.prog}: error: {tracking.mask_secrets(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m studies.queue", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{coordinate,worker,status}", parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--storage", required=True, metavar="URL",
                       help="Optuna storage: postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB, "
                            "sqlite:///PATH, or a journal file PATH.journal or PATH.log")
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
    p_work.add_argument("--heartbeat", type=_positive_int, default=30, metavar="SECONDS",
                        help="heartbeat interval (default: 30)")
    p_work.add_argument("--grace", type=_positive_int, default=120, metavar="SECONDS",
                        help="a running trial without a heartbeat this long is failed and "
                             "retried (default: 120)")
    p_work.add_argument("--max-retry", type=int, default=3,
                        help="retries of a pair whose worker died (default: 3)")
    p_work.add_argument("--poll", type=float, default=2.0,
                        help="seconds between looks while others run (default: 2)")
    p_work.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's choice, all cores)")
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
    if args.command == "coordinate":
        done = coordinate(args.storage, args.study, ablation=args.ablation, seeds=args.seeds,
                          profile=args.profile, epochs=args.epochs, data=args.data,
                          wait=args.wait, poll_interval=args.poll)
        return 1 if args.wait and done.counts["failed"] else 0
    if args.command == "worker":
        if args.grace <= args.heartbeat:
            raise SpecError(f"--grace {args.grace} must exceed --heartbeat {args.heartbeat}")
        summary = run_worker(args.storage, args.study, device=args.device,
                             heartbeat_interval=args.heartbeat, grace_period=args.grace,
                             max_retry=args.max_retry, poll_interval=args.poll,
                             linger=args.linger, threads=args.threads)
        return 1 if summary.failed else 0
    print(status_table(args.storage, args.study))
    return 0


if __name__ == "__main__":
    sys.exit(main())
