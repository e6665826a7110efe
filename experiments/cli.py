"""What every command shares: one-line errors with exit code 2, profile/device resolution."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from cvae.data import DatasetError
from experiments import tracking
from experiments.registry import PROFILES, default_profile
from experiments.runner import DEVICES, pick_device
from experiments.spec import SpecError

USER_ERRORS = (SpecError, DatasetError, tracking.TrackingError)


def fail(message: str) -> int:
    print(f"error: {tracking.mask_secrets(message)}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """The command lines' parser. Flags are never abbreviated: with abbreviations ``--seed 0
    1`` was silently read as ``--seeds``. Errors mask passwords: a mistyped flag before a
    storage URL (``--storge postgresql://u:pw@h/db``) is echoed back by argparse. Sub-command
    parsers (``add_subparsers``) are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {tracking.mask_secrets(message)}\n")


def int_at_least(low: int, rule: str | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``; ``rule`` says why in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: {rule or f'must be >= {low}'}")
        return value

    return parse


# -1 stands for "no seed" in reports.
seed_arg = int_at_least(0, "seeds are integers >= 0")


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder this process can write into (created if missing), checked before
    any work whose results would go there; else a one-line ``SpecError``."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"{flag} {path}: cannot create the folder "
                        f"({err.strerror or err})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"{flag} {path}: the folder is not writable")
    return folder


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Run ``main``; bad input becomes one line on stderr and exit code 2; SIGTERM is treated
    like Ctrl-C so runs are marked KILLED rather than left RUNNING."""

    def wrapper(argv: list[str] | None = None) -> int:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return main(argv)
        except USER_ERRORS as err:
            return fail(tracking.first_line(err))
        except KeyboardInterrupt:
            print("interrupted: the last checkpoint is saved; rerun the same command to resume",
                  file=sys.stderr)
            return 130
        except Exception as err:
            if not _tracking_failure(err):
                raise
            return fail(f"tracking store {tracking.tracking_uri()} failed: "
                        f"{tracking.first_line(err)}; the last "
                        "checkpoint is kept: rerun the same command to resume")

    return wrapper


def _tracking_failure(err: Exception) -> bool:
    """An MLflow client error (a server gone mid-run, a store that stopped accepting writes):
    the run cannot be recorded, and it stays resumable where the store still knows it."""
    exceptions = sys.modules.get("mlflow.exceptions")
    return exceptions is not None and isinstance(err, exceptions.MlflowException)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cpu_count() -> int:
    """The cores this process may use (``taskset``/cgroup affinity), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it is a whole number >= 1, else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def pin_threads(threads: int | None, *, share: int = 1) -> int:
    """Pin torch's CPU threads: ``threads``, or this process's share of the cores (``share``
    processes training at once: one thread each on a 2-core machine with 2 workers). Every
    entry point calls it, as its worker processes do: torch's own default ignores the other
    processes, and oversubscribed OpenMP threads crawl on a busy machine. Without
    ``threads``, a valid ``OMP_NUM_THREADS`` in the environment wins over the share, as it
    does for torch itself."""
    import torch

    count = threads or _omp_threads() or max(1, cpu_count() // max(1, share))
    torch.set_num_threads(count)
    return count


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=PROFILES, default=None,
                        help="smoke (seconds) | cpu (minutes) | full (the lab's scale); "
                             "default: full on CUDA, cpu otherwise")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="default: cuda > mps > cpu")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="a lab-layout dataset folder (default: the synthetic dance data)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, metavar="N",
                        help="torch CPU threads of this process (default: $OMP_NUM_THREADS, "
                             "else the cores it may use; worker processes share them)")


def resolve_profile_and_device(args: argparse.Namespace) -> tuple[str, str]:
    device = pick_device(args.device)
    profile = args.profile
    if profile is None:
        profile = default_profile(device)
        print(f"profile: {profile} (chosen for device {device}; override with --profile)",
              file=sys.stderr)
    return profile, device
