"""Optuna storages: one set of rules for every command's ``--storage`` (the work queue of
``studies.queue`` and the ablation studies, and ``studies.tune``).

- Kinds: a database URL (``postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB`` for several
  machines, ``sqlite:///PATH`` on one) or a journal file ``PATH.journal`` / ``PATH.log``
  (several processes on one machine; no heartbeats). A bare ``PATH.db`` means SQLite.
- Without ``--storage``, the URL comes from ``$CVAE_STORAGE``, or from the file that
  ``$CVAE_STORAGE_FILE`` names (readable by its owner only), so that no password needs a
  command line (where ``ps`` shows it to every user); worker processes started here get it
  through their environment.
- A missing SQLite or journal folder is created by the commands that create a study; the
  commands that only read one (``queue worker``, ``queue status``) refuse a missing file.
- Heartbeats (database storages only): a running trial beats every ``HEARTBEAT`` seconds; one
  silent for ``GRACE`` seconds is failed by the next process that looks, and retried (a WAITING
  copy with the same parameters) up to ``MAX_RETRY`` times.
- Errors are one line naming the storage with its password masked (``first_line``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from experiments import tracking
from experiments.spec import SpecError
from experiments.tracking import first_line

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
JOURNAL_SUFFIXES: tuple[str, ...] = (".journal", ".log")
HEARTBEAT, GRACE, MAX_RETRY = 30, 120, 3  # seconds, seconds, retries of a dead worker's trial
# One advisory-lock key for every coordinator of every study: enqueueing is quick, and the
# same lock also covers the creation of Optuna's tables in a fresh database.
LOCK_NAME = "cvae-ablate.studies.queue"
LOCK_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big", signed=True)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def is_journal(text: str) -> bool:
    """A journal file: a path (not a URL) ending in ``.journal`` or ``.log``."""
    return "://" not in text and text.endswith(JOURNAL_SUFFIXES)


ENV_URL, ENV_FILE = "CVAE_STORAGE", "CVAE_STORAGE_FILE"


@dataclass(frozen=True)
class Beats:
    """The heartbeat policy of the processes that take trials (database storages only)."""

    heartbeat: int = HEARTBEAT  # seconds between a running trial's beats
    grace: int = GRACE  # seconds of silence after which a trial is failed and retried
    max_retry: int | None = MAX_RETRY  # retries of a trial whose process died

    def __post_init__(self) -> None:
        if self.heartbeat < 1 or self.grace <= self.heartbeat:
            raise SpecError(f"--grace {self.grace} must exceed --heartbeat {self.heartbeat} "
                            "(both in seconds, >= 1)")


DEFAULT_BEATS = Beats()


def add_flags(parser: Any) -> None:
    """``--heartbeat`` and ``--grace``, as every command that takes trials has them."""
    parser.add_argument("--heartbeat", type=int, default=HEARTBEAT, metavar="SECONDS",
                        help=f"a running trial's heartbeat interval (default: {HEARTBEAT})")
    parser.add_argument("--grace", type=int, default=GRACE, metavar="SECONDS",
                        help="a running trial without a heartbeat this long is failed and "
                             f"retried (default: {GRACE})")


def given(text: str | None) -> str | None:
    """The storage the user chose: ``--storage`` (``text``), else the environment's, else
    None. An empty one, or a URL file others can read, is a one-line ``SpecError``."""
    if text is None:
        text = os.environ.get(ENV_URL) or None
    if text is None and os.environ.get(ENV_FILE):
        path = Path(os.environ[ENV_FILE]).expanduser()
        try:
            if path.stat().st_mode & 0o077:
                raise SpecError(f"${ENV_FILE} {path} can be read by other users: "
                                f"chmod 600 {path}")
            text = path.read_text().strip()
        except OSError as err:
            raise SpecError(f"${ENV_FILE} {path}: {err.strerror or err}") from None
    if text is not None and not text.strip():
        raise SpecError("--storage is empty: give a database URL or a journal file")
    return text


def storage_url(text: str | None) -> str:
    """The storage chosen (``given``) or ``DEFAULT_STORAGE``, a bare ``.db`` path as SQLite."""
    text = given(text) or DEFAULT_STORAGE
    if "://" not in text and text.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{text}"
    return text


def shared(url: str) -> bool:
    """A database server (not SQLite, not a journal): processes on other machines may join."""
    return "://" in url and not url.startswith("sqlite")


def storage_file(url: str) -> Path | None:
    """The journal or SQLite file of ``url``; None for a server or in-memory SQLite."""
    if is_journal(url):
        return Path(url).expanduser()
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).expanduser()
    return None


def check_url(url: str) -> None:
    """A journal file or a parseable database URL that is not MLflow's own SQLite file; else
    a one-line ``SpecError`` (the password masked)."""
    if "://" not in url and not is_journal(url):
        raise SpecError(f"--storage {tracking.mask_secrets(url)!r} is neither a database URL "
                        "(postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB, sqlite:///PATH) "
                        "nor a journal file ending in .journal or .log")
    if not is_journal(url):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(url)
        except (ArgumentError, ValueError) as err:  # ValueError: a port that is not a number
            raise SpecError(f"--storage {tracking.mask_secrets(url)!r} is not a valid database "
                            f"URL ({first_line(err)})") from None
    path = storage_file(url)
    mlflow_db = tracking.sqlite_path(tracking.tracking_uri())
    if path is not None and mlflow_db is not None and path.resolve() == mlflow_db.resolve():
        raise SpecError(f"--storage {url}: Optuna and MLflow cannot share one SQLite file "
                        f"({path}); use another file, e.g. {DEFAULT_STORAGE}")


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Database failures become one-line errors naming the (masked) storage."""
    from sqlalchemy.exc import DBAPIError, NoSuchModuleError, SQLAlchemyError

    where = f"optuna storage {tracking.mask_secrets(url)}"
    try:
        yield
    except NoSuchModuleError as err:
        raise SpecError(f"{where}: unknown database kind ({first_line(err)})") from None
    except ImportError as err:  # Optuna wraps the driver's ModuleNotFoundError
        missing = err.__cause__ if isinstance(err.__cause__, ImportError) else err
        hint = " (SQLAlchemy 2.1 reads postgresql:// as psycopg 3; write postgresql+psycopg2://)" \
            if "psycopg" in str(missing) else ""
        raise tracking.TrackingError(f"{where}: no driver: {first_line(missing)}{hint}") \
            from None
    except DBAPIError as err:
        raise tracking.TrackingError(f"{where} unreachable: {first_line(err.orig or err)}") \
            from None
    except SQLAlchemyError as err:
        raise tracking.TrackingError(f"{where}: {first_line(err)}") from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # several local processes wait for the lock
    return {"pool_pre_ping": True}


def open_storage(url: str, *, heartbeat: int | None = None, grace: int | None = None,
                 on_stale: Any | None = None) -> BaseStorage:
    """An Optuna storage for ``url`` (checked here; a missing SQLite or journal folder is
    created). ``heartbeat`` seconds (database storages only; None: no heartbeats), ``grace``
    and ``on_stale`` (the retry callback) as ``RDBStorage`` takes them."""
    check_url(url)
    path = _folder_made(url)
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise tracking.TrackingError(f"cannot open Optuna journal {path}: "
                                         f"{err.strerror or err}") from None
    with storage_errors(url):
        return optuna.storages.RDBStorage(
            url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=heartbeat,
            grace_period=grace if heartbeat else None,
            heartbeat_stale_trial_callback=on_stale if heartbeat else None)


def _folder_made(url: str) -> Path | None:
    """The storage's file with its folder created (None for a database server)."""
    path = storage_file(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise tracking.TrackingError(f"optuna storage {url}: cannot create {path.parent} "
                                         f"({err.strerror or err})") from None
    return path


@contextlib.contextmanager
def exclusive(url: str) -> Iterator[None]:
    """One process at a time per storage (e.g. ``enqueue_trial(skip_if_exists=True)`` looks,
    then inserts: two coordinators starting together could both insert the same pair).

    PostgreSQL: a session advisory lock; MySQL: ``GET_LOCK``; SQLite and journal files (one
    machine): ``flock`` on a file beside the database; in-memory SQLite: nothing to share.
    """
    if is_journal(url) or url.startswith("sqlite"):
        path = _folder_made(url)
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
