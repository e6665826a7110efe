"""What every ablation study shares: its command line and its orchestration.

A study runs each arm of a registered ablation (experiments.registry.ABLATIONS) over several
seeds through the runner, files them in one MLflow experiment named after the study, under one
parent run, then draws its figures and tables from the tracked data (studies.report).

- Parent run: one per study configuration (the study, profile and the resolved specs of all
  its arms, i.e. epochs, widths and data included), tagged ``study_parent=1`` and
  ``study_config=<hash>``; rerunning the same command reuses it, so a configuration's runs
  stay together however many times it is resumed or extended (``--seeds 0 1 2`` after
  ``--seeds 0 1`` adds seed 2 beside the others). Another profile or ``--epochs`` gets its own
  parent, and reports never mix configurations. The parent lists its arms' resolved spec
  hashes (tag ``spec_hashes``); its report takes the FINISHED runs with those hashes, so a run
  reused from an older configuration (an arm whose spec did not change) is counted too.
- Child runs: one per (arm, seed), started by ``experiments.runner.run_experiment`` with the
  experiment id and the parent id. The runner skips a (spec, seed) already FINISHED in the
  experiment and resumes a RUNNING/KILLED one from its last checkpoint: rerunning an
  interrupted study finishes it without repeating work. A reused run that points at no parent
  (started by ``python -m experiments run --study NAME``) is adopted.
- Order: seed-major (every arm at seed 0, then seed 1, ...), so a study stopped half way can
  already be compared arm against arm.
- A run whose loss turns non-finite is FAILED by the runner; the study carries on with the
  others, reports what finished and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cvae.train import NonFiniteLossError
from experiments import tracking
from experiments.cli import add_common, fail, guarded, resolve_profile_and_device, seed_arg
from experiments.registry import Ablation, Arm, apply_profile, get_ablation
from experiments.runner import RunContext, RunOutcome, run_experiment
from experiments.spec import ExperimentSpec, SpecError, spec_hash
from studies import results


@dataclass(frozen=True)
class Variant:
    """A flag that switches a study to another ablation (filed as another study)."""

    flag: str  # e.g. "--report-groups"
    ablation: str
    study: str
    help: str


@dataclass(frozen=True)
class Study:
    """What a study module declares: its name (the MLflow experiment), its ablation, its
    docstring (the --help text) and its defaults."""

    name: str
    ablation: str
    doc: str
    default_seeds: tuple[int, ...] = (0, 1)
    variants: tuple[Variant, ...] = ()


@dataclass
class StudyRun:
    study: str
    experiment_id: str
    parent_run_id: str
    outcomes: list[RunOutcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Arms and specs
# ---------------------------------------------------------------------------------------------
def select_arms(ablation: Ablation, names: Sequence[str] | None) -> list[Arm]:
    """The ablation's arms, or the named subset in the ablation's order; unknown names raise
    a SpecError listing the valid ones."""
    if not names:
        return list(ablation.arms)
    valid = [a.name for a in ablation.arms]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SpecError(f"unknown arm(s) {', '.join(unknown)} for ablation {ablation.name!r}; "
                        f"valid: {', '.join(valid)}")
    return [a for a in ablation.arms if a.name in names]


def resolve_arm(arm: Arm, *, profile: str, seed: int, epochs: int | None = None,
                data: str | None = None) -> ExperimentSpec:
    """The arm's spec as it runs: data folder, then profile (and --epochs), then the seed;
    the same order as ``python -m experiments run``, so the spec hashes agree."""
    spec = arm.spec
    if data is not None:
        spec = replace(spec, data=replace(spec.data, source=data))
    return replace(apply_profile(spec, profile, epochs=epochs, keep=arm.keep), seed=seed)


def config_key(study: str, ablation: Ablation, *, profile: str, epochs: int | None,
               data: str | None) -> str:
    """Identity of a study configuration: the resolved spec hashes of all its arms."""
    hashes = sorted(spec_hash(resolve_arm(a, profile=profile, seed=0, epochs=epochs, data=data))
                    for a in ablation.arms)
    blob = json.dumps({"study": study, "profile": profile, "arms": hashes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# The parent run
# ---------------------------------------------------------------------------------------------
def _note(doc: str) -> str:
    return doc.strip().split("\n\n")[0]


def parent_run(client: Any, experiment_id: str, study: str, ablation: Ablation, *,
               profile: str, device: str, epochs: int, data: str | None, key: str,
               doc: str = "") -> str:
    """Reuse this configuration's parent run (set RUNNING again) or create it.

    ``epochs`` is the resolved number of epochs. The parent records its arms' resolved spec
    hashes (tag ``spec_hashes``): the runs of this configuration, whichever parent created
    them (studies.results.study_children).
    """
    hashes = ",".join(spec_hash(resolve_arm(a, profile=profile, seed=0, epochs=epochs, data=data))
                      for a in ablation.arms)
    query = f"tags.{results.PARENT_TAG} = '1' and tags.{results.TAG_CONFIG} = '{key}'"
    found = results.search_all(client, [experiment_id], query)
    if found:
        run_id = max(found, key=lambda r: r.info.start_time or 0).info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "git_commit", tracking.git_commit())
        client.set_tag(run_id, "device", device)
        client.set_tag(run_id, results.TAG_SPEC_HASHES, hashes)
        return run_id
    tags = {
        "study": study, results.PARENT_TAG: "1", results.TAG_CONFIG: key,
        results.TAG_SPEC_HASHES: hashes,
        results.TAG_ABLATION: ablation.name,
        results.TAG_SCIENTIFIC: ablation.scientific, results.TAG_REFERENCE: ablation.reference,
        results.TAG_ARMS: ",".join(a.name for a in ablation.arms),
        results.TAG_GROUPS: ",".join(dict.fromkeys(a.group for a in ablation.arms)),
        "profile": profile, "device": device, "git_commit": tracking.git_commit(),
        "mlflow.note.content": tracking.mask_secrets(_note(doc)),
    }
    run = client.create_run(experiment_id, run_name=f"{study}-{profile}-{epochs}ep", tags=tags)
    for key_, value in {"ablation": ablation.name, "profile": profile, "epochs": epochs,
                        "data": tracking.mask_secrets(data or "synthetic"),
                        "reference_arm": ablation.reference}.items():
        client.log_param(run.info.run_id, key_, value)
    return run.info.run_id


def _adopt(client: Any, run_id: str, parent_run_id: str) -> None:
    """Point a reused run at this parent if it points nowhere (started outside a study)."""
    run = client.get_run(run_id)
    if results.PARENT_ID_TAG not in run.data.tags:
        client.set_tag(run_id, results.PARENT_ID_TAG, parent_run_id)


def _finished(experiment_id: str, spec: ExperimentSpec) -> bool:
    runs = tracking.find_runs(experiment_id, spec_hash=spec_hash(spec), seed=spec.seed)
    return any(r.info.status == "FINISHED" for r in runs)


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
def run_study(study: str, ablation: Ablation, *, seeds: Sequence[int], profile: str,
              device: str, arms: Sequence[str] | None = None, epochs: int | None = None,
              data: str | None = None, progress: bool | None = None,
              doc: str = "", pack: int = 1) -> StudyRun:
    """Run ``arms`` × ``seeds`` of ``ablation`` under one parent run of experiment ``study``.

    Prints one line when a run starts and one when it ends; the runner draws a per-run
    progress bar on a terminal (``progress`` forces it on or off). ``pack`` > 1 trains up to
    that many runs together as one batched computation (``experiments.runner.run_pack``).
    """
    if pack > 1:
        return _run_packed(study, ablation, seeds=seeds, profile=profile, device=device,
                           arms=arms, epochs=epochs, data=data, progress=progress, doc=doc,
                           pack=pack)
    from experiments.data import load_data

    chosen = select_arms(ablation, arms)
    seeds = list(dict.fromkeys(seeds))  # a seed given twice runs once
    client, outcome, resolved_epochs = _open(study, ablation, profile=profile, device=device,
                                             epochs=epochs, data=data, doc=doc, arms=arms)
    experiment_id, parent_id = outcome.experiment_id, outcome.parent_run_id
    jobs = [(arm, seed) for seed in seeds for arm in chosen]
    print(f"{study}: {len(chosen)} arm(s) × {len(seeds)} seed(s) = {len(jobs)} runs, "
          f"profile {profile}, {resolved_epochs} epochs, device {device}; experiment "
          f"{experiment_id}, parent run {parent_id}", flush=True)
    cache: dict[Any, Any] = {}
    status = "FAILED"
    try:
        for index, (arm, seed) in enumerate(jobs, 1):
            spec = resolve_arm(arm, profile=profile, seed=seed, epochs=epochs, data=data)
            label = f"[{study} {index}/{len(jobs)}] {arm.name} seed {seed}"
            data_now = None
            if not _finished(experiment_id, spec):
                print(f"{label}: start", flush=True)
                if spec.data not in cache:
                    cache[spec.data] = load_data(spec.data, profile)
                data_now = cache[spec.data]
            started = time.monotonic()
            context = RunContext(study=study, arm=arm.name, group=arm.group, profile=profile,
                                 experiment_id=experiment_id, parent_run_id=parent_id)
            try:
                result = run_experiment(spec, context=context, device=device, data=data_now,
                                        progress=progress)
            except NonFiniteLossError as err:
                result = err
            _record(client, outcome, label, arm, seed, result,
                    f"{time.monotonic() - started:.1f} s")
        status = "FAILED" if outcome.failures else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_tag(parent_id, "seeds", _merge_seeds(client, parent_id, seeds))
        client.set_terminated(parent_id, status)
    return outcome


def _open(study: str, ablation: Ablation, *, profile: str, device: str, epochs: int | None,
          data: str | None, doc: str, arms: Sequence[str] | None) -> tuple[Any, StudyRun, int]:
    """The experiment and this configuration's parent run: (client, StudyRun, epochs)."""
    from mlflow.tracking import MlflowClient

    chosen = select_arms(ablation, arms)
    tracking.configure()
    client = MlflowClient()
    experiment_id = tracking.get_or_create_experiment(study)
    resolved_epochs = resolve_arm(chosen[0], profile=profile, seed=0, epochs=epochs,
                                  data=data).train.epochs
    key = config_key(study, ablation, profile=profile, epochs=epochs, data=data)
    parent_id = parent_run(client, experiment_id, study, ablation, profile=profile,
                           device=device, epochs=resolved_epochs, data=data, key=key, doc=doc)
    return client, StudyRun(study, experiment_id, parent_id), resolved_epochs


def _run_packed(study: str, ablation: Ablation, *, seeds: Sequence[int], profile: str,
                device: str, arms: Sequence[str] | None, epochs: int | None,
                data: str | None, progress: bool | None, doc: str, pack: int) -> StudyRun:
    """``run_study`` with the runs trained in packs of up to ``pack`` members, seed-major."""
    from experiments.data import load_data
    from experiments.runner import run_pack

    chosen = select_arms(ablation, arms)
    seeds = list(dict.fromkeys(seeds))
    client, outcome, resolved_epochs = _open(study, ablation, profile=profile, device=device,
                                             epochs=epochs, data=data, doc=doc, arms=arms)
    jobs = [(arm, seed) for seed in seeds for arm in chosen]
    print(f"{study}: {len(chosen)} arm(s) × {len(seeds)} seed(s) = {len(jobs)} runs, "
          f"profile {profile}, {resolved_epochs} epochs, device {device}, packs of up to "
          f"{pack}; experiment {outcome.experiment_id}, parent run {outcome.parent_run_id}",
          flush=True)
    cache: dict[Any, Any] = {}
    status = "FAILED"
    try:
        for start in range(0, len(jobs), pack):
            chunk = jobs[start:start + pack]
            specs = [resolve_arm(a, profile=profile, seed=s, epochs=epochs, data=data)
                     for a, s in chunk]
            contexts = [RunContext(study=study, arm=a.name, group=a.group, profile=profile,
                                   experiment_id=outcome.experiment_id,
                                   parent_run_id=outcome.parent_run_id) for a, _ in chunk]
            by_data: dict[Any, list[int]] = {}
            for k, spec in enumerate(specs):
                by_data.setdefault(spec.data, []).append(k)
            for spec_data, ks in by_data.items():
                if spec_data not in cache:
                    cache[spec_data] = load_data(spec_data, profile)
                started = time.monotonic()
                results = run_pack([specs[k] for k in ks], [contexts[k] for k in ks],
                                   device=device, data=cache[spec_data], progress=progress)
                for k, result in zip(ks, results):
                    arm, seed = chunk[k]
                    _record(client, outcome, f"[{study}] {arm.name} seed {seed}", arm, seed,
                            result, f"pack of {len(ks)} in {time.monotonic() - started:.1f} s")
        status = "FAILED" if outcome.failures else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_tag(outcome.parent_run_id, "seeds",
                       _merge_seeds(client, outcome.parent_run_id, seeds))
        client.set_terminated(outcome.parent_run_id, status)
    return outcome


def _record(client: Any, outcome: StudyRun, label: str, arm: Arm, seed: int,
            result: RunOutcome | NonFiniteLossError, how: str) -> None:
    """One run's result into the study: a failure, or a run filed under the parent."""
    if isinstance(result, NonFiniteLossError):
        print(f"{label}: FAILED ({result})", flush=True)
        outcome.failures.append(f"{arm.name} seed {seed}: {result}")
        return
    _adopt(client, result.run_id, outcome.parent_run_id)
    outcome.outcomes.append(result)
    what = "reused" if result.skipped else result.status
    print(f"{label}: {what} run {result.run_id} · final val/psnr "
          f"{result.metrics.get('val/psnr', float('nan')):.2f} dB · {how}", flush=True)


def _merge_seeds(client: Any, run_id: str, seeds: Sequence[int]) -> str:
    old = client.get_run(run_id).data.tags.get("seeds", "")
    merged = {int(s) for s in old.split()} | {int(s) for s in seeds}
    return " ".join(str(s) for s in sorted(merged))


# ---------------------------------------------------------------------------------------------
# Several runs at once: an Optuna work queue (studies.queue), local or on several machines
# ---------------------------------------------------------------------------------------------
def cpu_count() -> int:
    """The cores this process may use (``taskset``/cgroup affinity), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_jobs(device: str, runs: int) -> int:
    """Runs at once on this machine: on a CPU one single-threaded process per core (measured
    on 2 cores at the cpu profile: 2 one-thread processes train 1.28x the frames per second
    of one two-thread process: the model's small per-frame operators leave a second thread
    waiting); on a GPU one process (``--pack`` trains several members in it)."""
    if device != "cpu" or runs <= 1:
        return 1
    return max(1, min(cpu_count(), runs))


DEFAULT_PACK_CUDA = 15  # the report's 3 KL arms x 5 seeds in one pack
# A packed training step at the lab's size (batch 2, 16-frame clips, fp32) allocates 3.39 GB
# per member (measured on an H100: 50.8 GB for 15 members; on the CPU 3.7 GB); with margin:
MEMBER_BYTES = 4.5e9


def default_pack(device: str) -> int:
    """Packs only on CUDA: up to 15 members, fewer when the GPU's free memory is short."""
    if device != "cuda":
        return 1
    import torch

    free, _ = torch.cuda.mem_get_info()
    return max(1, min(DEFAULT_PACK_CUDA, int(0.9 * free // MEMBER_BYTES)))


def pending_runs(study: str, ablation: Ablation, *, seeds: Sequence[int], profile: str,
                 arms: Sequence[str] | None, epochs: int | None, data: str | None) -> int:
    """How many (arm, seed) pairs have no FINISHED run yet (0 when the experiment is new)."""
    from mlflow.tracking import MlflowClient

    tracking.configure()
    found = MlflowClient().get_experiment_by_name(study)
    chosen = select_arms(ablation, arms)
    if found is None:
        return len(chosen) * len(seeds)
    return sum(not _finished(found.experiment_id,
                             resolve_arm(arm, profile=profile, seed=seed, epochs=epochs, data=data))
               for seed in seeds for arm in chosen)


def start_workers(storage: str, queue_name: str, *, jobs: int, device: str,
                  threads: int) -> list[subprocess.Popen]:
    """``jobs`` ``python -m studies.queue worker`` processes on this machine."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "OMP_NUM_THREADS": str(threads), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    command = [sys.executable, "-m", "studies.queue", "worker", "--storage", storage,
               "--study", queue_name, "--device", device, "--threads", str(threads)]
    return [subprocess.Popen(command, env=env) for _ in range(jobs)]


def wait_for_queue(storage: str, queue_name: str, *, total_epochs: int,
                   workers: Sequence[subprocess.Popen] = (), poll: float = 2.0,
                   progress: bool | None = None) -> dict[str, int]:
    """Poll the queue until no pair waits or runs, with a bar over the pairs' epochs; with
    local ``workers``, also stop once they have all exited (nobody is left to take the
    waiting pairs). Returns the pair counts by state."""
    import optuna
    from tqdm.auto import tqdm

    from studies import queue

    storage_obj = queue.open_storage(storage)
    with queue.storage_errors(storage):
        opened = optuna.load_study(study_name=queue_name, storage=storage_obj)
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total_epochs, desc=queue_name, unit="epoch", disable=not enabled,
               dynamic_ncols=True)
    try:
        while True:
            with queue.storage_errors(storage):
                if not workers:  # no local workers: a dead remote worker is failed here too
                    optuna.storages.fail_stale_trials(opened)
                counts = queue.pair_states(opened)
                done = queue.epochs_done(opened)
            bar.update(max(0, min(done, total_epochs) - bar.n))
            bar.set_postfix(running=counts["running"], waiting=counts["waiting"],
                            complete=counts["complete"], refresh=False)
            if counts["waiting"] == 0 and counts["running"] == 0:
                return counts
            if workers and all(w.poll() is not None for w in workers):
                return counts
            time.sleep(poll)
    finally:
        bar.close()


def run_queued(study: str, ablation: Ablation, *, seeds: Sequence[int], profile: str,
               device: str, arms: Sequence[str] | None, epochs: int | None,
               data: str | None, jobs: int, doc: str, storage: str | None = None,
               queue_name: str | None = None, wait: bool = True,
               progress: bool | None = None) -> StudyRun | None:
    """Run the grid through an Optuna work queue with ``jobs`` worker processes here.

    ``storage`` None: a private journal file, removed at the end (several processes on one
    machine). Otherwise the shared queue (PostgreSQL for several machines): other machines'
    workers (``--storage URL --worker``) take pairs too; ``jobs`` 0 leaves all the work to
    them. Returns None when ``wait`` is off (the pairs are queued, nothing waits for them).
    """
    import optuna

    from studies import queue

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    chosen = select_arms(ablation, arms)
    name = queue_name or study
    own = storage is None
    tmp = tempfile.TemporaryDirectory(prefix="cvae-queue-") if own else None
    url = f"{tmp.name}/queue.log" if tmp else storage
    workers: list[subprocess.Popen] = []
    try:
        # Workers here: the synthetic data is made once, by coordinate, before they start.
        done = queue.coordinate(url, name, ablation=ablation.name, seeds=seeds, profile=profile,
                                epochs=epochs, data=data, arms=[a.name for a in chosen],
                                doc=doc, experiment=study, read_synthetic=jobs > 0)
        if not wait:
            return None
        epochs_each = resolve_arm(chosen[0], profile=profile, seed=0, epochs=epochs,
                                  data=data).train.epochs
        threads = max(1, cpu_count() // max(jobs, 1)) if device == "cpu" else 1
        if jobs > 0:
            print(f"{study}: {jobs} worker process(es) here, {threads} thread(s) each",
                  flush=True)
            workers = start_workers(url, name, jobs=jobs, device=device, threads=threads)
        elif not own:
            print(f"{study}: waiting for workers: on each machine, this command with --worker "
                  f"(the same --storage {tracking.mask_secrets(url)})", flush=True)
        # Our own queue: once all its workers have exited nobody else will take a pair. A
        # shared one: workers elsewhere may, so only the queue's counts say when it is done.
        counts = wait_for_queue(url, name, total_epochs=epochs_each * len(chosen) * len(seeds),
                                workers=workers if own else (), progress=progress)
        for proc in workers:
            proc.wait()
        ran = StudyRun(study, done.experiment_id, done.parent_run_id)
        if counts["failed"]:
            ran.failures.append(f"{counts['failed']} pair(s) failed (see the worker lines above)")
        stuck = counts["waiting"] + counts["running"]
        if stuck:
            ran.failures.append(f"{stuck} pair(s) not done: every worker here exited "
                                f"(codes {[w.returncode for w in workers]})")
        return ran
    except BaseException:
        for proc in workers:  # Ctrl-C reached them too; SIGTERM covers any other exit
            if proc.poll() is None:
                proc.terminate()
        for proc in workers:
            proc.wait()
        if own:
            _close_parent_run(done.parent_run_id if "done" in locals() else None, "KILLED")
        raise
    finally:
        if tmp is not None:
            tmp.cleanup()


def _close_parent_run(run_id: str | None, status: str) -> None:
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser(study: Study, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=study.doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [a.name for a in get_ablation(study.ablation).arms]
    parser.add_argument("--seeds", type=seed_arg, nargs="+", default=list(study.default_seeds),
                        help=f"seeds per arm (default: {' '.join(map(str, study.default_seeds))})")
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help=f"a subset of the arms (default: all: {' '.join(names)})")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the profile's epochs (schedules keep their shape)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="runs at once on this machine, each its own process (default: "
                             "on a CPU one per core, single-threaded, up to the number of "
                             "runs; on a GPU 1). With --storage: local workers besides the "
                             "coordinator (default 0: workers are started elsewhere)")
    parser.add_argument("--pack", type=int, default=None, metavar="K",
                        help="train up to K runs together as one batched computation (one "
                             "MLflow run each, as if alone); 1 turns packing off (default: "
                             f"on CUDA {DEFAULT_PACK_CUDA}, or fewer if the GPU's free memory "
                             "holds fewer at ~4.5 GB each; 1 on a CPU, where packed grouped "
                             "convolutions measured 0.64x the speed of separate runs)")
    for variant in study.variants:
        parser.add_argument(variant.flag, action="store_true", help=variant.help)
    add_common(parser)
    queue = parser.add_argument_group(
        "several machines (an Optuna study as the work queue; see README)")
    queue.add_argument("--storage", default=None, metavar="URL",
                       help="the shared queue: postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB "
                            "(or sqlite:///PATH, PATH.log on one machine). Without --worker: "
                            "create the MLflow experiment and parent run, queue the "
                            "(arm, seed) pairs, wait for them and write the report")
    queue.add_argument("--worker", action="store_true",
                       help="take pairs from --storage's queue until none is left (the study's "
                            "settings come from the queue; set MLFLOW_TRACKING_URI to the "
                            "shared server)")
    queue.add_argument("--queue-name", default=None, metavar="NAME",
                       help="the Optuna study holding the queue (default: the study's name)")
    queue.add_argument("--no-wait", dest="wait", action="store_false",
                       help="with --storage: return once the pairs are queued")
    return parser


def _worker(args: argparse.Namespace, name: str) -> int:
    """``--storage URL --worker``: serve the queue named after the study (or --queue-name)."""
    from studies import queue

    summary = queue.run_worker(args.storage, args.queue_name or name, device=args.device)
    return 1 if summary.failed else 0


def _study_and_ablation(study: Study, args: argparse.Namespace) -> tuple[str, str]:
    for variant in study.variants:
        if getattr(args, variant.flag.lstrip("-").replace("-", "_")):
            return variant.study, variant.ablation
    return study.name, study.ablation


def run_cli(study: Study, argv: list[str] | None = None) -> int:
    """``python -m studies.<name>``: run the study, write its report, print its summary."""
    from studies.report import report_study

    @guarded
    def _main(argv: list[str] | None) -> int:
        args = build_parser(study, f"python -m studies.{study.name}").parse_args(argv)
        name, ablation_name = _study_and_ablation(study, args)
        ablation = get_ablation(ablation_name)
        select_arms(ablation, args.arms)  # bad names fail before anything starts
        if args.epochs is not None and args.epochs < 1:
            return fail(f"--epochs={args.epochs} must be >= 1")
        if args.pack is not None and args.pack < 1:
            return fail(f"--pack={args.pack} must be >= 1 (1: no packing)")
        if args.jobs is not None and args.jobs < (0 if args.storage else 1):
            return fail(f"--jobs={args.jobs} must be >= {0 if args.storage else 1}")
        if args.worker and not args.storage:
            return fail("--worker takes its pairs from a queue: give --storage URL")
        if args.worker:
            return _worker(args, name)
        profile, device = resolve_profile_and_device(args)
        started = time.monotonic()
        if args.storage:
            ran = run_queued(name, ablation, seeds=args.seeds, profile=profile, device=device,
                             arms=args.arms, epochs=args.epochs, data=args.data,
                             jobs=args.jobs or 0, doc=study.doc, storage=args.storage,
                             queue_name=args.queue_name, wait=args.wait)
            if ran is None:
                return 0
        else:
            pending = pending_runs(name, ablation, seeds=args.seeds, profile=profile,
                                   arms=args.arms, epochs=args.epochs, data=args.data)
            pack = args.pack if args.pack is not None else default_pack(device)
            jobs = args.jobs if args.jobs is not None else (
                1 if pack > 1 else default_jobs(device, pending))
            if jobs > 1 and pack > 1:
                return fail(f"--jobs {jobs} and --pack {pack}: choose one (packs train in "
                            "this process)")
            if jobs > 1 and pending > 1:
                ran = run_queued(name, ablation, seeds=args.seeds, profile=profile,
                                 device=device, arms=args.arms, epochs=args.epochs,
                                 data=args.data, jobs=min(jobs, pending), doc=study.doc)
            else:
                ran = run_study(name, ablation, seeds=args.seeds, profile=profile,
                                device=device, arms=args.arms, epochs=args.epochs,
                                data=args.data, doc=study.doc, pack=pack)
        try:
            report = report_study(name, parent_run_id=ran.parent_run_id)
        except LookupError as err:
            return fail(str(err))
        print()
        print(report.markdown)
        print(f"report: {len(report.files)} files in {report.out_dir}/ (also logged to parent "
              f"run {ran.parent_run_id} under report/); redraw with: "
              f"python -m studies.report --study {name}", flush=True)
        print(f"wall time: {time.monotonic() - started:.0f} s", flush=True)
        if ran.failures:
            print(f"{len(ran.failures)} run(s) failed:\n  " + "\n  ".join(ran.failures),
                  file=sys.stderr)
            return 1
        return 0

    return _main(argv)
