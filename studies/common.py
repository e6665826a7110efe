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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from experiments import tracking
from experiments.cli import add_common, fail, guarded, resolve_profile_and_device
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
    return replace(apply_profile(spec, profile, epochs=epochs), seed=seed)


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
    them (studies.results.finished_children).
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
              doc: str = "") -> StudyRun:
    """Run ``arms`` × ``seeds`` of ``ablation`` under one parent run of experiment ``study``.

    Prints one line when a run starts and one when it ends; the runner draws a per-run
    progress bar on a terminal (``progress`` forces it on or off).
    """
    from mlflow.tracking import MlflowClient

    from cvae.train import NonFiniteLossError
    from experiments.data import load_data

    chosen = select_arms(ablation, arms)
    seeds = list(dict.fromkeys(seeds))  # a seed given twice runs once
    tracking.configure()
    client = MlflowClient()
    experiment_id = tracking.get_or_create_experiment(study)
    resolved_epochs = resolve_arm(chosen[0], profile=profile, seed=0, epochs=epochs,
                                  data=data).train.epochs
    key = config_key(study, ablation, profile=profile, epochs=epochs, data=data)
    parent_id = parent_run(client, experiment_id, study, ablation, profile=profile,
                           device=device, epochs=resolved_epochs, data=data, key=key, doc=doc)
    outcome = StudyRun(study, experiment_id, parent_id)
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
                print(f"{label}: FAILED ({err})", flush=True)
                outcome.failures.append(f"{arm.name} seed {seed}: {err}")
                continue
            _adopt(client, result.run_id, parent_id)
            outcome.outcomes.append(result)
            psnr = result.metrics.get("val/psnr", float("nan"))
            what = "reused" if result.skipped else result.status
            print(f"{label}: {what} run {result.run_id} · final val/psnr {psnr:.2f} dB · "
                  f"{time.monotonic() - started:.1f} s", flush=True)
        status = "FAILED" if outcome.failures else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_tag(parent_id, "seeds", _merge_seeds(client, parent_id, seeds))
        client.set_terminated(parent_id, status)
    return outcome


def _merge_seeds(client: Any, run_id: str, seeds: Sequence[int]) -> str:
    old = client.get_run(run_id).data.tags.get("seeds", "")
    merged = {int(s) for s in old.split()} | {int(s) for s in seeds}
    return " ".join(str(s) for s in sorted(merged))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser(study: Study, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=study.doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [a.name for a in get_ablation(study.ablation).arms]
    parser.add_argument("--seeds", type=int, nargs="+", default=list(study.default_seeds),
                        help=f"seeds per arm (default: {' '.join(map(str, study.default_seeds))})")
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help=f"a subset of the arms (default: all: {' '.join(names)})")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the profile's epochs (schedules keep their shape)")
    for variant in study.variants:
        parser.add_argument(variant.flag, action="store_true", help=variant.help)
    add_common(parser)
    return parser


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
        profile, device = resolve_profile_and_device(args)
        ran = run_study(name, ablation, seeds=args.seeds, profile=profile, device=device,
                        arms=args.arms, epochs=args.epochs, data=args.data, doc=study.doc)
        try:
            report = report_study(name, parent_run_id=ran.parent_run_id)
        except LookupError as err:
            return fail(str(err))
        print()
        print(report.markdown)
        print(f"report: {len(report.files)} files in {report.out_dir}/ (also logged to parent "
              f"run {ran.parent_run_id} under report/); redraw with: "
              f"python -m studies.report --study {name}", flush=True)
        if ran.failures:
            print(f"{len(ran.failures)} run(s) failed:\n  " + "\n  ".join(ran.failures),
                  file=sys.stderr)
            return 1
        return 0

    return _main(argv)
