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

- Storage (``--storage``): default ``sqlite:///mlruns/optuna.db`` (never MLflow's file); any
  Optuna storage URL (PostgreSQL for several machines); a path ending in ``.journal`` or
  ``.log`` is a journal file (best for ``--workers`` on one machine). The study resumes when
  rerun with the same name: ``--n-trials`` is its total, so only the missing trials run.
- ``--workers K``: K processes share the study; the Optuna study, the MLflow experiment and the
  parent run are created first, here, then the trials are split so exactly N run in all.
- MLflow: experiment ``tune-<study>``, a parent run per Optuna study, a child run per trial
  (tags ``trial``, ``optuna_study``, and ``trial_state`` = COMPLETE | PRUNED | FAIL).
- Outputs in ``mlruns/reports/<study>/`` (also logged to the parent run under ``tuning/``):
  ``best_spec.toml`` (runs with ``python -m experiments run FILE --profile P --epochs E``),
  ``optimization_history.png``, ``intermediate_values.png``, ``param_importances.png``
  (from 5 complete trials on),
  ``slice.png``, ``trials.csv``; it says whether the best point lies on the edge of the space.
- ``--per-arm ABLATION`` (the tuning playbook's protocol): one study per arm
  (``<study>-<arm>``) with the same space, budget and sampler seed, the arm's scientific
  setting fixed; then each arm's best settings are rerun over ``--rerun-seeds`` (by default
  three seeds the trials did not train with: a trial's own seed is biased upward) (experiment
  ``<study>-rerun``) and compared with the ablation studies' summary table and figures
  (``mlruns/reports/<study>-rerun/``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from experiments import tracking
from experiments.cli import add_common, guarded, resolve_profile_and_device, seed_arg
from experiments.registry import SPECS, Ablation, Arm, apply_profile, explicit_keys, get_ablation
from experiments.spec import ExperimentSpec, SpecError, apply_overrides, flatten, spec_hash
from studies import tuning

REPORTS = tracking.MLRUNS / "reports"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studies.tune", description=__doc__,
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
                        help=f"Optuna storage (default: {tuning.DEFAULT_STORAGE})")
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
    parser.add_argument("--rerun-seeds", type=seed_arg, nargs="+", default=None, metavar="SEED",
                        help="rerun the best settings over these seeds (default with --per-arm: "
                             "three seeds the trials did not train with, 1 2 3 for specs of "
                             "seed 0; otherwise no rerun)")
    add_common(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# One study: parent run, trials (here or in worker processes), report
# ---------------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    job: tuning.StudyJob
    best: Any  # FrozenTrial | None
    best_spec: ExperimentSpec | None
    counts: dict[str, int]
    edges: list[str]
    out_dir: Path
    worker_failures: int = 0


def _parent_run(client: Any, job: tuning.StudyJob, tags: dict[str, str]) -> str:
    """The study's parent run: reused (RUNNING again) when the study resumes, else created."""
    query = f"tags.study_parent = '1' and tags.optuna_study = '{job.study_name}'"
    found = client.search_runs([job.experiment_id], filter_string=query,
                               order_by=["attribute.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(job.experiment_id, run_name=job.study_name,
                                   tags={"study_parent": "1", "study": job.experiment,
                                         "optuna_study": job.study_name}).info.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, tracking.mask_secrets(str(value)))
    return run_id


def serve_study(job: tuning.StudyJob, *, data: Any) -> None:
    """``--worker``: join a study its coordinating command created (same flags, no
    ``--worker``), run trials until it holds ``n_trials`` finished ones, filed under the
    coordinator's parent run. Returns the study's failed-trial count."""
    import optuna
    from mlflow.tracking import MlflowClient

    tracking.configure()
    client = MlflowClient()
    found = client.get_experiment_by_name(job.experiment)
    parents = [] if found is None else client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.study_parent = '1' and tags.optuna_study = '{job.study_name}'",
        max_results=1)
    if not parents:
        raise SpecError(f"no study {job.study_name!r} to join in MLflow experiment "
                        f"{job.experiment!r}: start the same command without --worker first "
                        "(it creates the study and its parent run)")
    job.experiment_id, job.parent_run_id = found.experiment_id, parents[0].info.run_id
    study = tuning.open_job_study(job, worker=os.getpid())
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in tuning.FINISHED for t in trials)
    interrupted = sum(t.state == optuna.trial.TrialState.FAIL and bool(t.user_attrs.get(
        "interrupted")) for t in trials)
    to_run = max(0, job.n_trials - done + interrupted)
    print(f"[{job.study_name}] worker {os.getpid()}: {done - interrupted} of {job.n_trials} "
          f"trials done; taking trials until the study has them all", flush=True)
    tuning.run_trials(study, tuning.job_objective(job, data, progress=None), n_trials=to_run,
                      stop_at=job.n_trials + interrupted, timeout=job.timeout,
                      count_running=True)
    print(f"[{job.study_name}] worker {os.getpid()}: the study has its {job.n_trials} trials",
          flush=True)


def _shared(storage: str) -> bool:
    """A database server (not SQLite, not a journal file): ``--worker`` processes on other
    machines may share the study."""
    return "://" in storage and not storage.startswith("sqlite")


def wait_for_others(job: tuning.StudyJob, poll: float = 5.0) -> None:
    """Before the report: trials that ``--worker`` processes elsewhere still run (a dead
    worker's trial is failed by the heartbeat check and retried)."""
    import optuna

    study = tuning.open_job_study(job, heartbeat=True)
    announced = False
    while True:
        optuna.storages.fail_stale_trials(study)
        running = tuning.counts(study)["RUNNING"]
        if running == 0:
            return
        if not announced:
            print(f"[{job.study_name}] waiting for {running} trial(s) running elsewhere",
                  flush=True)
            announced = True
        time.sleep(poll)


def tune_study(job: tuning.StudyJob, *, workers: int, data: Any, root: str) -> StudyResult:
    """Create (or resume) the study and its parent run, run the missing trials here or in
    ``workers`` processes, then write and log the report."""
    from mlflow.tracking import MlflowClient

    study = tuning.open_job_study(job)
    plan = tuning.plan_trials(study, job.n_trials)
    tracking.configure()
    client = MlflowClient()
    job.experiment_id = tracking.get_or_create_experiment(job.experiment)
    job.parent_run_id = _parent_run(client, job, {
        "spec": job.base.name, "spec_hash": spec_hash(job.base), "profile": job.profile,
        "device": job.device, "epochs": job.base.train.epochs, "sampler": job.sampler,
        "sampler_seed": job.seed, "pruner": job.pruner, "n_trials": job.n_trials,
        "optuna_storage": job.storage, "search_space": job.space.to_json(),
        "arm": job.arm or job.base.name, "group": job.group or job.arm or job.base.name,
        "git_commit": tracking.git_commit()})
    print(f"[{job.study_name}] {plan.done} of {job.n_trials} trials done, running "
          f"{plan.to_run} (workers: {min(workers, max(plan.to_run, 1))}); storage "
          f"{tracking.mask_secrets(job.storage)}; MLflow experiment {job.experiment} "
          f"(parent run {job.parent_run_id})", flush=True)
    for line in [p.describe() for p in job.space.params] + list(job.space.notes):
        print(f"[{job.study_name}]   {line}", flush=True)
    if plan.retried:
        print(f"[{job.study_name}] retrying interrupted trial(s) {plan.retried}", flush=True)
    try:
        if workers <= 1 or plan.to_run <= 1:
            tuning.run_trials(study, tuning.job_objective(job, data, progress=None),
                              n_trials=plan.to_run, stop_at=plan.stop_at, timeout=job.timeout,
                              count_running=_shared(job.storage))
            failures = 0
        else:
            failures = run_workers(job, plan, workers)
        if _shared(job.storage):
            wait_for_others(job)  # --worker processes elsewhere may still run trials
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        client.set_terminated(job.parent_run_id, status)
        raise
    result = report(job, client, root=root)
    result.worker_failures = failures
    client.set_terminated(job.parent_run_id, "FINISHED" if failures == 0 else "FAILED")
    return result


def run_workers(job: tuning.StudyJob, plan: tuning.Plan, workers: int) -> int:
    """``plan.to_run`` trials split over ``workers`` spawned processes (each loads the data
    and joins the study); returns how many exited with an error."""
    import multiprocessing

    shares = [s for s in tuning.split(plan.to_run, workers) if s > 0]
    threads = max(1, (os.cpu_count() or 1) // len(shares))  # no oversubscription of the cores
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=tuning.work, name=f"{job.study_name}-worker{i}",
                             args=(job, i, share, plan.stop_at, threads))
             for i, share in enumerate(shares)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()  # SIGTERM: each worker ends its trial KILLED, then exits
        for proc in procs:
            proc.join()
        raise
    for proc in procs:
        if proc.exitcode != 0:
            print(f"[{job.study_name}] {proc.name} exited with code {proc.exitcode}",
                  file=sys.stderr, flush=True)
    return sum(proc.exitcode != 0 for proc in procs)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def report(job: tuning.StudyJob, client: Any, *, root: str) -> StudyResult:
    """Best trial, edge check, best_spec.toml, plots and trials.csv; logged to the parent."""
    study = tuning.open_job_study(job, heartbeat=False)  # a fresh view of every worker's trials
    out = REPORTS / job.study_name
    out.mkdir(parents=True, exist_ok=True)
    counts = tuning.counts(study)
    best = tuning.best_trial(study)
    files, notes = tuning.write_plots(study, out)
    table = study.trials_dataframe()
    if len(table):
        table.to_csv(out / "trials.csv", index=False)
        files.append(out / "trials.csv")
    name = job.study_name
    print(f"[{name}] {len(study.trials)} trials: {counts['COMPLETE']} complete, "
          f"{counts['PRUNED']} pruned, {counts['FAIL']} failed"
          + (f", {counts['RUNNING']} still running" if counts["RUNNING"] else ""), flush=True)
    best_spec, edges = None, []
    if best is None:
        print(f"[{name}] no trial completed: no best settings", flush=True)
    else:
        best_spec = replace(apply_overrides(job.base, best.params), name=f"{job.base.name}-tuned")
        edges = tuning.edge_report(job.space, best.params)
        path = write_best_spec(job, best, best_spec, root, out)
        files.append(path)
        print(f"[{name}] best: trial {best.number}, {tuning.OBJECTIVE} {best.value:.3f} dB, "
              f"{tuning.format_params(best.params)}", flush=True)
        if edges:
            for line in edges:
                print(f"[{name}] ON THE EDGE: {line}: widen or move that range", flush=True)
        else:
            print(f"[{name}] the best point is inside the search space (no parameter within "
                  f"{tuning.EDGE_FRACTION:.0%} of a bound)", flush=True)
        print(f"[{name}] best spec: {path}; rerun it with: python -m experiments run {path} "
              f"--profile {job.profile} --epochs {job.base.train.epochs}", flush=True)
        client.log_metric(job.parent_run_id, "best_val_psnr", float(best.value))
        client.set_tag(job.parent_run_id, "best_trial", str(best.number))
        client.set_tag(job.parent_run_id, "best_params", tuning.format_params(best.params))
        client.set_tag(job.parent_run_id, "best_on_edge", "; ".join(edges) or "no")
        if "mlflow_run_id" in best.user_attrs:
            client.set_tag(job.parent_run_id, "best_run_id", best.user_attrs["mlflow_run_id"])
    for note in notes:
        print(f"[{name}] note: {note}", flush=True)
    for key, value in counts.items():
        client.log_metric(job.parent_run_id, f"trials_{key.lower()}", value)
    for path in files:
        client.log_artifact(job.parent_run_id, str(path), "tuning")
    print(f"[{name}] report: {out}/ (also logged to parent run {job.parent_run_id} under "
          "tuning/)", flush=True)
    return StudyResult(job, best, best_spec, counts, edges, out)


def write_best_spec(job: tuning.StudyJob, best: Any, spec: ExperimentSpec, root: str,
                    out: Path) -> Path:
    """``best_spec.toml``, checked to resolve back to exactly the best trial's spec."""
    from experiments.registry import resolve_spec

    path = out / "best_spec.toml"
    epochs = spec.train.epochs
    header = [
        f"Best trial {best.number} of Optuna study {job.study_name!r}: "
        + f"{tuning.OBJECTIVE} {best.value:.3f} dB",
        f"tuned under --profile {job.profile} with {epochs} epoch{'s' if epochs != 1 else ''} "
        + "(model widths come from the profile)",
        f"rerun: python -m experiments run {path} --profile {job.profile} --epochs {epochs}",
    ]
    text = tuning.best_spec_toml(root=root, spec=spec, profile=job.profile,
                                 tuned=job.space.keys, header=header)
    path.write_text(text)
    again = apply_profile(resolve_spec(str(path)), job.profile, epochs=epochs,
                          keep=explicit_keys(str(path)))
    if spec_hash(again) != spec_hash(spec):
        print(f"warning: {path} resolves to spec_hash {spec_hash(again)}, not the best trial's "
              f"{spec_hash(spec)}", file=sys.stderr)
    return path


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def resolve(spec: ExperimentSpec, profile: str, epochs: int | None,
            data: str | None, keep: frozenset[str] = frozenset()) -> ExperimentSpec:
    """As ``python -m experiments run`` resolves it: data folder, then profile and epochs
    (``keep``: the keys a spec file sets, which the profile leaves alone)."""
    if data is not None:
        spec = replace(spec, data=replace(spec.data, source=data))
    return apply_profile(spec, profile, epochs=epochs, keep=keep)


def closest_registered(spec: ExperimentSpec) -> str:
    """The registered spec that differs from ``spec`` in the fewest fields (the `base` of a
    best_spec.toml for an ablation arm that is not registered itself)."""
    if spec.name in SPECS:
        return spec.name
    mine = flatten(spec)

    def distance(name: str) -> int:
        theirs = flatten(SPECS[name])
        return sum(theirs.get(k) != v for k, v in mine.items())

    return min(SPECS, key=distance)


def _load_data(specs: list[ExperimentSpec], profile: str, workers: int) -> dict[Any, Any]:
    """Each spec's data by its ``data`` field, read here first as the study commands do: bad
    data fails before the storage, a study or a parent run exists (and the decoded cache is
    made once). With ``workers`` > 1 the values are None: each worker loads its own, and
    only a dataset folder is read here, to check it (the synthetic data cannot be bad)."""
    from experiments.data import load_data

    loaded: dict[Any, Any] = {}
    for spec in specs:
        if spec.data in loaded:
            continue
        if workers > 1:
            if spec.data.source != "synthetic":
                load_data(spec.data, profile)
            loaded[spec.data] = None
        else:
            loaded[spec.data] = load_data(spec.data, profile)
    return loaded


# ---------------------------------------------------------------------------------------------
# Per arm
# ---------------------------------------------------------------------------------------------
def tune_per_arm(args: argparse.Namespace, ablation: Ablation, *, profile: str, device: str,
                 storage: str, data: dict[Any, Any]) -> int:
    """The playbook's protocol: same space, budget and sampler seed for every arm; then each
    arm's best settings over ``--rerun-seeds``, compared like an ablation study (``data``:
    ``_load_data`` of the arms)."""
    from studies.common import run_study
    from studies.report import report_study

    epochs = resolve(ablation.arms[0].spec, profile, args.epochs, args.data).train.epochs
    name = args.study_name or f"{ablation.name}-{profile}-{epochs}ep"
    results: list[StudyResult] = []
    for arm in ablation.arms:
        base = resolve(arm.spec, profile, args.epochs, args.data)
        space = tuning.search_space(base)
        job = tuning.StudyJob(study_name=f"{name}-{arm.name}", base=base, space=space,
                              storage=storage, sampler=args.sampler, pruner=args.pruner,
                              seed=args.seed, n_trials=args.n_trials, profile=profile,
                              device=device, experiment=f"tune-{name}", arm=arm.name,
                              group=arm.group, timeout=args.timeout)
        if args.worker:
            serve_study(job, data=data[base.data])
            continue
        results.append(tune_study(job, workers=args.workers, data=data[base.data],
                                  root=closest_registered(arm.spec)))
    if args.worker:
        return 0
    setup = (f"{args.n_trials} trials per arm, sampler {args.sampler} (seed {args.seed}), "
             f"pruner {args.pruner}, profile {profile}; scientific hyperparameter: "
             f"{ablation.scientific}.")
    lines = [f"# {name}: best settings per arm", "", setup, "",
             "| arm | best final val/psnr (dB) | trial | settings | on the edge |",
             "|---|---|---|---|---|"]
    for r in results:
        value = f"{r.best.value:.2f}" if r.best else "no complete trial"
        params = tuning.format_params(r.best.params) if r.best else ""
        trial = str(r.best.number) if r.best else ""
        lines.append(f"| `{r.job.arm}` | {value} | {trial} | {params} | "
                     f"{'; '.join(r.edges) or 'no'} |")
    table = REPORTS / name / "best_per_arm.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[4:]) + f"\n(saved to {table})")
    missing = [r.job.arm for r in results if r.best_spec is None]
    if missing:
        print(f"no rerun: arm(s) {', '.join(missing)} have no complete trial", file=sys.stderr)
        return 1
    seeds, warning = rerun_seeds(args.rerun_seeds, {r.job.base.seed for r in results})
    if warning:
        print(f"[{name}] warning: {warning}", file=sys.stderr, flush=True)
    tuned = Ablation(ablation.name, tuple(Arm(r.job.arm, r.best_spec, r.job.group,
                                              keep=tuple(r.job.space.keys))
                                          for r in results),
                     ablation.reference, ablation.scientific)
    ran = run_study(f"{name}-rerun", tuned, seeds=seeds, profile=profile, device=device,
                    epochs=epochs, doc=f"Best settings per arm from the Optuna studies "
                    f"{name}-<arm>, rerun over seeds {seeds}.")
    rerun = report_study(f"{name}-rerun", parent_run_id=ran.parent_run_id)
    print()
    print(rerun.markdown)
    print(f"rerun report: {rerun.out_dir}/ (MLflow experiment {name}-rerun, parent run "
          f"{ran.parent_run_id})")
    failed = bool(ran.failures) or any(r.worker_failures for r in results)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    if args.n_trials < 1:
        raise SpecError(f"--n-trials={args.n_trials} must be >= 1")
    if args.workers < 1:
        raise SpecError(f"--workers={args.workers} must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise SpecError(f"--epochs={args.epochs} must be >= 1")
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


@guarded
def main(argv: list[str] | None = None) -> int:
    import optuna

    args = build_parser().parse_args(argv)
    _check_args(args)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours
    ablation = get_ablation(args.per_arm) if args.per_arm else None
    spec, table = tuning.load_spec(args.spec or "report_final") if not ablation else (None, {})
    profile, device = resolve_profile_and_device(args)
    if ablation is not None:
        bases = [resolve(arm.spec, profile, args.epochs, args.data) for arm in ablation.arms]
    else:
        bases = [resolve(spec, profile, args.epochs, args.data,
                         explicit_keys(args.spec or "report_final"))]
    data = _load_data(bases, profile, args.workers)
    storage = tuning.storage_url(args.storage)
    tuning.open_storage(storage, heartbeat=False)  # a bad URL fails here, before any work
    tracking.configure()
    if args.workers > 1 and storage.startswith("sqlite"):
        print("note: several workers on SQLite work but Optuna recommends a journal file "
              "(--storage mlruns/optuna.journal) or PostgreSQL", file=sys.stderr)
    started = time.monotonic()
    if ablation is not None:
        code = tune_per_arm(args, ablation, profile=profile, device=device, storage=storage,
                            data=data)
    else:
        (base,) = bases
        space = tuning.search_space(base, table)
        name = args.study_name or f"{base.name}-{profile}-{base.train.epochs}ep"
        job = tuning.StudyJob(study_name=name, base=base, space=space, storage=storage,
                              sampler=args.sampler, pruner=args.pruner, seed=args.seed,
                              n_trials=args.n_trials, profile=profile, device=device,
                              experiment=f"tune-{name}", timeout=args.timeout)
        root = tuning.registered_root(args.spec or "report_final")
        if args.worker:
            serve_study(job, data=data[base.data])
            return 0
        result = tune_study(job, workers=args.workers, data=data[base.data], root=root)
        code = 1 if result.worker_failures or result.best is None else 0
        if result.best is not None and args.rerun_seeds:
            code = max(code, rerun_best(result, args.rerun_seeds))
    print(f"wall time: {time.monotonic() - started:.0f} s; dashboard: optuna-dashboard "
          f"{tracking.mask_secrets(storage)} --host 127.0.0.1 --port 8080", flush=True)
    return code


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


def rerun_best(result: StudyResult, seeds: list[int]) -> int:
    """The best settings of one study over ``seeds`` (experiment ``<study>-rerun``)."""
    from studies import summary
    from studies.common import run_study
    from studies.report import report_study

    job = result.job
    seeds, warning = rerun_seeds(seeds, {job.base.seed})
    if warning:
        print(f"[{job.study_name}] warning: {warning}", file=sys.stderr, flush=True)
    arm = Arm(job.base.name, result.best_spec, job.base.name, keep=tuple(job.space.keys))
    ablation = Ablation(job.study_name, (arm,), arm.name, "none (best settings over seeds)")
    ran = run_study(f"{job.study_name}-rerun", ablation, seeds=seeds, profile=job.profile,
                    device=job.device, epochs=job.base.train.epochs)
    rerun = report_study(f"{job.study_name}-rerun", parent_run_id=ran.parent_run_id)
    row = rerun.summary.iloc[0] if rerun.summary is not None and len(rerun.summary) else None
    if row is not None:
        sd = "" if math.isnan(row["final_sd"]) else f" ± {row['final_sd']:.2f}"
        print(f"[{job.study_name}] best settings over seeds {seeds}: final {tuning.OBJECTIVE} "
              f"{row['final_mean']:.2f}{sd} dB (mean ± sd; {summary.CONFIDENCE:.0%} CI "
              f"[{row['final_ci_low']:.2f}, {row['final_ci_high']:.2f}]); report "
              f"{rerun.out_dir}/", flush=True)
    return 1 if ran.failures else 0


if __name__ == "__main__":
    sys.exit(main())
