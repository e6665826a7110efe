"""Every study in a tracking store, with its kind and state (``python -m studies list``; the
report command uses it to redraw each study as what it is).

Kinds, from the runs themselves:

- ``ablation``: a parent run of ``studies.grid`` (tag ``study_parent=1``, with an
  ``ablation`` tag); one entry per configuration (profile, epochs), its runs counted per
  (arm, seed) as the report counts them (``studies.results.study_children``).
- ``tuning``: a parent run of ``studies.tune`` (``study_parent=1`` with a ``search_space``
  tag), one per Optuna study; its trials are its child runs (tag ``trial_state``).
- ``runs``: an experiment with runs but no parent run (``python -m experiments run --study
  NAME``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from experiments import tracking
from experiments.spec import SpecError
from studies import results
from studies.results import REPORTS

KINDS = ("ablation", "tuning", "runs")
TUNING_TAG = "search_space"  # only a tuning study's parent has it


@dataclass
class Entry:
    """One study configuration (an ablation's parent run, a tuning study's parent run) or an
    experiment of runs without a parent."""

    study: str  # the MLflow experiment
    kind: str  # one of KINDS
    experiment_id: str
    parent: Any | None = None  # mlflow Run
    profile: str = ""
    epochs: str = ""
    arms: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # state -> runs (trials)
    updated: float = 0.0  # Unix seconds
    report: Path | None = None

    @property
    def name(self) -> str:
        """The configuration's name: its parent run's (an Optuna study's for tuning)."""
        if self.parent is None:
            return self.study
        tags = self.parent.data.tags
        return tags.get("optuna_study") if self.kind == "tuning" else \
            self.parent.info.run_name or self.parent.info.run_id


def store_name() -> str:
    return tracking.mask_secrets(tracking.tracking_uri())


def open_store() -> Any:
    """A client on the tracking store. A local store that does not exist is an error
    (``SpecError``), not created: reading studies writes nothing."""
    path = tracking.sqlite_path(tracking.tracking_uri())
    if path is not None and not path.is_file():
        raise SpecError(f"no tracking store {store_name()} here ({Path.cwd()}); run a study "
                        "first (e.g. python -m studies.kl_ablation) or set MLFLOW_TRACKING_URI")
    return results.client_or_default()


def find(client: Any, *, pattern: str = "*") -> list[Entry]:
    """Every study whose experiment name matches the glob ``pattern``, in experiment order,
    each configuration most recently used first."""
    entries = []
    by_id = sorted(results.experiments(client),
                   key=lambda e: int(e.experiment_id) if str(e.experiment_id).isdigit() else 0)
    for experiment in by_id:
        if not fnmatch.fnmatchcase(experiment.name, pattern):
            continue
        runs = results.search_all(client, [experiment.experiment_id], "")
        parents = sorted((r for r in runs if results.is_parent(r)), key=_last_seen, reverse=True)
        for parent in parents:
            if TUNING_TAG in parent.data.tags:
                entries.append(_tuning(experiment, parent, runs))
            else:
                entries.append(_ablation(client, experiment, parent))
        if runs and not parents:
            entries.append(_ablation(client, experiment, None))
    return entries


def _ablation(client: Any, experiment: Any, parent: Any | None) -> Entry:
    """An ablation configuration (or an experiment of runs without a parent, ``parent``
    None): its (arm, seed) pairs by state, as the report sees them."""
    parent_id = parent.info.run_id if parent is not None else None
    finished, unfinished = results.study_children(client, experiment.name, parent_id)
    timing = tracking.lease_timing()
    counts = {"finished": len(finished), "running": 0, "interrupted": 0, "failed": 0}
    for run in unfinished:
        if run.info.status == "FAILED":
            counts["failed"] += 1
        elif run.info.status == "RUNNING" and tracking.lease_is_live(run.data.tags, timing):
            counts["running"] += 1
        else:  # KILLED, or RUNNING with its owner gone: a rerun resumes it
            counts["interrupted"] += 1
    children = [*finished, *unfinished]
    meta = results.study_meta(experiment.name, children, parent)
    tags = parent.data.tags if parent is not None else {}
    seeds = sorted({int(s) for s in tags.get("seeds", "").split()} | set(meta.seeds))
    return Entry(
        study=experiment.name, kind="ablation" if parent is not None else "runs",
        experiment_id=experiment.experiment_id, parent=parent, profile=meta.profile,
        epochs=parent.data.params.get("epochs", "") if parent is not None
        else "+".join(sorted({r.data.params.get("train.epochs", "") for r in children} - {""})),
        arms=meta.arms, seeds=seeds, counts=counts,
        updated=max((_last_seen(r) for r in [*children, *([parent] if parent else [])]),
                    default=0.0),
        report=_report(experiment.name, "summary.md"))


def _tuning(experiment: Any, parent: Any, runs: Sequence[Any]) -> Entry:
    """A tuning study: its trials (child runs) by state."""
    trials = [r for r in runs if r.data.tags.get(results.PARENT_ID_TAG) == parent.info.run_id]
    counts = {"complete": 0, "pruned": 0, "failed": 0, "running": 0}
    for run in trials:
        state = run.data.tags.get("trial_state", "")
        key = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(state)
        if key is None and run.info.status == "RUNNING":
            key = "running"
        if key is not None:
            counts[key] += 1
    tags = parent.data.tags
    return Entry(
        study=experiment.name, kind="tuning", experiment_id=experiment.experiment_id,
        parent=parent, profile=tags.get("profile", ""), epochs=tags.get("epochs", ""),
        arms=[tags.get("arm") or tags.get("spec", "")],
        seeds=sorted({results.run_seed(r) for r in trials}), counts=counts,
        updated=max(_last_seen(r) for r in [parent, *trials]),
        report=_report(tags.get("optuna_study", ""), "trials.csv"))


def _last_seen(run: Any) -> float:
    """When the run last changed, in Unix seconds: its end, its lease's last heartbeat, or
    its start."""
    beat = run.data.tags.get("lease_heartbeat", "")
    try:
        heartbeat = float(beat)
    except ValueError:
        heartbeat = 0.0
    return max((run.info.end_time or run.info.start_time or 0) / 1000, heartbeat)


def _report(name: str, marker: str) -> Path | None:
    folder = REPORTS / name
    return folder if name and (folder / marker).is_file() else None


# ---------------------------------------------------------------------------------------------
# The listing
# ---------------------------------------------------------------------------------------------
def ui_link(experiment_id: str) -> str:
    """Where the MLflow UI shows the experiment's runs: on the tracking server, or on
    ``mlflow ui``'s default address for a local store."""
    base = tracking.ui_base(tracking.tracking_uri()) or "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?{tracking.UI_VIEW}"


def _when(seconds: float) -> str:
    if not seconds:
        return "never"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _counts(counts: dict[str, int], noun: str) -> str:
    return f"{noun}: " + ", ".join(f"{n} {state}" for state, n in counts.items())


def describe(entry: Entry) -> list[str]:
    """An entry as indented lines under its study's heading."""
    about = [f"profile {entry.profile or '?'}"]
    if entry.epochs:
        about.append(f"{entry.epochs} epochs")
    if entry.kind == "tuning":
        tags = entry.parent.data.tags
        about.append(f"spec {entry.arms[0]}")
        if tags.get("n_trials"):
            about.append(f"{tags['n_trials']} trials asked")
        state = _counts(entry.counts, "trials")
        best = entry.parent.data.metrics.get("best_val_psnr")
        if best is not None:
            state += f" · best val/psnr {best:.2f} dB (trial {tags.get('best_trial', '?')})"
    else:
        about.append("arms " + (" ".join(entry.arms) or "none"))
        about.append("seeds " + (" ".join(map(str, entry.seeds)) or "none"))
        state = _counts(entry.counts, "runs")
    report = f"{entry.report}/" if entry.report is not None else "not written yet"
    return [f"  {entry.name}: " + ", ".join(about),
            f"    {state} · last update {_when(entry.updated)}",
            f"    report: {report}"]


def listing(entries: Sequence[Entry]) -> str:
    """The studies, grouped by experiment, and how to open them in the MLflow UI."""
    lines: list[str] = []
    for study in dict.fromkeys(e.study for e in entries):
        mine = [e for e in entries if e.study == study]
        lines.append(f"{study} ({mine[0].kind}, experiment {mine[0].experiment_id})")
        for entry in mine:
            lines += describe(entry)
    uri = tracking.tracking_uri()
    how = "open" if uri.startswith(("http://", "https://")) else \
        f"mlflow ui --backend-store-uri {tracking.mask_secrets(uri)}, then open"
    example = ui_link(entries[0].experiment_id) if entries else ui_link("ID")
    ui = f"MLflow UI: {how} {example} (the experiment's runs; another experiment: its number)"
    lines += ["", ui]
    return "\n".join(lines)
