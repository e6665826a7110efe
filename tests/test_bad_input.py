"""Bad input through the real command lines: exit code 2, exactly one error line that names
the problem (and the valid choices where there are choices), no run left RUNNING, no new run,
and the results already in the store untouched.

One store is shared by every case: it is seeded with one finished smoke run, which must come
out of all the cases still FINISHED with the same metrics.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli
from mlflow.tracking import MlflowClient
from PIL import Image

SMOKE = ["--profile", "smoke", "--epochs", "1"]
RUN = ["experiments", "run", "kl_cyclical"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template_db) -> tuple[Path, str, dict]:
    """(folder, tracking URI, snapshot of the seeded finished run)."""
    root = tmp_path_factory.mktemp("bad-input")
    db = root / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    seeded = run_cli(*RUN, *SMOKE, cwd=root, MLFLOW_TRACKING_URI=uri)
    assert seeded.returncode == 0, seeded.stderr
    return root, uri, _snapshot(uri)


def _all_runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000)


def _snapshot(uri: str) -> dict:
    return {r.info.run_id: (r.info.status, dict(r.data.metrics), dict(r.data.params))
            for r in _all_runs(uri) if r.data.tags.get("study_parent") != "1"}


# ---------------------------------------------------------------------------------------------
# Tiny lab-layout datasets
# ---------------------------------------------------------------------------------------------
def write_png(path: Path, value: int, size: tuple[int, int] = (64, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 40)).save(path)


def lab_dataset(root: Path, *, train: int = 16, val: int = 4) -> Path:
    """ROOT/{train,val}/{split}_{img,label}/N.png, valid as written."""
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            write_png(root / split / f"{split}_img" / f"{i}.png", 3 * i)
            write_png(root / split / f"{split}_label" / f"{i}.png", 200 - 3 * i)
    return root


def _data(damage: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        root = lab_dataset(tmp / "lab")
        damage(root)
        return [*RUN, *SMOKE, "--data", str(root)]
    return make


def _renamed_label(root: Path) -> None:
    (root / "train/train_label/5.png").rename(root / "train/train_label/50.png")


def _missing_label(root: Path) -> None:
    (root / "train/train_label/5.png").unlink()


def _corrupt(root: Path) -> None:
    (root / "train/train_img/3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def _odd_size(root: Path) -> None:
    write_png(root / "train/train_img/7.png", 21, size=(128, 64))


def _toml(text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        path = tmp / "mine.toml"
        path.write_text(text)
        return ["experiments", "run", str(path), *SMOKE]
    return make


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _queue(*args: str, storage: str | None = None) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        url = storage or f"sqlite:///{tmp}/optuna.db"
        url = url.replace("PORT", str(_closed_port()))
        return ["studies.queue", *args[:1], "--storage", url, "--study", "q", *args[1:]]
    return make


def _argv(*argv: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(argv)


def _lab(**counts: int) -> Callable[[Path], list[str]]:
    return lambda tmp: [*RUN, *SMOKE, "--data", str(lab_dataset(tmp / "lab", **counts))]


def _toml_cycle(length: int) -> Callable[[Path], list[str]]:
    """Spec files 0.toml -> 1.toml -> ... -> 0.toml through ``base`` (length 1: itself)."""
    def make(tmp: Path) -> list[str]:
        files = [tmp / f"{i}.toml" for i in range(length)]
        for i, path in enumerate(files):
            path.write_text(f'base = "{files[(i + 1) % length]}"\n[optim]\nlr = 1e-4\n')
        return ["experiments", "run", str(files[0]), *SMOKE]
    return make


COORDINATE = ("coordinate", "--ablation", "kl", "--seeds", "0", *SMOKE)
CASES = [
    # data (loaded before any run exists)
    ("missing dataset folder", _argv(*RUN, *SMOKE, "--data", "/no/such/lab"),
     ["/no/such/lab", "does not exist"]),
    ("dataset is a file", lambda tmp: [*RUN, *SMOKE, "--data", str(lab_dataset(tmp / "lab")
                                                                   / "train/train_img/0.png")],
     ["0.png is a file, not a folder"]),
    ("label names differ", _data(_renamed_label), ["train_label", "first differing file"]),
    ("label count differs", _data(_missing_label), ["15 labels for 16 frames"]),
    ("corrupt PNG", _data(_corrupt), ["train_img/3.png", "unreadable image"]),
    ("frames of mixed sizes", _data(_odd_size),
     ["train_img/7.png", "128x64", "0.png", "64x32"]),
    # specs and overrides
    ("unknown spec", _argv("experiments", "run", "kl_cyclcal", *SMOKE),
     ["unknown spec 'kl_cyclcal'", "kl_cyclical"]),
    ("unknown --set key", _argv(*RUN, *SMOKE, "--set", "optim.lrr=1e-4"),
     ["unknown key 'optim.lrr'", "optim.lr,"]),
    ("wrong type", _argv(*RUN, *SMOKE, "--set", "optim.lr=fast"), ["optim.lr='fast'"]),
    ("wrong choice", _argv(*RUN, *SMOKE, "--set", "kl.kind=cosine"),
     ["cosine", "cyclical, monotonic, constant"]),
    ("negative lr", _argv(*RUN, *SMOKE, "--set", "optim.lr=-1e-3"), ["optim.lr", "> 0"]),
    ("ratio 0", _argv(*RUN, *SMOKE, "--set", "kl.ratio=0"), ["kl.ratio=0.0"]),
    ("ratio above 1", _argv(*RUN, *SMOKE, "--set", "kl.ratio=1.5"), ["kl.ratio=1.5"]),
    ("cycles 0", _argv(*RUN, *SMOKE, "--set", "kl.cycles=0"), ["kl.cycles=0"]),
    ("epochs 0", _argv(*RUN, "--profile", "smoke", "--epochs", "0"), ["--epochs=0"]),
    ("negative seed", _argv(*RUN, *SMOKE, "--seeds", "0", "-1"), ["--seeds", "-1", ">= 0"]),
    ("study: negative seed", _argv("studies.kl_ablation", *SMOKE, "--seeds", "-2"),
     ["--seeds", "-2", ">= 0"]),
    ("no spec matches the pattern", _argv("experiments", "list", "zzz*"),
     ["no registered spec matches 'zzz*'", "kl_cyclical"]),
    ("unknown profile", _argv(*RUN, "--profile", "tiny"),
     ["invalid choice: 'tiny'", "smoke", "cpu", "full"]),
    ("TOML key typo", _toml('base = "kl_cyclical"\n[optim]\nlrr = 1e-4\n'),
     ["mine.toml", "unknown key 'optim.lrr'"]),
    ("TOML syntax typo", _toml('base = "kl_cyclical"\n[optim\nlr = 1e-4\n'),
     ["mine.toml", "not valid TOML"]),
    # values that make training impossible, anywhere in a spec (issue #20)
    ("weight decay nan", _argv(*RUN, *SMOKE, "--set", "optim.weight_decay=nan"),
     ["optim.weight_decay=nan must be a finite number"]),
    ("lr inf", _argv(*RUN, *SMOKE, "--set", "optim.lr=inf"),
     ["optim.lr=inf must be a finite number"]),
    ("KL start nan", _argv(*RUN, *SMOKE, "--set", "kl.start=nan"),
     ["kl.start=nan must be a finite number"]),
    ("teacher forcing nan", _argv(*RUN, *SMOKE, "--set", "teacher_forcing.ratio=nan"),
     ["teacher_forcing.ratio=nan must be a finite number"]),
    ("TOML lr = inf", _toml('base = "kl_cyclical"\n[optim]\nlr = inf\n'),
     ["mine.toml", "optim.lr=inf must be a finite number"]),
    ("TOML base is the file itself", _toml_cycle(1), ["0.toml", "`base` goes round in a cycle"]),
    ("TOML bases in a cycle", _toml_cycle(2),
     ["`base` goes round in a cycle", "0.toml -> ", "1.toml -> ", "0.toml"]),
    # data that cannot train (checked when it loads, before any run exists)
    ("clip longer than the data", _argv(*RUN, *SMOKE, "--set", "data.clip_len=1000"),
     ["train has 160 frames", "fewer than one clip of data.clip_len=1000"]),
    ("fewer frames than one clip", _lab(train=8),
     ["lab/train has 8 frames", "fewer than one clip of data.clip_len=16"]),
    ("partial keeps less than a clip", _argv(*RUN, *SMOKE, "--set", "data.partial=0.05"),
     ["train has 8 frames (data.partial=0.05 keeps them)", "data.clip_len=16"]),
    ("partial keeps nothing", _argv(*RUN, *SMOKE, "--set", "data.partial=0.001"),
     ["partial=0.001 keeps none of the 160 frames"]),
    ("validation of one frame", _lab(val=1),
     ["lab/val has 1 frame", "needs at least 2"]),
    # argparse: a typo never echoes a password, and flags are never abbreviated
    ("typo before a URL", _argv(*RUN, *SMOKE, "--storge",
                                "postgresql+psycopg2://cvae:pw-x1@x@127.0.0.1/optuna"),
     ["unrecognized arguments: --storge postgresql+psycopg2://cvae:***@127.0.0.1/optuna"]),
    ("password in a URL's query", _argv(*RUN, *SMOKE, "--storge",
                                        "postgresql://127.0.0.1/optuna?password=pw-x1"),
     ["--storge postgresql://127.0.0.1/optuna?password=***"]),
    ("--seed is not --seeds", _argv(*RUN, *SMOKE, "--seed", "0", "1"),
     ["unrecognized arguments: --seed 0 1"]),
    ("benchmark: --member is not --members", _argv("benchmarks.throughput", "--member", "2"),
     ["unrecognized arguments: --member 2"]),
    # a study entry point
    ("study: unknown arm", _argv("studies.kl_ablation", "--arms", "kl_cosine", *SMOKE),
     ["kl_cosine", "kl_cyclical, kl_monotonic, kl_constant"]),
    ("study: missing dataset", _argv("studies.kl_ablation", *SMOKE, "--data", "/no/such/lab"),
     ["/no/such/lab", "does not exist"]),
    ("study: missing dataset, 2 jobs", _argv("studies.kl_ablation", *SMOKE, "--jobs", "2",
                                             "--data", "/no/such/lab"),
     ["/no/such/lab", "does not exist"]),
    ("study: --worker without --storage", _argv("studies.kl_ablation", *SMOKE, "--worker"),
     ["--worker", "--storage URL"]),
    ("study: unreachable PostgreSQL",
     lambda tmp: ["studies.kl_ablation", *SMOKE, "--storage",
                  f"postgresql+psycopg2://cvae:pw-x1@127.0.0.1:{_closed_port()}/optuna"],
     ["cvae:***@127.0.0.1", "unreachable"]),
    ("tune: --worker without --storage", _argv("studies.tune", *SMOKE, "--worker"),
     ["--worker", "--storage"]),
    # the work queue
    ("queue: storage not a URL", _queue(*COORDINATE, storage="optuna.db"),
     ["optuna.db", "postgresql+psycopg2://", ".log"]),
    ("queue: malformed URL", _queue(*COORDINATE,
                                    storage="postgresql+psycopg2://cvae:pw-x1@host:port/optuna"),
     ["not a valid database URL", "cvae:***@"]),
    ("queue: unknown database kind", _queue(*COORDINATE, storage="mongodb://h/optuna"),
     ["unknown database kind"]),
    ("queue: unreachable PostgreSQL",
     _queue(*COORDINATE, storage="postgresql+psycopg2://cvae:pw-x1@127.0.0.1:PORT/optuna"),
     ["cvae:***@127.0.0.1", "unreachable"]),
    ("queue: unknown ablation", _queue("coordinate", "--ablation", "kll", *SMOKE),
     ["invalid choice: 'kll'", "kl", "tfr"]),
    ("queue: worker without a study", _queue("worker", "--device", "cpu"),
     ["no study 'q'", "coordinate"]),
    ("queue: grace not above heartbeat", _queue("worker", "--heartbeat", "5", "--grace", "5"),
     ["--grace 5 must exceed --heartbeat 5"]),
    # reports and the benchmark: checked before any work
    ("report: --out not writable", _argv("studies.report", "--study", "runs", "--out",
                                         "/proc/no-such-folder"),
     ["--out /proc/no-such-folder", "cannot create"]),
    ("report: unknown --parent", _argv("studies.report", "--study", "runs", "--parent",
                                       "0123456789abcdef"),
     ["--parent 0123456789abcdef", "no such run"]),
    ("benchmark: --out not writable", _argv("benchmarks.throughput", "--profile", "smoke",
                                            "--out", "/proc/no-such-folder/bench.json"),
     ["--out /proc/no-such-folder", "cannot create"]),
    ("benchmark: --threads 0", _argv("benchmarks.throughput", "--threads", "0"),
     ["--threads", "0: must be >= 1"]),
    ("benchmark: --members 0", _argv("benchmarks.throughput", "--members", "0"),
     ["--members", "0: must be >= 1"]),
]


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(store, tmp_path, make, expected):
    root, uri, before = store
    argv = make(tmp_path)
    result = run_cli(*argv, cwd=root, timeout=300, MLFLOW_TRACKING_URI=uri)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], (text, errors[0])
    assert "pw-x1" not in result.stdout + result.stderr
    runs = _all_runs(uri)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    assert _snapshot(uri) == before  # no new run; the seeded one as it was


def test_a_batch_larger_than_the_training_clips_is_rejected(tracking_store, tmp_path):
    """Decision: rejected, not clamped (every step would silently train on all the clips, a
    run other than the one asked for). The smoke data has 160 // 16 = 10 clips."""
    result = run_cli(*RUN, *SMOKE, "--set", "train.batch_size=11", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    expected = "error: batch size 11 is larger than the 10 training clips; choose at most 10"
    assert errors == [expected], result.stderr
    assert "Traceback" not in result.stderr
    assert _all_runs(tracking_store) == []  # checked before any run exists
    assert run_cli(*RUN, *SMOKE, "--set", "train.batch_size=10", cwd=tmp_path).returncode == 0


def test_eval_every_beyond_the_epochs_evaluates_at_the_last_epoch(tracking_store, tmp_path):
    """Accepted: a run always evaluates at its last epoch. (At the ``full`` profile, which
    leaves ``eval.every`` as set, on a tiny lab folder and smoke-sized widths.)"""
    lab = lab_dataset(tmp_path / "lab", train=32, val=4)
    tiny = [f"model.{k}={v}" for k, v in (("frame_dim", 8), ("label_dim", 4), ("latent_dim", 4),
                                          ("decoder_dim", 8), ("encoder_width", 4))]
    sets = [arg for key in ("eval.every=1000", *tiny) for arg in ("--set", key)]
    result = run_cli(*RUN, "--profile", "full", "--epochs", "2", "--data", str(lab), *sets,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = _all_runs(tracking_store)
    assert run.data.params["eval.every"] == "1000" and run.info.status == "FINISHED"
    client = MlflowClient(tracking_uri=tracking_store)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")] == [1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
