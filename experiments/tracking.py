"""MLflow plumbing: where runs go, how they are found again, and secrets kept out of them.

Defaults (DESIGN.md): tracking ``sqlite:///mlruns/mlflow.db`` under the working directory,
artifacts in ``mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` overrides (a server included).
Experiments are created once and runs started with ``experiment_id`` (concurrent
``set_experiment`` misfiles runs).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
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


def get_or_create_experiment(name: str, *, retries: int = 3) -> str:
    """Experiment id for ``name``, created once (with our artifact root for a local store)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    last: Exception | None = None
    for attempt in range(retries):
        try:
            client = MlflowClient()
            found = client.get_experiment_by_name(name)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    client.restore_experiment(found.experiment_id)
                return found.experiment_id
            location = artifact_root() if tracking_uri().startswith("sqlite:") else None
            return client.create_experiment(name, artifact_location=location)
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
