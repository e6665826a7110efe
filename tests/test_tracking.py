"""MLflow plumbing: the git_commit tag, and creating a new local store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import cli_env

import experiments
from experiments import tracking


def _code_commit() -> str:
    repo = Path(experiments.__file__).resolve().parents[1]
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("the project is not a git checkout here")
    return out.stdout.strip()


def test_git_commit_is_the_codes_commit_from_any_working_directory(tmp_path, monkeypatch):
    """The tag names the commit of the code that ran, wherever the run was started from (a
    results folder, another repository), not that folder's repository."""
    expected = _code_commit()
    elsewhere = tmp_path / "other_repo"
    elsewhere.mkdir()
    subprocess.run(["git", "init", "-q", str(elsewhere)], check=True)
    subprocess.run(["git", "-C", str(elsewhere), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "other"], check=True)
    for cwd in (tmp_path, elsewhere):
        monkeypatch.chdir(cwd)
        assert tracking.git_commit() == expected


def test_runs_started_together_on_a_new_store_all_get_it(tmp_path):
    """MLflow builds a new SQLite store's tables on first use, without a lock: four runs
    started at once on a new store all died in its migrations (and broke the store) before
    ``configure`` took a file lock around it."""
    code = ("from experiments import tracking; tracking.configure(); "
            "from mlflow.tracking import MlflowClient; "
            "print(len(MlflowClient().search_experiments()))")
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default: ./mlruns/mlflow.db
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for returncode, out, err in results:
        assert returncode == 0, err[-2000:]
        assert out.strip() == "1"  # the Default experiment, in a working store


# ---------------------------------------------------------------------------------------------
# Secrets: one masking function for every form a password takes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, masked", [
    ("postgresql+psycopg2://cvae:hunter2@127.0.0.1:5432/optuna",
     "postgresql+psycopg2://cvae:***@127.0.0.1:5432/optuna"),
    # a password holding '@' (was half masked: cvae:***@hunter2@127.0.0.1), ':' or '/'
    ("postgresql://cvae:hunter2@x@127.0.0.1:5432/optuna", "postgresql://cvae:***@127.0.0.1:5432/optuna"),
    ("postgresql://cvae:hun:ter@2@db.lab/optuna", "postgresql://cvae:***@db.lab/optuna"),
    ("postgresql://cvae:hunter/2@db.lab/optuna", "postgresql://cvae:***@db.lab/optuna"),
    ("mysql://cvae:hunter2@db.lab", "mysql://cvae:***@db.lab"),
    ("https://:hunter2@mlflow.lab/", "https://:***@mlflow.lab/"),
    # inside a sentence, in quotes, with an '@' later in the query
    ("error: postgresql://u:hunter2@h:5432/db, retrying", "error: postgresql://u:***@h:5432/db, retrying"),
    ("--storage 'postgresql://u:hunter2@@h/db'", "--storage 'postgresql://u:***@h/db'"),
    ("postgresql://u:hunter2@h/db?user=a@b.c", "postgresql://u:***@h/db?user=a@b.c"),
    # password=, pass=, pwd= query parameters (were printed in clear)
    ("postgresql://h/optuna?password=hunter2", "postgresql://h/optuna?password=***"),
    ("postgresql://h/optuna?user=u&pass=hunter2&sslmode=require",
     "postgresql://h/optuna?user=u&pass=***&sslmode=require"),
    ("mssql://h/db?PWD=hunter2", "mssql://h/db?PWD=***"),
    # environment text
    ("PGPASSWORD=hunter2 psql -h h", "PGPASSWORD=*** psql -h h"),
    ("MLFLOW_TRACKING_PASSWORD=hunter2", "MLFLOW_TRACKING_PASSWORD=***"),
    ("db_password=hunter2", "db_password=***"),
])
def test_mask_secrets_masks_every_form(text, masked):
    assert tracking.mask_secrets(text) == masked
    assert "hunter" not in tracking.mask_secrets(text)


@pytest.mark.parametrize("text", [
    "http://127.0.0.1:5000", "sqlite:///mlruns/mlflow.db", "postgresql://cvae@h/optuna",
    "mlruns/optuna.journal", "compass=north bypass=1 passenger=2", "runs:/0123/model",
])
def test_mask_secrets_leaves_text_without_passwords_alone(text):
    assert tracking.mask_secrets(text) == text


def test_argparse_errors_mask_passwords_and_flags_are_never_abbreviated(capsys):
    from experiments.cli import Parser

    parser = Parser(prog="prog")
    parser.add_argument("--storage")
    run = parser.add_subparsers(dest="command").add_parser("run")
    run.add_argument("--seeds", type=int, nargs="+")
    run.add_argument("--epochs", type=int)
    for argv, shown in (
        (["run", "--storge", "postgresql://u:hunter2@x@h/db"],
         "unrecognized arguments: --storge postgresql://u:***@h/db"),
        (["run", "--seed", "0", "1"], "unrecognized arguments: --seed 0 1"),  # not --seeds
        (["run", "--epoch", "3"], "unrecognized arguments: --epoch 3"),  # not --epochs
        # an error of the sub-command's own parser
        (["run", "--epochs", "postgresql://h/db?password=hunter2"],
         "invalid int value: 'postgresql://h/db?password=***'"),
    ):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and shown in err and "hunter2" not in err, err


# ---------------------------------------------------------------------------------------------
# Filter strings: values quoted the way MLflow's parser reads them
# ---------------------------------------------------------------------------------------------
def test_filter_values_are_quoted_for_mlflows_parser(tracking_store):
    """MLflow takes a quoted value as it is, with no escapes: ``'bob\\'s'`` searches for a
    backslash. Each value goes in the quotes it does not contain."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.create_experiment("filters")
    names = ["bob's", 'say "hi"', "plain", "x' or tags.study = 'plain", "back\\slash"]
    runs = {name: client.create_run(experiment, tags={"study": name, "seed": "0"}).info.run_id
            for name in names}
    for name, run_id in runs.items():
        query = tracking.filter_string({"tags.study": name, "tags.seed": 0})
        found = client.search_runs([experiment], filter_string=query)
        assert [r.info.run_id for r in found] == [run_id], (name, query)
    assert tracking.filter_string({"tags.study": "bob's"}) == "tags.study = \"bob's\""
    with pytest.raises(tracking.TrackingError, match="holds both ' and \""):
        tracking.filter_string({"tags.study": "bob's \"x\""})


def test_find_runs_finds_a_spec_hash_and_seed(tracking_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.create_experiment("find")
    wanted = client.create_run(experiment, tags={"spec_hash": "abc", "seed": "1"}).info.run_id
    client.create_run(experiment, tags={"spec_hash": "abc", "seed": "2"})
    assert [r.info.run_id for r in tracking.find_runs(experiment, spec_hash="abc", seed=1)] \
        == [wanted]


# ---------------------------------------------------------------------------------------------
# A local store that cannot be written fails at once, before any run exists
# ---------------------------------------------------------------------------------------------
def test_a_store_path_through_a_file_fails_at_once(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    for uri in (f"sqlite:///{tmp_path}/afile/mlflow.db", f"sqlite:///{tmp_path}/afile/x/mlflow.db"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        start = time.monotonic()
        with pytest.raises(tracking.TrackingError) as info:
            tracking.configure()
        assert time.monotonic() - start < 5.0
        assert str(info.value) == (f"tracking store {uri}: {tmp_path}/afile is a file, "
                                   "not a folder")


def test_artifact_folder_through_a_file_fails_at_once(tmp_path, monkeypatch):
    (tmp_path / "mlruns").write_text("")  # ./mlruns/artifacts cannot exist
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store/mlflow.db")
    with pytest.raises(tracking.TrackingError, match="^artifact folder: mlruns is a file"):
        tracking.configure()


def test_a_store_in_a_read_only_folder_fails_in_one_line(tmp_path):
    """The real command, against a folder its user cannot write. Root writes anywhere, so as
    root the command runs as ``nobody`` (setpriv), in a folder under /tmp that nobody can
    reach (pytest's tmp_path is root's only)."""
    folder = Path(tempfile.mkdtemp(prefix="cvae-readonly-"))
    try:
        folder.chmod(0o755)
        read_only = folder / "store"
        read_only.mkdir()
        read_only.chmod(0o555)
        uri = f"sqlite:///{read_only}/mlflow.db"
        command = [sys.executable, "-m", "experiments", "run", "kl_cyclical", "--profile",
                   "smoke"]
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        start = time.monotonic()
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                                timeout=120, check=False,
                                env=cli_env(MLFLOW_TRACKING_URI=uri, HOME=str(folder)))
        elapsed = time.monotonic() - start
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        expected = f"error: tracking store {uri}: {read_only} is not writable (Permission denied)"
        assert errors == [expected], result.stderr
        assert "Traceback" not in result.stderr
        assert list(read_only.iterdir()) == []  # no store, so no run
        print(f"failed after {elapsed:.1f} s (the imports included)")
        assert elapsed < 60  # the check itself is milliseconds; imports dominate, under load
    finally:
        shutil.rmtree(folder)
