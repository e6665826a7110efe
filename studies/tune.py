"""Tune the learning rate and the KL annealing (cycles, ratio) with Optuna; every trial is an
MLflow run.

    python -m studies.tune [--spec NAME|FILE.toml] [--n-trials N] [--timeout S]
                           [--storage URL|PATH.journal|PATH.log] [--study-name NAME]
                           [--sampler tpe|qmc|random] [--pruner median|hyperband|none]
                           [--profile smoke|cpu|full] [--epochs E] [--workers K] [--seed S]
                           [--per-arm ABLATION [--rerun-seeds 1 2 3]]
                           [--device cpu|cuda|mps] [--data PATH]

    python -m studies.tune --spec report_final --n-trials 12 --profile cpu --epochs 8
    python -m studies.tune --per-arm kl --n-trials 12 --profile cpu --rerun-seeds 1 2 3
    optuna-dashboard sqlite:///mlruns/optuna.db --host 127.0.0.1 --port 8080

Search space, objective and pruning: see ``studies.tuning`` (a spec file's ``[search]`` table
changes the space). The objective is the final validation PSNR (maximized); pruned trials end
their MLflow run KILLED, a non-finite loss fails the trial and the study goes on.

- Storage (``--storage``, see ``studies.storage``): default ``sqlite:///mlruns/optuna.db``
  (never MLflow's file); PostgreSQL for several machines; a path ending in ``.journal`` or
  ``.log`` is a journal file (best for ``--workers`` on one machine). The study resumes when
  rerun with the same name: ``--n-trials`` is its total, so only the missing trials run.
- ``--workers K``: K ``--worker`` processes of this command share the study; ``--worker`` on
  other machines joins it. Each process claims its next trial under the storage's lock while
  the study holds fewer than N, so exactly N run in all.
- MLflow: experiment ``tune-<study>``, a parent run per Optuna study, a child run per trial
  (tags ``trial``, ``optuna_study``, and ``trial_state`` = COMPLETE | PRUNED | FAIL).
- Outputs in ``mlruns/reports/<study>/`` (also logged to the parent run under ``tuning/``):
  ``best_spec.toml`` (runs with ``python -m experiments run FILE --profile P --epochs E``),
  ``optimization_history.png``, ``intermediate_values.png``, ``param_importances.png``
  (from 5 complete trials on), ``slice.png``, ``trials.csv``; it says whether the best point
  lies on the edge of the space.
- ``--per-arm ABLATION`` (the tuning playbook's protocol): one study per arm
  (``<study>-<arm>``) with the same space, budget and sampler seed, the arm's scientific
  setting fixed; then each arm's best settings are rerun over ``--rerun-seeds`` (by default
  three seeds the trials did not train with: a trial's own seed is biased upward) (experiment
  ``<study>-rerun``) and compared like an ablation study (``mlruns/reports/<study>-rerun/``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cvae.train import NonFiniteLossError
from experiments import tracking
from experiments.cli import (
    Parser,
    add_common,
    cpu_count,
    guarded,
    pin_threads,
    resolve_profile_and_device,
    seed_arg,
)
from experiments.registry import (
    SPECS,
    Ablation,
    Arm,
    explicit_keys,
    get_ablation,
    resolve,
    resolve_spec,
)
from experiments.spec import ExperimentSpec, SpecError, apply_overrides, flatten, spec_hash
from studies import queue, results, tuning
from studies import storage as storages
from studies.grid import Grid, first_paragraph, run_here
from studies.report import REPORTS


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m studies.tune", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=None, metavar="NAME|FILE.toml",
                        help="the spec to tune (default: report_final); a .toml file may hold "
                             "a [search] table")
    parser.add_argument("--per-arm", default=None, metavar="ABLATION",
                        help="tune each arm of this ablation separately, then rerun the best")
    parser.add_argument("--n-trials", type=int, default=20,
                        help="trials in the study, in all (default: 20; per arm with --per-arm)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="stop starting trials after S seconds (per worker and study)")
    parser.add_argument("--storage", default=None, metavar="URL|PATH",
                        help=f"Optuna storage (default: {storages.DEFAULT_STORAGE})")
    parser.add_argument("--study-name", default=None,
                        help="default: <spec>-<profile>-<epochs>ep (<ablation>-<profile>-<epochs>ep "
                             "with --per-arm)")
    parser.add_argument("--sampler", choices=tuning.SAMPLERS, default="tpe")
    parser.add_argument("--pruner", choices=tuning.PRUNERS, default="median")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the study on this machine (default: 1)")
    parser.add_argument("--worker", action="store_true",
                        help="join the study in --storage (PostgreSQL for several machines) "
                             "that the same command without --worker created: run trials "
                             "until it has --n-trials, log them under its parent run, no "
                             "report (the coordinating command writes it)")
    parser.add_argument("--arm", default=None, metavar="ARM",
                        help="with --per-arm --worker: join only this arm's study")
    parser.add_argument("--rerun-seeds", type=seed_arg, nargs="+", default=None, metavar="SEED",
                        help="rerun the best settings over these seeds (default with --per-arm: "
                             "three seeds the trials did not train with, 1 2 3 for specs of "
                             "seed 0; otherwise no rerun)")
    add_common(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# Taking trials: the one loop of the command, its --workers and --worker processes
# ---------------------------------------------------------------------------------------------
def open_job_study(job: tuning.StudyJob, *, worker: int = 0) -> optuna.Study:
    """The job's study (created, or resumed if it is about the same thing), with heartbeats
    and retries on a database storage and a sampler seeded for this worker."""
    search = job.search
    storage = queue.beating_storage(job.storage, storages.DEFAULT_BEATS)
    sampler = tuning.make_sampler(search.sampler, seed=search.seed, n_trials=search.n_trials)
    with storages.storage_errors(job.storage):
        study = tuning.open_study(storage, job.study_name, sampler=sampler,
                                  pruner=tuning.make_pruner(search.pruner, job.base),
                                  identity=tuning.study_identity(job.base, search.space,
                                                                 job.grid.profile))
        study.sampler = tuning.make_sampler(
            search.sampler, seed=search.seed, n_trials=search.n_trials, worker=worker,
            existing_trials=len(study.get_trials(deepcopy=False)))
    return study


def _heartbeat(job: tuning.StudyJob) -> int | None:
    return None if storages.is_journal(job.storage) else storages.HEARTBEAT


def claim(study: optuna.Study, n_trials: int) -> optuna.Trial | None:
    """The next trial for this process (call under the storage's lock): a waiting one (a
    retry) first, else a new one while the study holds fewer than ``n_trials`` finished,
    running or waiting trials (an interrupted one does not count: its retry does)."""
    trials = study.get_trials(deepcopy=False)
    taken = sum(t.state in (*tuning.FINISHED, TrialState.RUNNING, TrialState.WAITING)
                and not tuning.interrupted(t) for t in trials)
    if taken >= n_trials and not any(t.state == TrialState.WAITING for t in trials):
        return None
    with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": we beat
        warnings.simplefilter("ignore")
        trial = study.ask()
    trial.set_user_attr("worker", queue.me())
    return trial


def retry_dead(study: optuna.Study) -> None:
    """Trials whose process here was killed: interrupted, and enqueued again with the same
    settings, so that their MLflow runs resume (at once, heartbeats or not)."""
    for trial in queue.dead_here(study, interrupted=True):
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        print(f"[{study.study_name}] trial {trial.number}: its process is gone; enqueued again "
              "with the same settings (its run resumes)", flush=True)


def take_trials(job: tuning.StudyJob, study: optuna.Study, *, data: Any,
                progress: bool | None, linger: bool = False) -> int:
    """Claim, run and tell trials here until the study holds ``n_trials`` (or the timeout
    has passed); a non-finite loss or a pruned trial is a result and the study goes on.
    ``linger``: then wait for the trials running elsewhere (a dead worker's is failed after
    the grace period and retried, here). Returns how many ran here."""
    objective = tuning.job_objective(job, data, progress=progress)
    started, ran, announced = time.monotonic(), 0, False
    while job.search.timeout is None or time.monotonic() - started < job.search.timeout:
        with storages.exclusive(job.storage), storages.storage_errors(job.storage):
            optuna.storages.fail_stale_trials(study)
            retry_dead(study)
            trial = claim(study, job.search.n_trials)
            running = tuning.counts(study)["RUNNING"]
        if trial is None and linger and running:
            if not announced:
                print(f"[{job.study_name}] waiting for {running} trial(s) running elsewhere",
                      flush=True)
                announced = True
            time.sleep(5.0)
            continue
        if trial is None:
            break
        with queue.Heartbeat(study._storage, trial._trial_id, _heartbeat(job),
                             lambda: (optuna.storages.fail_stale_trials(study), retry_dead(study))):
            state, value = _run_objective(study, trial, objective)
        queue.tell(study, trial, state, value)
        tuning.print_trial(study, study._storage.get_trial(trial._trial_id))
        ran += 1
        gc.collect()
    return ran


def _run_objective(study: optuna.Study, trial: optuna.Trial,
                   objective: tuning.Objective) -> tuple[TrialState, float | None]:
    """(state, value) of one trial; an error other than a result fails it and propagates."""
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        return TrialState.PRUNED, None
    except NonFiniteLossError:
        return TrialState.FAIL, None
    except BaseException:
        queue.tell(study, trial, TrialState.FAIL)
        raise
    return (TrialState.COMPLETE, value) if math.isfinite(value) else (TrialState.FAIL, None)


def _parent_query(job: tuning.StudyJob) -> str:
    return (f"tags.{results.PARENT_TAG} = '1' and "
            f"tags.optuna_study = {tracking.quote_filter_value(job.study_name)}")


def serve_study(job: tuning.StudyJob, *, data: Any) -> None:
    """``--worker``: join a study its coordinating command created (same flags, no
    ``--worker``) and take trials until it holds ``n_trials``, filed under its parent run."""
    from mlflow.tracking import MlflowClient

    tracking.configure()
    client = MlflowClient()
    found = client.get_experiment_by_name(job.grid.study)
    parents = [] if found is None else client.search_runs(
        [found.experiment_id], filter_string=_parent_query(job), max_results=1)
    if not parents:
        raise SpecError(f"no study {job.study_name!r} to join in MLflow experiment "
                        f"{job.grid.study!r}: start the same command without --worker first "
                        "(it creates the study and its parent run)")
    job.experiment_id, job.parent_run_id = found.experiment_id, parents[0].info.run_id
    print(f"[{job.study_name}] worker {queue.me()}: taking trials until the study has "
          f"{job.search.n_trials}", flush=True)
    ran = take_trials(job, open_job_study(job, worker=os.getpid()), data=data, progress=False)
    print(f"[{job.study_name}] worker {queue.me()}: {ran} trial(s) here; the study has its "
          f"{job.search.n_trials} trials", flush=True)


# ---------------------------------------------------------------------------------------------
# One study: parent run, trials (here or in worker processes), report
# ---------------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    job: tuning.StudyJob
    best: Any  # FrozenTrial | None
    best_spec: ExperimentSpec | None
    edges: list[str]
    worker_failures: int = 0


def _parent_run(client: Any, job: tuning.StudyJob) -> str:
    """The study's parent run: reused (RUNNING again) when the study resumes, else created;
    its tags say what the study is."""
    found = client.search_runs([job.experiment_id], filter_string=_parent_query(job),
                               order_by=["attribute.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(job.experiment_id, run_name=job.study_name,
                                   tags={results.PARENT_TAG: "1", "study": job.grid.study,
                                         "optuna_study": job.study_name}).info.run_id
    base, search = job.base, job.search
    for key, value in {
            "spec": base.name, "spec_hash": spec_hash(base), "profile": job.grid.profile,
            "device": job.device, "epochs": base.train.epochs, "sampler": search.sampler,
            "sampler_seed": search.seed, "pruner": search.pruner, "n_trials": search.n_trials,
            "optuna_storage": job.storage, "search_space": search.space.to_json(),
            "arm": job.arm.name, "group": job.arm.group,
            "git_commit": tracking.git_commit()}.items():
        client.set_tag(run_id, key, tracking.mask_secrets(str(value)))
    return run_id


def tune_study(job: tuning.StudyJob, *, workers: int, data: Any, root: str) -> StudyResult:
    """Create (or resume) the study and its parent run, run the missing trials here or in
    ``workers`` processes, then write and log the report."""
    from mlflow.tracking import MlflowClient

    study = open_job_study(job)
    with storages.exclusive(job.storage), storages.storage_errors(job.storage):
        retry_dead(study)  # a killed earlier command's trials: their runs resume
        plan = tuning.plan_trials(study, job.search.n_trials)
    tracking.configure()
    client = MlflowClient()
    job.experiment_id = tracking.get_or_create_experiment(job.grid.study,
                                                          description=describe_tuning(job))
    job.parent_run_id = _parent_run(client, job)
    workers = min(workers, max(plan.to_run, 1))
    print(f"[{job.study_name}] {plan.done} of {job.search.n_trials} trials done, running "
          f"{plan.to_run} (workers: {workers}); storage {tracking.mask_secrets(job.storage)}; "
          f"MLflow experiment {job.grid.study} (parent run {job.parent_run_id})", flush=True)
    for line in [p.describe() for p in job.search.space.params] + list(job.search.space.notes):
        print(f"[{job.study_name}]   {line}", flush=True)
    if plan.retried:
        print(f"[{job.study_name}] retrying interrupted trial(s) {plan.retried}", flush=True)
    failures = 0
    try:
        if workers > 1:
            failures = _run_workers(job, workers)
        # Here (after local workers, what they left); on a shared database, then until no
        # trial runs anywhere (other machines' --worker processes).
        take_trials(job, study, data=data, progress=None, linger=storages.shared(job.storage))
    except BaseException as err:
        client.set_terminated(job.parent_run_id,
                              "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    result = report(job, client, root=root)
    result.worker_failures = failures
    client.set_terminated(job.parent_run_id, "FINISHED" if failures == 0 else "FAILED")
    return result


def describe_tuning(job: tuning.StudyJob) -> str:
    """The tuning experiment's description in the MLflow UI (Markdown)."""
    space = "; ".join(p.describe() for p in job.search.space.params)
    return (
        f"{first_paragraph(__doc__)}\n\n"
        f"Spec `{job.base.name}`, profile `{job.grid.profile}`, {job.base.train.epochs} epochs; "
        f"objective: final {tuning.OBJECTIVE} (maximized); searched: {space}. One parent run "
        "per Optuna study (named after it), one child run per trial (`<spec>-trial<NNN>`, "
        "tags `trial` and `trial_state` = COMPLETE | PRUNED | FAIL). The parent's artifacts "
        "hold the plots, `trials.csv` and `best_spec.toml` under `tuning/` (also in "
        "`mlruns/reports/<Optuna study>/`)."
    )


def _run_workers(job: tuning.StudyJob, workers: int) -> int:
    """``workers`` ``--worker`` processes of this very command (``job.argv``), sharing the
    cores; returns how many exited with an error."""
    threads = max(1, cpu_count() // workers)  # no oversubscription of the cores
    argv = [*job.argv, "--worker", "--threads", str(threads)]
    with queue.workers("studies.tune", [argv] * workers, threads=threads,
                       storage=job.storage) as procs:
        pass
    for i, proc in enumerate(procs):
        if proc.returncode != 0:
            print(f"[{job.study_name}] worker {i} exited with code {proc.returncode}",
                  file=sys.stderr, flush=True)
    return sum(proc.returncode != 0 for proc in procs)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def report(job: tuning.StudyJob, client: Any, *, root: str) -> StudyResult:
    """Best trial, edge check, best_spec.toml, plots and trials.csv; logged to the parent."""
    study, name = open_job_study(job), job.study_name  # a fresh view of every worker's trials
    out = REPORTS / name
    out.mkdir(parents=True, exist_ok=True)
    counts, best = tuning.counts(study), tuning.best_trial(study)
    files, notes = tuning.write_report_files(
        study, out, floor=tuning.copy_first_floor(client, job.parent_run_id))
    print(f"[{name}] {len(study.trials)} trials: {counts['COMPLETE']} complete, "
          f"{counts['PRUNED']} pruned, {counts['FAIL']} failed"
          + (f", {counts['RUNNING']} still running" if counts["RUNNING"] else ""), flush=True)
    result = StudyResult(job, best, None, [])
    if best is None:
        print(f"[{name}] no trial completed: no best settings", flush=True)
    else:
        files.append(_report_best(result, client, root, out))
    for note in notes:
        print(f"[{name}] note: {note}", flush=True)
    for key, value in counts.items():
        client.log_metric(job.parent_run_id, f"trials_{key.lower()}", value)
    for path in files:
        client.log_artifact(job.parent_run_id, str(path), "tuning")
    print(f"[{name}] report: {out}/ (also logged to parent run {job.parent_run_id} under "
          "tuning/)", flush=True)
    return result


def _report_best(result: StudyResult, client: Any, root: str, out: Path) -> Path:
    """The best trial: its spec file, whether it lies on an edge; printed and tagged."""
    job, best, name = result.job, result.best, result.job.study_name
    result.best_spec = replace(apply_overrides(job.base, best.params), name=f"{job.base.name}-tuned")
    result.edges = tuning.edge_report(job.search.space, best.params)
    path = write_best_spec(job, best, result.best_spec, root, out)
    print(f"[{name}] best: trial {best.number}, {tuning.OBJECTIVE} {best.value:.3f} dB, "
          f"{tuning.format_params(best.params)}", flush=True)
    for line in result.edges:
        print(f"[{name}] ON THE EDGE: {line}: widen or move that range", flush=True)
    if not result.edges:
        print(f"[{name}] the best point is inside the search space (no parameter within "
              f"{tuning.EDGE_FRACTION:.0%} of a bound)", flush=True)
    print(f"[{name}] best spec: {path}; rerun it with: python -m experiments run {path} "
          f"--profile {job.grid.profile} --epochs {job.base.train.epochs}", flush=True)
    client.log_metric(job.parent_run_id, "best_val_psnr", float(best.value))
    for key, value in {"best_trial": str(best.number),
                       "best_params": tuning.format_params(best.params),
                       "best_on_edge": "; ".join(result.edges) or "no",
                       "best_run_id": best.user_attrs.get("mlflow_run_id")}.items():
        if value is not None:
            client.set_tag(job.parent_run_id, key, value)
    return path


def write_best_spec(job: tuning.StudyJob, best: Any, spec: ExperimentSpec, root: str,
                    out: Path) -> Path:
    """``best_spec.toml``, checked to resolve back to exactly the best trial's spec."""
    path, profile, epochs = out / "best_spec.toml", job.grid.profile, spec.train.epochs
    header = [
        f"Best trial {best.number} of Optuna study {job.study_name!r}: "
        + f"{tuning.OBJECTIVE} {best.value:.3f} dB",
        f"tuned under --profile {profile} with {epochs} epoch{'s' if epochs != 1 else ''} "
        + "(model widths come from the profile)",
        f"rerun: python -m experiments run {path} --profile {profile} --epochs {epochs}",
    ]
    path.write_text(tuning.best_spec_toml(root=root, spec=spec, profile=profile,
                                          tuned=job.search.space.keys, header=header))
    again = resolve(str(path), profile=profile, epochs=epochs)
    if spec_hash(again) != spec_hash(spec):
        print(f"warning: {path} resolves to spec_hash {spec_hash(again)}, not the best trial's "
              f"{spec_hash(spec)}", file=sys.stderr)
    return path


def closest_registered(spec: ExperimentSpec) -> str:
    """The registered spec that differs from ``spec`` in the fewest fields (the `base` of a
    best_spec.toml for an ablation arm that is not registered itself)."""
    if spec.name in SPECS:
        return spec.name
    mine = flatten(spec)
    return min(SPECS, key=lambda name: sum(flatten(SPECS[name]).get(k) != v
                                           for k, v in mine.items()))


# ---------------------------------------------------------------------------------------------
# Reruns of the best settings
# ---------------------------------------------------------------------------------------------
def rerun_seeds(requested: list[int] | None, trial_seeds: set[int], *,
                count: int = 3) -> tuple[list[int], str | None]:
    """The seeds to rerun best settings over, and a warning. Default: the first ``count``
    seeds the trials did not train with. A trial's own seed would repeat the very run its
    settings were picked on: the winner of many tries on one seed, biased upward."""
    if requested is None:
        fresh = (s for s in itertools.count() if s not in trial_seeds)
        return list(itertools.islice(fresh, count)), None
    reused = sorted(set(requested) & trial_seeds)
    if not reused:
        return list(requested), None
    return list(requested), (
        f"seed {' '.join(map(str, reused))}: the trials trained with it, so its rerun repeats "
        "the run the best settings were picked on and is biased upward; seeds the trials did "
        "not use give a fair estimate")


def rerun(done: list[StudyResult], study: str, requested: list[int] | None,
          ablation: Ablation | None = None) -> bool:
    """The best settings of ``done`` over fresh seeds as a study of their own (its arms: the
    ``ablation``'s, tuned), reported like an ablation; True if a run failed."""
    from studies import summary
    from studies.report import report_study

    seeds, warning = rerun_seeds(requested, {r.job.grid.seeds[0] for r in done})
    if warning:
        print(f"[{study}] warning: {warning}", file=sys.stderr, flush=True)
    arms = tuple(Arm(r.job.arm.name, r.best_spec, r.job.arm.group,
                     keep=tuple(r.job.search.space.keys)) for r in done)
    job = done[0].job
    tuned = Ablation(ablation.name, arms, ablation.reference, ablation.scientific) if ablation \
        else Ablation(job.study_name, arms, arms[0].name, "none (best settings over seeds)")
    doc = (f"Best settings per arm from the Optuna studies {study.removesuffix('-rerun')}-<arm>, "
           f"rerun over seeds {seeds}." if ablation else "")
    grid = Grid(study, tuned, tuple(seeds), job.grid.profile, epochs=job.base.train.epochs,
                doc=doc)
    ran = run_here(grid, device=job.device)
    rerun_report = report_study(study, parent_run_id=ran.parent_run_id)
    if ablation:
        print(f"\n{rerun_report.terminal}\nrerun report: {rerun_report.out_dir}/ (MLflow "
              f"experiment {study}, parent run {ran.parent_run_id})")
    elif rerun_report.summary is not None and len(rerun_report.summary):
        row = rerun_report.summary.iloc[0]
        sd = "" if math.isnan(row["final_sd"]) else f" ± {row['final_sd']:.2f}"
        print(f"[{job.study_name}] best settings over seeds {seeds}: final {tuning.OBJECTIVE} "
              f"{row['final_mean']:.2f}{sd} dB (mean ± sd; {summary.CONFIDENCE:.0%} CI "
              f"[{row['final_ci_low']:.2f}, {row['final_ci_high']:.2f}]); report "
              f"{rerun_report.out_dir}/", flush=True)
    return bool(ran.failures)


def best_per_arm_table(args: argparse.Namespace, name: str, ablation: Ablation,
                       done: list[StudyResult]) -> None:
    """``best_per_arm.md``: each arm's best trial, printed and saved."""
    setup = (f"{args.n_trials} trials per arm, sampler {args.sampler} (seed {args.seed}), "
             f"pruner {args.pruner}, profile {done[0].job.grid.profile}; scientific "
             f"hyperparameter: {ablation.scientific}.")
    lines = [f"# {name}: best settings per arm", "", setup, "",
             "| arm | best final val/psnr (dB) | trial | settings | on the edge |",
             "|---|---|---|---|---|"]
    for r in done:
        value = f"{r.best.value:.2f}" if r.best else "no complete trial"
        params = tuning.format_params(r.best.params) if r.best else ""
        trial = str(r.best.number) if r.best else ""
        lines.append(f"| `{r.job.arm.name}` | {value} | {trial} | {params} | "
                     f"{'; '.join(r.edges) or 'no'} |")
    table = REPORTS / name / "best_per_arm.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[4:]) + f"\n(saved to {table})")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    args.storage = storages.given(args.storage)
    for flag, value, low in (("--n-trials", args.n_trials, 1), ("--workers", args.workers, 1),
                             ("--epochs", args.epochs, 1)):
        if value is not None and value < low:
            raise SpecError(f"{flag}={value} must be >= {low}")
    if args.timeout is not None and args.timeout <= 0:
        raise SpecError(f"--timeout={args.timeout} must be > 0")
    if args.worker and args.storage is None:
        raise SpecError("--worker joins the coordinating command's study: give its --storage "
                        "(postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB for several machines)")
    if args.worker and args.workers > 1:
        raise SpecError("--worker runs trials in this process; start more workers instead of "
                        "--workers")
    if args.per_arm and args.spec:
        raise SpecError("--per-arm takes its specs from the ablation's arms; drop --spec")
    if args.arm and not (args.per_arm and args.worker):
        raise SpecError("--arm goes with --per-arm --worker (join one arm's study)")


def make_jobs(args: argparse.Namespace, argv: list[str], *, profile: str, device: str,
              storage: str) -> list[tuning.StudyJob]:
    """One job per study the command runs: the spec's, or one per arm with ``--per-arm``.
    ``argv``: this command line, which its ``--worker`` processes repeat."""
    search = {"sampler": args.sampler, "pruner": args.pruner, "seed": args.seed,
              "n_trials": args.n_trials, "timeout": args.timeout}
    if args.per_arm:
        ablation = get_ablation(args.per_arm)
        arms = [a for a in ablation.arms if args.arm in (None, a.name)]
        if not arms:
            raise SpecError(f"--arm {args.arm!r} is not an arm of ablation {ablation.name!r}; "
                            f"arms: {', '.join(a.name for a in ablation.arms)}")
    else:
        spec = resolve_spec(args.spec or "report_final")
        arms = [Arm(spec.name, spec, spec.name, keep=tuple(explicit_keys(args.spec or "")))]
    grids = [Grid("", Ablation(arm.name, (arm,), arm.name, ""), (arm.spec.seed,), profile,
                  epochs=args.epochs, data=args.data) for arm in arms]
    epochs = grids[0].epochs_each
    name = args.study_name or f"{args.per_arm or grids[0].runs[0].spec.name}-{profile}-{epochs}ep"
    table = tuning.load_spec(args.spec)[1] if args.spec else {}
    worker_argv = without(argv, "--workers", "--storage")  # the storage: in the environment
    return [tuning.StudyJob(
        study_name=f"{name}-{grid.chosen[0].name}" if args.per_arm else name,
        grid=replace(grid, study=f"tune-{name}"),
        search=tuning.Search(tuning.search_space(grid.runs[0].spec, table), **search),
        storage=storage, device=device,
        argv=(*worker_argv, "--profile", profile, "--device", device,
              *(("--arm", grid.chosen[0].name) if args.per_arm else ())))
        for grid in grids]


def without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` less each of ``flags`` and its value (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for arg in argv:
        if not skip and arg.split("=")[0] not in flags:
            out.append(arg)
        skip = not skip and arg in flags
    return out


def _load_data(jobs: list[tuning.StudyJob], *, here: bool) -> dict[Any, Any]:
    """Each job's data by its ``data`` field, read here first as the study commands do: bad
    data fails before the storage, a study or a parent run exists. ``here`` False (worker
    processes will train): only a dataset folder is read, to check it."""
    from experiments.data import load_data

    loaded: dict[Any, Any] = {}
    for job in jobs:
        spec = job.base
        if spec.data not in loaded and (here or spec.data.source != "synthetic"):
            loaded[spec.data] = load_data(spec.data, job.grid.profile)
    return loaded


@guarded
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _check_args(args)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours
    pin_threads(args.threads)
    profile, device = resolve_profile_and_device(args)
    storage = storages.storage_url(args.storage)
    storages.check_url(storage)
    jobs = make_jobs(args, argv, profile=profile, device=device, storage=storage)
    data = _load_data(jobs, here=args.worker or args.workers <= 1)
    storages.open_storage(storage)  # a bad URL fails here, before any work
    tracking.configure()
    if args.worker:
        for job in jobs:
            serve_study(job, data=data.get(job.base.data))
        return 0
    if args.workers > 1 and storage.startswith("sqlite"):
        print("note: several workers on SQLite work but Optuna recommends a journal file "
              "(--storage mlruns/optuna.journal) or PostgreSQL", file=sys.stderr)
    started = time.monotonic()
    done = [tune_study(job, workers=args.workers, data=data.get(job.base.data),
                       root=closest_registered(job.arm.spec) if args.per_arm
                       else tuning.registered_root(args.spec or "report_final"))
            for job in jobs]
    code = 1 if any(r.worker_failures or r.best is None for r in done) else 0
    if args.per_arm:
        name = jobs[0].grid.study.removeprefix("tune-")
        best_per_arm_table(args, name, get_ablation(args.per_arm), done)
        missing = [r.job.arm.name for r in done if r.best is None]
        if missing:
            print(f"no rerun: arm(s) {', '.join(missing)} have no complete trial",
                  file=sys.stderr)
        else:
            code = max(code, int(rerun(done, f"{name}-rerun", args.rerun_seeds,
                                       get_ablation(args.per_arm))))
    elif done[0].best is not None and args.rerun_seeds:
        code = max(code, int(rerun(done, f"{jobs[0].study_name}-rerun", args.rerun_seeds)))
    print(f"wall time: {time.monotonic() - started:.0f} s; dashboard: optuna-dashboard "
          f"{tracking.mask_secrets(storage)} --host 127.0.0.1 --port 8080", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
