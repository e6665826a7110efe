"""Tuning (studies.tuning, studies.tune): the search space and its validation, the objective
with FixedTrial, storages, an end-to-end study with a failed and a pruned trial, two worker
processes sharing one study, and the best_spec.toml round trip.

Trials train on a tiny slice of the smoke data (clips of 4 frames, a quarter of the training
frames, 2 epochs): seconds each.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from conftest import run_cli
from mlflow.tracking import MlflowClient
from optuna.trial import FixedTrial, TrialState

from cvae.train import NonFiniteLossError
from experiments.registry import SPECS, apply_profile, explicit_keys, resolve_spec
from experiments.runner import RunContext, RunOutcome
from experiments.spec import SpecError, apply_overrides, spec_hash
from studies import tune, tuning

TINY = """base = "report_final"
name = "tiny"
[data]
clip_len = 4
partial = 0.25
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def tiny_spec(path: Path, epochs: int = 2):
    return apply_profile(resolve_spec(str(path)), "smoke", epochs=epochs)


def _child_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("study_parent") != "1"]


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------
def test_default_space_follows_the_kl_variant_and_the_epochs():
    cpu = apply_profile(SPECS["report_final"], "cpu", epochs=16)
    space = tuning.default_search_space(cpu)
    assert space.params == (tuning.SearchParam("optim.lr", 1e-5, 3e-3, log=True),
                            tuning.SearchParam("kl.cycles", 1, 8, integer=True),
                            tuning.SearchParam("kl.ratio", 0.1, 1.0))
    assert tuning.default_search_space(apply_profile(SPECS["kl_monotonic"], "cpu")).keys == \
        ["optim.lr", "kl.ratio"]
    constant = tuning.default_search_space(apply_profile(SPECS["kl_constant"], "cpu"))
    assert constant.keys == ["optim.lr"] and len(constant.notes) == 2
    short = tuning.default_search_space(apply_profile(SPECS["report_final"], "smoke", epochs=3))
    assert "kl.cycles" not in short.keys and "kl.cycles not searched" in short.notes[0]
    one = tuning.default_search_space(apply_profile(SPECS["report_final"], "smoke", epochs=1))
    assert one.keys == ["optim.lr"]  # a one-epoch ramp ignores the ratio


def test_search_table_replaces_adds_and_removes_entries():
    spec = apply_profile(SPECS["report_final"], "cpu", epochs=16)
    space = tuning.search_space(spec, {
        "optim.lr": {"low": 1e-4, "high": 1e-3, "log": True},
        "optim.weight_decay": {"low": 0.0, "high": 0.1},
        "kl.ratio": False,
    })
    assert space.keys == ["optim.lr", "kl.cycles", "optim.weight_decay"]
    assert space.params[0] == tuning.SearchParam("optim.lr", 1e-4, 1e-3, log=True)
    assert any("kl.ratio not searched" in n for n in space.notes)


@pytest.mark.parametrize(("table", "message"), [
    ({"optim.lrr": {"low": 1, "high": 2}}, "unknown key 'optim.lrr'"),
    ({"kl.value": {"low": 0.1, "high": 1.0}}, "not a field of the cyclical KL"),
    ({"kl.kind": {"low": 0, "high": 1}}, "only numeric fields"),
    ({"data.partial": {"low": 0.1, "high": 1.0}}, "data.* cannot be searched"),
    ({"optim.lr": {"low": 1e-3, "high": 1e-4}}, "must be < high"),
    ({"optim.lr": {"low": 0.0, "high": 1e-3, "log": True}}, "log = true needs low > 0"),
    ({"optim.lr": {"low": 1e-5}}, "needs both low and high"),
    ({"optim.lr": {"low": 1e-5, "high": 1e-3, "step": 2}}, "unknown option(s) step"),
    ({"kl.ratio": {"low": 0.5, "high": 1.5}}, "kl.ratio=1.5 must be in (0, 1]"),
    ({"kl.cycles": {"low": 1, "high": 8, "int": False}}, "integer field"),
    ({"kl.cycles": {"low": 1.5, "high": 8, "int": True}}, "integer bounds"),
    ({"optim.lr": 0.001}, "expected a table"),
    ({"optim.lr": False, "kl.cycles": False, "kl.ratio": False}, "nothing to search"),
])
def test_bad_search_entries_are_one_line_spec_errors(table, message):
    spec = apply_profile(SPECS["report_final"], "cpu", epochs=16)
    with pytest.raises(SpecError) as err:
        tuning.search_space(spec, table)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_spec_file_with_a_search_table(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "report_final"\n[optim]\nlr = 1e-4\n[search]\n'
                    '"kl.cycles" = {low = 1, high = 4, int = true}\n"kl.ratio" = false\n')
    spec, table = tuning.load_spec(str(path))
    assert (spec.name, spec.optim.lr) == ("mine", 1e-4)
    space = tuning.search_space(apply_profile(spec, "cpu", epochs=16), table)
    assert space.keys == ["optim.lr", "kl.cycles"] and space.params[1].high == 4
    path.write_text('base = "report_final"\n[optim]\nlrr = 1\n[search]\n"kl.ratio" = false\n')
    with pytest.raises(SpecError, match=rf"{path}: unknown key 'optim.lrr'"):
        tuning.load_spec(str(path))


def test_edge_report_uses_the_sampled_scale():
    space = tuning.SearchSpace((tuning.SearchParam("optim.lr", 1e-5, 3e-3, log=True),
                                tuning.SearchParam("kl.ratio", 0.1, 1.0)))
    assert tuning.edge_report(space, {"optim.lr": 1e-4, "kl.ratio": 0.5}) == []
    (line,) = tuning.edge_report(space, {"optim.lr": 2.5e-3, "kl.ratio": 0.5})
    assert "optim.lr" in line and "upper edge" in line and "log scale" in line
    (line,) = tuning.edge_report(space, {"optim.lr": 1e-4, "kl.ratio": 0.12})
    assert "kl.ratio" in line and "lower edge" in line  # 2% of the linear range


# ---------------------------------------------------------------------------------------------
# Trials bookkeeping
# ---------------------------------------------------------------------------------------------
def test_plan_counts_the_studys_total():
    study = optuna.create_study(direction="maximize")
    for value in (1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"x": value},
            distributions={"x": optuna.distributions.FloatDistribution(0, 10)}))
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.FAIL, params={"x": 3.0}, user_attrs={"interrupted": True},
        distributions={"x": optuna.distributions.FloatDistribution(0, 10)}))
    plan = tuning.plan_trials(study, 5)
    # 2 done (the interrupted one does not count), 3 to run, the first a retry of trial 2.
    assert (plan.done, plan.to_run, plan.retried) == (2, 3, [2])
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"x": 3.0}]
    assert tuning.plan_trials(study, 5).retried == []  # enqueued once only


def test_a_resumed_study_must_be_about_the_same_thing():
    storage = optuna.storages.InMemoryStorage()
    spec = apply_profile(SPECS["report_final"], "smoke")
    space = tuning.default_search_space(spec)
    sampler, pruner = optuna.samplers.RandomSampler(0), optuna.pruners.NopPruner()
    identity = tuning.study_identity(spec, space, "smoke")
    tuning.open_study(storage, "s", sampler=sampler, pruner=pruner, identity=identity)
    tuning.open_study(storage, "s", sampler=sampler, pruner=pruner, identity=identity)
    other = tuning.study_identity(apply_profile(SPECS["report_final"], "cpu"), space, "cpu")
    with pytest.raises(SpecError, match="exists with"):
        tuning.open_study(storage, "s", sampler=sampler, pruner=pruner, identity=other)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------
def test_objective_puts_the_trial_params_into_the_spec(monkeypatch):
    seen = {}

    def fake_run(spec, *, context, device, data, progress, hooks):
        seen.update(spec=spec, context=context, hooks=hooks)
        return RunOutcome("run-1", "FINISHED", metrics={"val/psnr": 21.5})

    monkeypatch.setattr(tuning, "run_experiment", fake_run)
    monkeypatch.setattr(tuning.Objective, "_mark", lambda *a, **k: None)
    base = apply_profile(SPECS["report_final"], "cpu", epochs=16)
    objective = tuning.Objective(base, tuning.default_search_space(base), study_name="s",
                                 context=RunContext(study="tune-s", experiment_id="1"))
    trial = FixedTrial({"optim.lr": 4e-4, "kl.cycles": 3, "kl.ratio": 0.25}, number=7)
    assert objective(trial) == 21.5
    spec = seen["spec"]
    assert (spec.optim.lr, spec.kl.cycles, spec.kl.ratio) == (4e-4, 3, 0.25)
    assert replace(spec, optim=base.optim, kl=base.kl) == base  # nothing else changed
    assert seen["context"].extra_tags == {"trial": "7", "optuna_study": "s"}
    assert seen["context"].experiment_id == "1"
    assert isinstance(seen["hooks"], tuning.PruningHooks)


def test_objective_on_a_real_run_returns_its_val_psnr(tracking_store, tiny):
    base = tiny_spec(tiny)
    objective = tuning.Objective(base, tuning.default_search_space(base), study_name="unit",
                                 context=RunContext(study="tune-unit", profile="smoke"))
    trial = FixedTrial({"optim.lr": 2e-3, "kl.ratio": 0.3}, number=0)
    value = objective(trial)
    client = MlflowClient()
    (run,) = _child_runs(client, "tune-unit")
    assert run.info.status == "FINISHED"
    assert value == pytest.approx(run.data.metrics["val/psnr"])
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["kl.ratio"] == "0.3"
    tags = run.data.tags
    assert (tags["trial"], tags["optuna_study"], tags["trial_state"]) == ("0", "unit", "COMPLETE")
    assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
    assert run.info.run_name == f"{base.name}-trial000"  # apart in the UI, sorted by name


@pytest.mark.filterwarnings("ignore:.*out of (the )?range:UserWarning")
def test_a_non_finite_loss_fails_the_trial_with_its_reason(tracking_store, tiny):
    base = tiny_spec(tiny)
    space = tuning.SearchSpace((tuning.SearchParam("optim.lr", 1e-5, 3e-3, log=True),))
    objective = tuning.Objective(base, space, study_name="nan",
                                 context=RunContext(study="tune-nan", profile="smoke"))
    trial = FixedTrial({"optim.lr": 1e9}, number=0)
    with pytest.raises(NonFiniteLossError):
        objective(trial)
    assert "non-finite" in trial.user_attrs["stop_reason"]
    (run,) = _child_runs(MlflowClient(), "tune-nan")
    assert run.info.status == "FAILED" and run.data.tags["trial_state"] == "FAIL"


# ---------------------------------------------------------------------------------------------
# Storage errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", [
    "postgresql://tuner:hunter2@127.0.0.1:1/optuna",
    "nosuchdialect://tuner:hunter2@host/db",
    "notes.txt",
    "sqlite:///mlruns/mlflow.db",
])
def test_bad_storage_is_one_line_and_exit_2(tracking_store, tiny, capsys, storage):
    code = tune.main(["--spec", str(tiny), "--profile", "smoke", "--storage", storage])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and "hunter2" not in err


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
class PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report: a deterministic pruned trial."""

    def prune(self, study, trial) -> bool:
        return trial.number == 1


@pytest.mark.filterwarnings("ignore:.*out of (the )?range:UserWarning")
def test_study_end_to_end_with_a_failed_and_a_pruned_trial(tracking_store, tiny, tmp_path,
                                                           monkeypatch, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # Trial 0 is an enqueued absurd learning rate: its loss goes non-finite.
    optuna.create_study(storage=storage, study_name="e2e", direction="maximize") \
        .enqueue_trial({"optim.lr": 1e9})
    monkeypatch.setattr(tuning, "make_pruner", lambda name, spec: PruneTrialOne())
    code = tune.main(["--spec", str(tiny), "--n-trials", "4", "--profile", "smoke",
                      "--epochs", "2", "--storage", storage, "--study-name", "e2e",
                      "--sampler", "random"])
    out = capsys.readouterr().out
    assert code == 0, out

    study = optuna.load_study(study_name="e2e", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "FAIL", 1: "PRUNED", 2: "COMPLETE", 3: "COMPLETE"}  # it went on
    assert "non-finite" in study.trials[0].user_attrs["stop_reason"]
    assert study.trials[1].user_attrs["pruned_at_epoch"] == 0

    client = MlflowClient()
    children = _child_runs(client, "tune-e2e")
    assert sorted(int(r.data.tags["trial"]) for r in children) == [0, 1, 2, 3]
    mlflow_status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for run in children:
        state = states[int(run.data.tags["trial"])]
        assert run.data.tags["trial_state"] == state
        assert run.info.status == mlflow_status[state]
        assert run.data.tags["optuna_study"] == "e2e"
    (parent,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("tune-e2e").experiment_id])
        if r.data.tags.get("study_parent") == "1"]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    # the plots' floor line: the copy-first floor the trials' runs logged
    assert tuning.copy_first_floor(client, parent.info.run_id) == pytest.approx(
        children[0].data.metrics["val/psnr_copy_first"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    reports = tmp_path / "mlruns" / "reports" / "e2e"
    for name in ("best_spec.toml", "optimization_history.png", "intermediate_values.png",
                 "slice.png", "trials.csv"):
        assert (reports / name).is_file(), name
        assert f"tuning/{name}" in logged, name
    # Two complete trials are too few to rank parameters: no bar chart, and the note says why.
    assert not (reports / "param_importances.png").exists()
    assert "parameter importances skipped: they need at least 5 complete trials (2 so far)" in out
    assert "best: trial" in out and ("ON THE EDGE" in out or "inside the search space" in out)

    # The best spec resolves to the best trial's spec, and `experiments run` accepts it.
    best_run = client.get_run(study.best_trial.user_attrs["mlflow_run_id"])
    again = apply_profile(resolve_spec(str(reports / "best_spec.toml")), "smoke", epochs=2)
    assert spec_hash(again) == best_run.data.tags["spec_hash"]
    from experiments.__main__ import main as experiments_main

    assert experiments_main(["run", str(reports / "best_spec.toml"), "--profile", "smoke",
                             "--epochs", "2", "--study", "roundtrip"]) == 0
    (rerun,) = _child_runs(client, "roundtrip")
    assert rerun.data.tags["spec_hash"] == best_run.data.tags["spec_hash"]


def test_two_workers_share_one_study_without_duplicates_or_losses(tracking_store, tiny,
                                                                  tmp_path):
    journal = tmp_path / "study.journal"
    result = run_cli("studies.tune", "--spec", str(tiny), "--n-trials", "3", "--workers", "2",
                     "--storage", str(journal), "--study-name", "pair", "--profile", "smoke",
                     "--epochs", "2", "--pruner", "none", "--sampler", "random", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="pair",
                              storage=JournalStorage(JournalFileBackend(str(journal))))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2]  # exactly n_trials, each number once
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    children = _child_runs(MlflowClient(), "tune-pair")
    assert sorted(int(r.data.tags["trial"]) for r in children) == [0, 1, 2]
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == \
        {r.info.run_id for r in children}
    assert "workers: 2" in result.stdout


# ---------------------------------------------------------------------------------------------
# best_spec.toml
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arm", "profile", "epochs"), [
    ("report_final", "cpu", 16), ("kl_monotonic", "smoke", 2), ("tfr_decay", "full", 30)])
def test_best_spec_toml_resolves_to_the_tuned_spec(tmp_path, arm, profile, epochs):
    base = apply_profile(SPECS[arm], profile, epochs=epochs)
    space = tuning.default_search_space(base)
    params = {p.key: (p.low + p.high) / 2 if not p.integer else int(p.high) for p in space.params}
    tuned = replace(apply_overrides(base, params), name=f"{arm}-tuned")
    path = tmp_path / "best_spec.toml"
    path.write_text(tuning.best_spec_toml(root=arm, spec=tuned, profile=profile,
                                          tuned=space.keys, header=["a comment"]))
    # As `python -m experiments run best_spec.toml --profile P` reads it: the values the file
    # sets (the tuned lr) win over the profile's.
    assert "optim.lr" in explicit_keys(str(path))
    again = apply_profile(resolve_spec(str(path)), profile, epochs=epochs,
                          keep=explicit_keys(str(path)))
    assert spec_hash(again) == spec_hash(tuned) and again.name == f"{arm}-tuned"
    assert again.optim.lr == tuned.optim.lr  # floats survive the text round trip exactly


def test_best_spec_of_an_unregistered_arm_uses_the_closest_registered_base(tmp_path):
    from experiments.registry import get_ablation

    arm = next(a for a in get_ablation("report_tfr_groups").arms if a.name == "tfr_off+kl_constant")
    root = tune.closest_registered(arm.spec)
    assert root in SPECS
    tuned = replace(apply_profile(arm.spec, "smoke"), optim=replace(arm.spec.optim, lr=5e-4))
    path = tmp_path / "best_spec.toml"
    path.write_text(tuning.best_spec_toml(root=root, spec=tuned, profile="smoke",
                                          tuned=["optim.lr"]))
    assert spec_hash(apply_profile(resolve_spec(str(path)), "smoke",
                                   epochs=tuned.train.epochs)) == spec_hash(tuned)


@pytest.mark.slow
def test_per_arm_tunes_each_arm_then_reruns_the_best_over_seeds(tracking_store, tmp_path):
    result = run_cli("studies.tune", "--per-arm", "output", "--n-trials", "2", "--profile",
                     "smoke", "--epochs", "2", "--rerun-seeds", "0", "1",
                     "--storage", str(tmp_path / "arms.journal"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: seed 0: the trials trained with it" in result.stderr  # biased upward
    client = MlflowClient()
    trials = _child_runs(client, "tune-output-smoke-2ep")
    assert sorted((r.data.tags["arm"], r.data.tags["trial"]) for r in trials) == [
        ("identity", "0"), ("identity", "1"), ("sigmoid", "0"), ("sigmoid", "1")]
    reruns = _child_runs(client, "output-smoke-2ep-rerun")
    assert sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in reruns) == [
        ("identity", "0"), ("identity", "1"), ("sigmoid", "0"), ("sigmoid", "1")]
    reports = tmp_path / "mlruns" / "reports"
    for arm in ("identity", "sigmoid"):
        best = resolve_spec(str(reports / f"output-smoke-2ep-{arm}" / "best_spec.toml"))
        assert best.model.output_activation == arm  # the scientific setting stays fixed
    assert (reports / "output-smoke-2ep" / "best_per_arm.md").is_file()
    assert (reports / "output-smoke-2ep-rerun" / "summary.md").is_file()
    assert (reports / "output-smoke-2ep-rerun" / "val_psnr.png").is_file()


@pytest.mark.parametrize("complete", [4, 5])
def test_importances_are_drawn_only_from_enough_complete_trials(tmp_path, complete):
    study = optuna.create_study(direction="maximize", study_name="imp")
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    ratio = optuna.distributions.FloatDistribution(0.1, 1.0)
    for i in range(complete):
        study.add_trial(optuna.trial.create_trial(
            params={"optim.lr": 10 ** (-5 + 0.6 * i), "kl.ratio": 0.1 + 0.2 * (i % 3)},
            distributions={"optim.lr": lr, "kl.ratio": ratio}, value=18.0 + 0.5 * i,
            intermediate_values={0: 17.0 + 0.5 * i}))
    study.add_trial(optuna.trial.create_trial(  # pruned trials do not count
        params={"optim.lr": 1e-3, "kl.ratio": 0.5}, distributions={"optim.lr": lr, "kl.ratio": ratio},
        state=TrialState.PRUNED, intermediate_values={0: 10.0}))
    written, notes = tuning.write_plots(study, tmp_path)
    names = {p.name for p in written}
    assert {"optimization_history.png", "intermediate_values.png", "slice.png"} <= names
    if complete >= tuning.MIN_TRIALS_FOR_IMPORTANCE:
        assert "param_importances.png" in names and (tmp_path / "param_importances.png").is_file()
        assert not notes
    else:
        assert "param_importances.png" not in names
        assert notes == [("parameter importances skipped: they need at least 5 complete "
                          f"trials ({complete} so far)")]


def test_reruns_default_to_seeds_the_trials_did_not_train_with():
    assert tune.rerun_seeds(None, {0}) == ([1, 2, 3], None)
    assert tune.rerun_seeds(None, {0, 2}) == ([1, 3, 4], None)
    assert tune.rerun_seeds([5, 6], {0}) == ([5, 6], None)
    seeds, warning = tune.rerun_seeds([0, 1, 2], {0})
    assert seeds == [0, 1, 2] and warning.startswith("seed 0: the trials trained with it")
    assert "rerun the best settings over these seeds (default with --per-arm: three seeds the " \
        "trials did not train with" in " ".join(tune.build_parser().format_help().split())
