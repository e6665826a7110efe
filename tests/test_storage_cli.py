"""``--storage`` and ``--data`` through the queue and tuning command lines (in this process:
seconds): both journal file names everywhere, one-line errors (exit 2) that create nothing,
and ``queue status`` refusing a study that is not a work queue."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from experiments.registry import apply_profile, resolve_spec
from studies import queue, tune, tuning
from studies import storage as storages

SMOKE = ["--profile", "smoke", "--epochs", "1"]


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def error_line(capsys) -> str:
    """The one error line of a command that just failed."""
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    return line


def all_runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("suffix", [".journal", ".log"])
def test_every_command_takes_both_journal_names(tracking_store, tmp_path, capsys, suffix):
    journal = str(tmp_path / f"queue{suffix}")
    assert queue.main(["coordinate", "--storage", journal, "--study", "q", "--ablation", "kl",
                       "--seeds", "0", *SMOKE]) == 0
    assert queue.main(["status", "--storage", journal, "--study", "q"]) == 0
    assert "0/3 complete, 0 running, 3 waiting" in capsys.readouterr().out
    # studies.tune opens its --storage here (and the study commands go through the queue's)
    storage = storages.open_storage(str(tmp_path / f"tune{suffix}"))
    assert isinstance(storage, optuna.storages.JournalStorage)


@pytest.mark.parametrize("command", [
    ["studies.queue", "status", "--study", "q", "--storage"],
    ["studies.tune", *SMOKE, "--n-trials", "1", "--storage"]])
def test_bad_storage_names_every_kind_it_takes(tracking_store, tmp_path, capsys, command):
    main = {"studies.queue": queue.main, "studies.tune": tune.main}[command[0]]
    assert main([*command[1:], str(tmp_path / "optuna.txt")]) == 2
    line = error_line(capsys)
    for text in ("optuna.txt", "postgresql+psycopg2://USER:", "@HOST:PORT/DB", "sqlite:///",
                 ".journal", ".log"):
        assert text in line, (text, line)
    assert not (tmp_path / "optuna.txt").exists()


@pytest.mark.parametrize("argv", [
    ["studies.queue", "coordinate", "--storage", "sqlite:///mlruns/queue.db", "--study", "q",
     "--ablation", "kl", "--seeds", "0", "--profile", "smoke"],
    ["studies.tune", "--profile", "smoke", "--n-trials", "2", "--workers", "2",
     "--storage", "sqlite:///mlruns/queue.db", "--study-name", "q"]])
def test_missing_dataset_fails_before_anything_exists(tracking_store, tmp_path, capsys, argv):
    main = {"studies.queue": queue.main, "studies.tune": tune.main}[argv[0]]
    assert main([*argv[1:], "--data", str(tmp_path / "no-lab")]) == 2
    line = error_line(capsys)
    assert "no-lab" in line and "does not exist" in line, line
    assert not (tmp_path / "mlruns" / "queue.db").exists()  # no study, nothing queued
    assert all_runs() == []  # no parent run (left RUNNING or otherwise)


@pytest.mark.parametrize("storage, file", [("sqlite:///mlruns/none.db", "mlruns/none.db"),
                                           ("mlruns/none.log", "mlruns/none.log"),
                                           ("mlruns/none.journal", "mlruns/none.journal")])
@pytest.mark.parametrize("command", ["status", "worker"])
def test_reading_a_missing_storage_creates_nothing(tracking_store, tmp_path, capsys, storage,
                                                   file, command):
    assert queue.main([command, "--storage", storage, "--study", "q"]) == 2
    assert not (tmp_path / file).exists()
    line = error_line(capsys)
    assert "no study 'q'" in line and file in line and "coordinate" in line, line


@pytest.mark.parametrize("command", ["status", "worker"])
def test_a_tuning_study_is_not_taken_for_a_queue(tracking_store, tmp_path, capsys, command):
    """A study as ``studies.tune`` opens it (its identity in the user attrs), with a trial."""
    journal = str(tmp_path / "optuna.journal")
    base = apply_profile(resolve_spec("report_final"), "smoke", epochs=1)
    space = tuning.search_space(base)
    study = tuning.open_study(storages.open_storage(journal), "tuned",
                              sampler=optuna.samplers.RandomSampler(seed=0),
                              pruner=optuna.pruners.NopPruner(),
                              identity=tuning.study_identity(base, space, "smoke"))
    study.enqueue_trial({"optim.lr": 1e-4})
    assert queue.main([command, "--storage", journal, "--study", "tuned"]) == 2
    line = error_line(capsys)
    for text in ("'tuned'", "not a work queue", "studies.tune", "report_final"):
        assert text in line, (text, line)
    assert Path(journal).stat().st_size > 0 and all_runs() == []


def test_worker_processes_get_the_storage_in_their_environment_not_argv(capsys):
    """``ps`` shows every process's command line to every user: a coordinator hands its
    workers the storage URL (and its password) through their environment."""
    url = "postgresql+psycopg2://cvae:hunter2-secret@127.0.0.1:1/optuna"
    with queue.workers("studies.queue", [["status", "--study", "q"]], threads=1,
                       storage=url) as procs:
        pid = procs[0].pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"studies.queue status --study q" in cmdline
    assert b"hunter2" not in cmdline
    assert f"{storages.ENV_URL}={url}".encode() in environ
    assert procs[0].returncode == 2  # unreachable: one line, the password masked
    err = capsys.readouterr().err
    assert "cvae:***@127.0.0.1" in err and "hunter2" not in err


@pytest.mark.parametrize("variable", ["CVAE_STORAGE", "CVAE_STORAGE_FILE"])
def test_the_storage_can_come_from_the_environment(tracking_store, tmp_path, capsys,
                                                   monkeypatch, variable):
    journal = str(tmp_path / "queue.journal")
    if variable == "CVAE_STORAGE_FILE":
        secret = tmp_path / "storage.url"
        secret.write_text(journal + "\n")
        secret.chmod(0o644)
        monkeypatch.setenv(variable, str(secret))
        assert queue.main(["status", "--study", "q"]) == 2
        assert "can be read by other users: chmod 600" in error_line(capsys)
        secret.chmod(0o600)
    else:
        monkeypatch.setenv(variable, journal)
    assert queue.main(["coordinate", "--study", "q", "--ablation", "kl", "--seeds", "0",
                       *SMOKE]) == 0
    assert queue.main(["status", "--study", "q"]) == 0
    assert "0/3 complete" in capsys.readouterr().out


def test_no_storage_anywhere_and_an_empty_one_are_one_line(tracking_store, capsys, monkeypatch):
    monkeypatch.delenv("CVAE_STORAGE", raising=False)
    monkeypatch.delenv("CVAE_STORAGE_FILE", raising=False)
    assert queue.main(["status", "--study", "q"]) == 2
    assert "give --storage URL, or set $CVAE_STORAGE" in error_line(capsys)
    assert queue.main(["status", "--study", "q", "--storage", ""]) == 2
    assert "--storage is empty" in error_line(capsys)
