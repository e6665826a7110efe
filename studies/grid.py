"""A study's grid: an ablation's arms x seeds under one profile, resolved once, and the loop
that runs it in this process.

A ``Grid`` is what every step of a study takes: the command line builds it, ``run_here``
trains its pending runs (one at a time, or several as one batched pack), the work queue
(``studies.queue``) stores it and its workers read it back, the report reads its parent run.

- Parent run: one per configuration (the study, profile and the resolved specs of all its
  arms: epochs, widths and data included), tagged ``study_parent=1`` and
  ``study_config=<key>``. Rerunning the same command reuses it, so a configuration's runs stay
  together however often it is resumed or extended (``--seeds 0 1 2`` after ``--seeds 0 1``
  adds seed 2 beside the others); another profile or ``--epochs`` gets its own parent, and
  reports never mix configurations. The parent lists its arms' resolved spec hashes (tag
  ``spec_hashes``); its report takes the FINISHED runs with those hashes, so a run reused from
  an older configuration (an arm whose spec did not change) counts too.
- Child runs: one per (arm, seed), started by the runner with the experiment and parent ids.
  The runner skips a (spec, seed) already FINISHED in the experiment and resumes a
  RUNNING/KILLED one from its last checkpoint. A reused run that points at no parent (started
  by ``python -m experiments run --study NAME``) is adopted.
- Order: seed-major (every arm at seed 0, then seed 1, ...), so a study stopped half way can
  already be compared arm against arm.
- A run whose loss turns non-finite is FAILED by the runner; the study goes on with the others,
  reports what finished and exits 1.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from cvae.train import NonFiniteLossError
from experiments import tracking
from experiments.registry import Ablation, Arm, resolve
from experiments.runner import RunContext, RunOutcome, duration, run_pack
from experiments.spec import ExperimentSpec, SpecError, spec_hash
from experiments.tracking import RunBusyError
from studies import results


class GridRun(NamedTuple):
    arm: Arm
    seed: int
    spec: ExperimentSpec  # resolved: data, profile, epochs and seed applied


@dataclass(frozen=True)
class Grid:
    """``arms`` (default: all of the ablation's, in its order) x ``seeds`` of ``ablation``,
    filed in the MLflow experiment ``study``. ``doc`` is the study's description."""

    study: str
    ablation: Ablation
    seeds: tuple[int, ...]
    profile: str
    arms: tuple[str, ...] = ()
    epochs: int | None = None
    data: str | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise SpecError("--seeds needs at least one seed")
        if any(s < 0 for s in self.seeds):
            raise SpecError(f"--seeds {' '.join(map(str, self.seeds))}: seeds must be >= 0")
        if self.epochs is not None and self.epochs < 1:
            raise SpecError(f"--epochs={self.epochs} must be >= 1")
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(int(s) for s in self.seeds)))
        self.chosen  # unknown arm names fail here, before anything starts  # noqa: B018

    @cached_property
    def chosen(self) -> tuple[Arm, ...]:
        """The arms that run, in the ablation's order."""
        valid = [a.name for a in self.ablation.arms]
        unknown = [n for n in self.arms if n not in valid]
        if unknown:
            raise SpecError(f"unknown arm(s) {', '.join(unknown)} for ablation "
                            f"{self.ablation.name!r}; valid: {', '.join(valid)}")
        return tuple(a for a in self.ablation.arms if not self.arms or a.name in self.arms)

    def arm(self, name: str) -> Arm:
        found = [a for a in self.ablation.arms if a.name == name]
        if not found:
            raise SpecError(f"ablation {self.ablation.name!r} has no arm {name!r}; arms: "
                            f"{', '.join(a.name for a in self.ablation.arms)}")
        return found[0]

    def spec(self, arm: Arm, seed: int) -> ExperimentSpec:
        return resolve(arm.spec, profile=self.profile, epochs=self.epochs, data=self.data,
                       seed=seed, keep=arm.keep)

    @cached_property
    def runs(self) -> tuple[GridRun, ...]:
        """Every (arm, seed) of the grid, seed-major, with its resolved spec."""
        return tuple(GridRun(arm, seed, self.spec(arm, seed))
                     for seed in self.seeds for arm in self.chosen)

    @cached_property
    def epochs_each(self) -> int:
        """The resolved number of epochs of a run."""
        return self.runs[0].spec.train.epochs

    @cached_property
    def spec_hashes(self) -> tuple[str, ...]:
        """The configuration's arms (all of the ablation's) as resolved spec hashes."""
        return tuple(spec_hash(self.spec(a, 0)) for a in self.ablation.arms)

    @cached_property
    def key(self) -> str:
        """The configuration's identity: study, profile and its arms' spec hashes."""
        blob = json.dumps({"study": self.study, "profile": self.profile,
                           "arms": sorted(self.spec_hashes)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def context(self, arm: Arm, *, experiment_id: str | None, parent_run_id: str | None,
                **extra_tags: str) -> RunContext:
        return RunContext(study=self.study, arm=arm.name, group=arm.group, profile=self.profile,
                          experiment_id=experiment_id, parent_run_id=parent_run_id,
                          extra_tags=extra_tags)


@dataclass
class StudyRun:
    """A study's MLflow experiment and parent run, and what happened to its runs."""

    study: str
    experiment_id: str
    parent_run_id: str
    outcomes: list[RunOutcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The parent run
# ---------------------------------------------------------------------------------------------
RUNNERS = ("local", "queue")  # the parent's ``runner`` tag: this process, or a work queue


def open_study(grid: Grid, *, device: str | None, runner: str = "local") -> tuple[Any, StudyRun]:
    """The study's experiment (model training, described) and this configuration's parent run
    (RUNNING): created, or reused as it was (``device``, ``runner``, ``git_commit`` and
    ``spec_hashes`` updated). ``device``: where this command trains (None: the queue's
    workers, each on its own device, which their runs record)."""
    from mlflow.tracking import MlflowClient

    tracking.configure()
    client = MlflowClient()
    experiment_id = tracking.get_or_create_experiment(grid.study,
                                                      description=study_description(grid))
    hashes = ",".join(grid.spec_hashes)
    query = (f"tags.{results.PARENT_TAG} = '1' and "
             f"tags.{results.TAG_CONFIG} = {tracking.quote_filter_value(grid.key)}")
    found = results.search_all(client, [experiment_id], query)
    now = {"git_commit": tracking.git_commit(), "runner": runner,
           results.TAG_SPEC_HASHES: hashes}
    if found:
        run = max(found, key=lambda r: r.info.start_time or 0)
        client.update_run(run.info.run_id, status="RUNNING")
        for key, value in now.items():
            client.set_tag(run.info.run_id, key, value)
        if device is not None:
            client.set_tag(run.info.run_id, "device", device)
        elif "device" in run.data.tags:  # it said where an earlier command trained
            client.delete_tag(run.info.run_id, "device")
        return client, StudyRun(grid.study, experiment_id, run.info.run_id)
    ablation = grid.ablation
    tags = {
        "study": grid.study, results.PARENT_TAG: "1", results.TAG_CONFIG: grid.key,
        results.TAG_ABLATION: ablation.name,
        results.TAG_SCIENTIFIC: ablation.scientific, results.TAG_REFERENCE: ablation.reference,
        results.TAG_ARMS: ",".join(a.name for a in ablation.arms),
        results.TAG_GROUPS: ",".join(dict.fromkeys(a.group for a in ablation.arms)),
        "profile": grid.profile, **now, **({"device": device} if device is not None else {}),
        tracking.NOTE_TAG: tracking.mask_secrets(_headline(grid)),
    }
    run = client.create_run(experiment_id, tags=tags,
                            run_name=f"{grid.study}-{grid.profile}-{grid.epochs_each}ep")
    for key, value in {"ablation": ablation.name, "profile": grid.profile,
                       "epochs": grid.epochs_each,
                       "data": tracking.mask_secrets(grid.data or "synthetic"),
                       "reference_arm": ablation.reference}.items():
        client.log_param(run.info.run_id, key, value)
    return client, StudyRun(grid.study, experiment_id, run.info.run_id)


def first_paragraph(text: str) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join(text.strip().split("\n\n")[0].split())


def _headline(grid: Grid) -> str:
    """The study's docstring's first paragraph, or what its ablation is."""
    if grid.doc.strip():
        return first_paragraph(grid.doc)
    ablation = grid.ablation
    return f"Ablation `{ablation.name}`: {ablation.scientific}."


def study_description(grid: Grid) -> str:
    """The experiment's description in the MLflow UI (Markdown): what the study compares, and
    where its runs, group curves and report are."""
    ablation = grid.ablation
    arms = ", ".join(f"`{a.name}`" + (" (reference)" if a.name == ablation.reference else "")
                     for a in ablation.arms)
    return (
        f"{_headline(grid)}\n\n"
        f"Arms: {arms}. One run per arm and seed (`<arm>-s<seed>`), under one parent run per "
        f"configuration (`{grid.study}-<profile>-<epochs>ep`). The parent run holds each "
        "arm's curves over seeds as metrics, step = epoch: `<arm>/val_psnr_mean`, "
        "`<arm>/val_psnr_sd`, `<arm>/val_psnr_lo` and `<arm>/val_psnr_hi` (mean ∓ 1 sd), the "
        "same for `train_loss` and `val_loss`, and the final numbers "
        "(`<arm>/final_val_psnr_mean`, `<arm>/delta_vs_reference`); its artifacts hold the "
        f"report's figures and summary under `report/` (also in `mlruns/reports/{grid.study}/`)."
    )


def add_seeds(client: Any, parent_run_id: str, seeds: Sequence[int]) -> None:
    """The parent's ``seeds`` tag: every seed any invocation of its configuration asked for."""
    old = client.get_run(parent_run_id).data.tags.get("seeds", "").split()
    merged = sorted({int(s) for s in old} | {int(s) for s in seeds})
    client.set_tag(parent_run_id, "seeds", " ".join(map(str, merged)))


def adopt(client: Any, run_id: str, parent_run_id: str) -> None:
    """Point a reused run at this parent if it points nowhere (started outside a study)."""
    if results.PARENT_ID_TAG not in client.get_run(run_id).data.tags:
        client.set_tag(run_id, results.PARENT_ID_TAG, parent_run_id)


def finished(experiment_id: str, spec: ExperimentSpec) -> bool:
    runs = tracking.find_runs(experiment_id, spec_hash=spec_hash(spec), seed=spec.seed)
    return any(r.info.status == "FINISHED" for r in runs)


def pending(grid: Grid) -> int:
    """How many (arm, seed) pairs have no FINISHED run yet (all of them in a new study)."""
    from mlflow.tracking import MlflowClient

    tracking.configure()
    found = MlflowClient().get_experiment_by_name(grid.study)
    if found is None:
        return len(grid.runs)
    return sum(not finished(found.experiment_id, run.spec) for run in grid.runs)


# ---------------------------------------------------------------------------------------------
# Running the grid here
# ---------------------------------------------------------------------------------------------
def run_here(grid: Grid, *, device: str, pack: int = 1,
             progress: bool | None = None) -> StudyRun:
    """Train the grid's runs in this process, in packs of up to ``pack`` (1: one run at a
    time), seed-major. Prints a line when a run starts and when it ends; the runner draws a
    progress bar per run on a terminal (``progress`` forces it on or off)."""
    from experiments.data import load_data

    client, study = open_study(grid, device=device)
    runs = grid.runs
    packs = f", packs of up to {pack}" if pack > 1 else ""
    print(f"{grid.study}: {len(grid.chosen)} arm(s) × {len(grid.seeds)} seed(s) = {len(runs)} "
          f"runs, profile {grid.profile}, {grid.epochs_each} epochs, device {device}{packs}; "
          f"experiment {study.experiment_id}, parent run {study.parent_run_id}", flush=True)
    data: dict[Any, Any] = {}
    status, started, trained = "FAILED", time.monotonic(), 0
    try:
        for start in range(0, len(runs), pack):
            by_data: dict[Any, list[int]] = {}  # a pack trains on one dataset
            for index in range(start, min(start + pack, len(runs))):
                by_data.setdefault(runs[index].spec.data, []).append(index)
            for spec_data, indices in by_data.items():
                todo = [i for i in indices if not finished(study.experiment_id, runs[i].spec)]
                for i in todo:
                    print(f"{_label(grid, i)}: start", flush=True)
                if todo and spec_data not in data:
                    data[spec_data] = load_data(spec_data, grid.profile)
                trained += _run_pack(grid, client, study, indices, device=device,
                                     data=data.get(spec_data), progress=progress)
            _progress_line(grid, min(start + pack, len(runs)), trained, started)
        status = "FAILED" if study.failures else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        add_seeds(client, study.parent_run_id, grid.seeds)
        client.set_terminated(study.parent_run_id, status)
    return study


def _progress_line(grid: Grid, done: int, trained: int, started: float) -> None:
    """``[study] 3/6 runs · 12 min · study ETA 12 min`` (from the runs trained here)."""
    elapsed = time.monotonic() - started
    left = len(grid.runs) - done
    eta = f" · study ETA {duration(elapsed / trained * left)}" if trained and left else ""
    print(f"[{grid.study}] {done}/{len(grid.runs)} runs · {duration(elapsed)}{eta}", flush=True)


def _run_pack(grid: Grid, client: Any, study: StudyRun, indices: list[int], *, device: str,
              data: Any, progress: bool | None) -> int:
    """The grid's runs at ``indices`` as one pack (alone when there is one), recorded;
    returns how many trained here (not reused)."""
    runs = [grid.runs[i] for i in indices]
    started = time.monotonic()
    outcomes = run_pack([run.spec for run in runs],
                        [grid.context(run.arm, experiment_id=study.experiment_id,
                                      parent_run_id=study.parent_run_id) for run in runs],
                        device=device, data=data, progress=progress)
    how = f"{time.monotonic() - started:.1f} s" + (
        f" (pack of {len(runs)})" if len(runs) > 1 else "")
    for index, run, outcome in zip(indices, runs, outcomes, strict=True):
        record(client, study, _label(grid, index), run, outcome, how)
    return sum(not getattr(outcome, "skipped", False) for outcome in outcomes)


def _label(grid: Grid, index: int) -> str:
    run = grid.runs[index]
    return f"[{grid.study} {index + 1}/{len(grid.runs)}] {run.arm.name} seed {run.seed}"


def record(client: Any, study: StudyRun, label: str, run: GridRun,
           result: RunOutcome | NonFiniteLossError | RunBusyError, how: str) -> None:
    """One run's result into the study: a failure (a diverged loss, or a run another live
    process trains: not in this report), or a run filed under the parent."""
    if isinstance(result, (NonFiniteLossError, RunBusyError)):
        what = "FAILED" if isinstance(result, NonFiniteLossError) else "not run here"
        print(f"{label}: {what} ({result})", flush=True)
        study.failures.append(f"{run.arm.name} seed {run.seed}: {result}")
        return
    adopt(client, result.run_id, study.parent_run_id)
    study.outcomes.append(result)
    what = "reused" if result.skipped else result.status
    print(f"{label}: {what} run {result.run_id} · final val/psnr "
          f"{result.metrics.get('val/psnr', float('nan')):.2f} dB · {how}", flush=True)
