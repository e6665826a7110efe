"""MLflow plumbing: where runs go, how they are found again, and secrets kept out of them.

Defaults: tracking ``sqlite:///mlruns/mlflow.db`` under the working directory,
artifacts in ``mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` overrides (a server included).
Experiments are created once and runs started with ``experiment_id`` (concurrent
``set_experiment`` misfiles runs).

A run being trained holds a lease (``Lease``): tags on the run naming its owner, refreshed by
a heartbeat thread, that every other process reads before it starts or resumes the same
(spec, seed); the claim protocol itself is the runner's.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MLRUNS = Path("mlruns")
TAG_KEYS = ("study", "arm", "group", "seed", "spec_hash", "profile", "device", "git_commit")
# user:password@host in a URL. The password may hold '@', ':' or '/' (people paste them
# unescaped): it runs to the first '@' that is followed by a host, i.e. by text without '@'
# up to the path, the query, the end of the URL or the end of the text.
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s'\"]*:)(?P<secret>[^\s'\"]*?)"
    r"(?=@[^@/?#\s'\"]+(?:[/?#\s'\"]|$))")
# password=... in a query string (?password=, &pwd=) or in environment text (PGPASSWORD=,
# MLFLOW_TRACKING_PASSWORD=): the value runs to the next '&', blank or quote.
_KEY_PASSWORD = re.compile(
    r"(?i)(?P<head>(?:\b|_)(?:\w*password|\w*passwd|pass|pwd)=)(?P<secret>[^&\s'\"]+)")


class TrackingError(RuntimeError):
    """The tracking store (or another storage) cannot be reached or written."""


def mask_secrets(text: object) -> str:
    """Passwords replaced by ``***`` anywhere in ``text``: ``postgresql://user:***@host/db``
    (a password holding '@' or ':' included), ``?password=***`` / ``&pass=***`` / ``pwd=***``
    query parameters, and ``PGPASSWORD=***``-style environment text. The one masking function
    for every message, tag, parameter and log line."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***", str(text))
    return _KEY_PASSWORD.sub(lambda m: f"{m.group('head')}***", text)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLRUNS}/mlflow.db"


def artifact_root() -> str:
    return (MLRUNS / "artifacts").resolve().as_uri()


def configure() -> str:
    """Point mlflow at the tracking store. A local store's folder (and the artifact folder
    next to it) is created, and proved writable, before any run exists: a read-only folder
    or a path through a file is a one-line ``TrackingError`` in milliseconds."""
    import mlflow

    _quiet_store_logs()
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        writable_folder(path.parent, what=f"tracking store {mask_secrets(uri)}")
        writable_folder(MLRUNS / "artifacts", what="artifact folder")
        _create_sqlite_store(uri, path)
    if uri.startswith(("http://", "https://")):
        probe_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _quiet_store_logs() -> None:
    """No INFO lines from creating or migrating a store's tables ("Creating initial MLflow
    database tables..."): they printed before a command's own one-line error, and a new
    store is nothing a user has to know about. Warnings and errors still show."""
    import logging

    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def writable_folder(folder: Path, *, what: str) -> None:
    """Create ``folder`` if missing and write a file in it, else a one-line TrackingError.
    A real write, not ``os.access``: root passes any permission check, yet a read-only
    file system still refuses it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        blocker = next((p for p in (folder, *folder.parents) if p.is_file()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else \
            f"{folder} is not writable ({err.strerror or err})"
        raise TrackingError(f"{what}: {reason}") from None


def _create_sqlite_store(uri: str, path: Path) -> None:
    """Create (or migrate) the SQLite store's tables in one process at a time. MLflow creates
    them on first use without a lock: two runs started together on a new store (two
    terminals, a shell loop with ``&``) both ran the migrations, and every one of them died
    half way (``table _alembic_tmp_runs already exists``), leaving a broken store."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (start the first run alone)
        return
    from mlflow.tracking import MlflowClient

    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # builds the tables
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def probe_server(uri: str, *, timeout: float = 5.0) -> None:
    """Fail in seconds when a tracking server does not answer: MLflow's own client retries a
    refused connection with backoff for minutes before it gives up."""
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    health = parts._replace(netloc=parts.netloc.rpartition("@")[2],
                            path=parts.path.rstrip("/") + "/health").geturl()
    try:
        urllib.request.urlopen(health, timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # something answered (a proxy, an auth layer): let MLflow's client judge it
    except (OSError, ValueError) as err:  # URLError, timeouts, malformed URLs
        reason = getattr(err, "reason", None) or err
        raise TrackingError(f"tracking server {mask_secrets(uri)} unreachable: "
                            f"{mask_secrets(str(reason))}") from None


# The experiment tag MLflow 3 keeps an experiment's kind in, and the kind of every experiment
# this project makes: model training (runs and their metrics), not a GenAI app (traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # an experiment's or a run's description in the MLflow UI


# MLflow 3.17's UI opens an experiment as its global "GenAI" or "Model training" view
# (remembered by the browser, GenAI at first), whatever the experiment's kind tag says; this
# query in a link opens the Model training view (the runs).
UI_VIEW = "workflowType=machine_learning"


def ui_base(uri: str) -> str | None:
    """The MLflow UI's address for a tracking server's URI (``http(s)://``), without its
    credentials; None for any other store (its UI is ``mlflow ui``, wherever it runs)."""
    import urllib.parse

    if not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="",
                          fragment="").geturl().rstrip("/")


def run_url(experiment_id: str, run_id: str) -> str | None:
    """The run's page in the tracking server's MLflow UI; None for a local store."""
    base = ui_base(tracking_uri())
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}" if base else None


def experiment_tags(description: str = "") -> dict[str, str]:
    """The tags of an experiment this project creates: its kind, and ``description`` (Markdown,
    secrets masked) when given."""
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    if description.strip():
        tags[NOTE_TAG] = mask_secrets(description.strip())
    return tags


def get_or_create_experiment(name: str, *, description: str = "", retries: int = 3) -> str:
    """Experiment id for ``name``, created once (with our artifact root for a local store),
    tagged as model training and with ``description``. An existing experiment gets those tags
    only where it has none: a description or kind set since (in the UI) is kept."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tags = experiment_tags(description)
    last: Exception | None = None
    for attempt in range(retries):
        try:
            client = MlflowClient()
            found = client.get_experiment_by_name(name)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    client.restore_experiment(found.experiment_id)
                for key, value in tags.items():
                    if key not in found.tags:
                        client.set_experiment_tag(found.experiment_id, key, value)
                return found.experiment_id
            location = artifact_root() if tracking_uri().startswith("sqlite:") else None
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException as err:
            last = err
            if "already exists" in str(err) or "UNIQUE" in str(err):
                continue  # another process created it between our look and our create
            time.sleep(0.5 * 2**attempt)
        except Exception as err:  # noqa: BLE001  (connection errors come in many types)
            last = err
            time.sleep(0.5 * 2**attempt)
    raise TrackingError(f"tracking store {mask_secrets(tracking_uri())} unreachable: "
                        f"{first_line(last)}")


def first_line(err: BaseException | None, *, with_type: bool = False) -> str:
    """The first line of an error's message, secrets masked: how every one-line message
    quotes an error (``with_type``: prefixed with its class name)."""
    text = str(err).strip() if err is not None else ""
    line = text.splitlines()[0] if text else type(err).__name__
    return mask_secrets(f"{type(err).__name__}: {line}" if with_type and text else line)


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def git_commit() -> str:
    """The commit of this project's code (asked in the package's folder, not in the working
    directory: a run started from another folder, or from inside another repository, would
    otherwise be tagged "unknown" or with that other repository's commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def quote_filter_value(value: object) -> str:
    """``value`` as a string literal of an MLflow search filter.

    MLflow's parser takes the text between the quotes as it is, with no escapes (``'bob\\'s'``
    searches for a backslash), so the value goes in the quotes it does not contain:
    ``bob's`` -> ``"bob's"``. A value holding both kinds cannot be written: TrackingError.
    """
    text = str(value)
    for quote in ("'", '"'):
        if quote not in text:
            return f"{quote}{text}{quote}"
    raise TrackingError(f"{text!r} holds both ' and \": MLflow's search cannot match it; "
                    "choose a name without one of them")


def filter_string(clauses: Mapping[str, object]) -> str:
    """``{"tags.study": "bob's", "tags.seed": 0}`` -> ``tags.study = "bob's" and tags.seed =
    '0'``: the one way a filter is built from values (names, hashes, seeds)."""
    return " and ".join(f"{key} = {quote_filter_value(value)}" for key, value in clauses.items())


def find_runs(experiment_id: str, *, spec_hash: str, seed: int) -> list[Any]:
    """Runs of this (spec_hash, seed) in the experiment, newest first."""
    from mlflow.tracking import MlflowClient

    query = filter_string({"tags.spec_hash": spec_hash, "tags.seed": seed})
    return MlflowClient().search_runs([experiment_id], filter_string=query,
                                      order_by=["attribute.start_time DESC"], max_results=50)


def last_logged_step(run_id: str, key: str = "train/loss") -> int:
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def replace_metrics(client: Any, run_id: str,
                    history: Mapping[str, Sequence[tuple[int, float]]], *,
                    stale: Iterable[str] = ()) -> bool:
    """Log ``history`` (key -> (step, value) pairs) on the run in place of what those keys,
    and the ``stale`` ones, held before. True when the run holds only the new values.

    MLflow has no call that deletes a metric, and its charts draw every value logged at a
    step: a curve logged again with new values zigzags between the old and the new (seen in
    the 3.17 UI). On a database store (SQLite, PostgreSQL: MLflow's SQLAlchemy store) the
    keys' rows are deleted first, through that store. A tracking server cannot delete them:
    there the new values are appended with a later timestamp, so that the runs table and
    readers that keep the newest value per step (``studies.results``) show them, and False
    is returned (unless nothing changed: then nothing is written)."""
    from mlflow.entities import Metric

    deleted = _delete_metrics(client, run_id, set(history) | set(stale))
    if not deleted and _newest_per_step(client, run_id, set(history)) == \
            {key: dict(points) for key, points in history.items()}:
        return True  # nothing changed: nothing appended
    now = int(1000 * time.time())
    batch = [Metric(key, float(value), now, int(step))
             for key, points in history.items() for step, value in points]
    for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=batch[start:start + 1000], synchronous=True)
    return deleted


def _delete_metrics(client: Any, run_id: str, keys: set[str]) -> bool:
    """Delete the run's values of ``keys`` on a database store; False on any other store."""
    try:  # MLflow's own store behind the client (3.17: TrackingServiceClient.store)
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = client._tracking_client.store
    except (ImportError, AttributeError):
        return False
    if not isinstance(store, SqlAlchemyStore):
        return False
    if keys:
        with store.ManagedSessionMaker() as session:
            for table in (SqlMetric, SqlLatestMetric):
                session.query(table).filter(table.run_uuid == run_id, table.key.in_(keys)) \
                    .delete(synchronize_session=False)
    return True


def _newest_per_step(client: Any, run_id: str, keys: set[str]) -> dict[str, dict[int, float]]:
    """key -> {step: the value logged last at that step} for the run's ``keys`` it has."""
    held = client.get_run(run_id).data.metrics
    newest: dict[str, dict[int, float]] = {}
    for key in sorted(keys & set(held)):
        history = sorted(client.get_metric_history(run_id, key),
                         key=lambda m: (m.step, m.timestamp))
        newest[key] = {m.step: m.value for m in history}
    return newest


# ---------------------------------------------------------------------------------------------
# Leases: one owner per run
# ---------------------------------------------------------------------------------------------
# The heartbeat first: a release cut short leaves a stale lease, never a live one.
LEASE_TAGS = ("lease_heartbeat", "lease_owner", "lease_since", "lease_token")
LEASE_HEARTBEAT_S = 10.0
LEASE_GRACE_S = 60.0


class RunBusyError(TrackingError):
    """Another live process trains this run: this process leaves it alone."""


@dataclass(frozen=True)
class LeaseTiming:
    """How often an owner beats and how old a beat may be before its owner is presumed dead.

    The grace is well under the work queue's (``--grace 120`` s with ``--heartbeat 30`` s):
    when a dead worker's trial is retried, the run's lease has expired too. ``settle``: how
    long a claim waits for rival claims to land before it checks whether it won.
    """

    heartbeat: float = LEASE_HEARTBEAT_S
    grace: float = LEASE_GRACE_S

    @property
    def settle(self) -> float:
        return self.heartbeat / 20


def lease_timing() -> LeaseTiming:
    """From ``CVAE_LEASE_HEARTBEAT`` and ``CVAE_LEASE_GRACE`` (seconds), else the defaults."""
    values = {}
    for name, default in (("heartbeat", LEASE_HEARTBEAT_S), ("grace", LEASE_GRACE_S)):
        text = os.environ.get(f"CVAE_LEASE_{name.upper()}", "")
        try:
            values[name] = float(text) if text else default
        except ValueError:
            values[name] = -1.0
        if not 0 < values[name] < float("inf"):
            raise TrackingError(f"CVAE_LEASE_{name.upper()}={text!r}: a positive number of "
                                "seconds")
    if values["grace"] <= values["heartbeat"]:
        raise TrackingError(f"CVAE_LEASE_GRACE={values['grace']:g} must exceed "
                            f"CVAE_LEASE_HEARTBEAT={values['heartbeat']:g}")
    return LeaseTiming(**values)


def lease_is_live(tags: Mapping[str, str], timing: LeaseTiming) -> bool:
    """Whether these run tags hold a lease whose owner is alive: a heartbeat younger than the
    grace, from a process that still exists where we can tell (this host)."""
    try:
        beat = float(tags["lease_heartbeat"])
    except (KeyError, ValueError):
        return False
    if time.time() - beat > timing.grace:
        return False
    return not owner_gone(tags.get("lease_owner", ""))


def owner_gone(owner: str) -> bool:
    """Whether ``owner`` (``host:pid``) is a process of this host that no longer exists (a
    killed worker): known at once, without waiting for its heartbeats to go stale."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def lease_holder(tags: Mapping[str, str]) -> str:
    """``pid P on host H since TIME`` from a run's lease tags."""
    host, _, pid = tags.get("lease_owner", "?:?").rpartition(":")
    return f"pid {pid} on host {host} since {tags.get('lease_since', '?')}"


class Lease:
    """This process's lease on one run: its tags (written when the run is claimed), a
    heartbeat thread that refreshes ``lease_heartbeat`` every ``timing.heartbeat`` seconds,
    and ``lost`` once another process holds the run (this one was presumed dead: paused,
    or cut off from the store, for longer than the grace)."""

    def __init__(self, timing: LeaseTiming):
        self.timing = timing
        self.run_id: str | None = None  # the run the lease is on, once claimed
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # who holds the run now, once it is not ours
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def tags(self) -> dict[str, str]:
        since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return {"lease_owner": f"{socket.gethostname()}:{os.getpid()}", "lease_since": since,
                "lease_heartbeat": f"{time.time():.3f}", "lease_token": self.token}

    def held(self, tags: Mapping[str, str]) -> bool:
        return tags.get("lease_token") == self.token

    def start(self) -> None:
        """Beat for ``run_id`` (set once the run is known) from a daemon thread."""
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        while not self._stopping.wait(self.timing.heartbeat):
            try:
                tags = client.get_run(self.run_id).data.tags
                if not self.held(tags):  # read before writing: never beat for another owner
                    self.lost = lease_holder(tags)
                    return
                if self._stopping.is_set():  # released meanwhile: no beat after it
                    return
                client.set_tag(self.run_id, "lease_heartbeat", f"{time.time():.3f}")
            except Exception:  # noqa: BLE001, S112  (the store is down: training meets it too)
                continue

    def stop(self) -> None:
        """Stop beating (the lease then expires after the grace unless released). Waits for
        a beat in flight, but not for a store that does not answer (the thread is a daemon)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timing.heartbeat)

    def release(self, client: Any) -> None:
        """Stop beating and remove the lease tags, if the run is still ours: a rerun takes
        the run at once. Never raises (the store may be what failed; the lease expires)."""
        self.stop()
        if self.run_id is None or self.lost is not None:
            return
        try:
            if self.held(client.get_run(self.run_id).data.tags):
                for key in LEASE_TAGS:
                    client.delete_tag(self.run_id, key)
        except Exception:  # noqa: BLE001, S110
            pass
