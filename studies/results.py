"""A study's results read back from MLflow into tidy pandas tables.

Everything here goes through ``MlflowClient`` (search, metric history, artifact download), so
it works the same against the local SQLite store and an ``mlflow server``.

Which runs: the FINISHED runs of a study (``tags.study``) other than its parent runs (tagged
``study_parent=1``). When the study has parent runs, those of one parent's configuration (by
default the most recently used parent) are taken: a parent stands for one configuration of
the study (profile, epochs, data) and lists its arms' resolved spec hashes, so runs of
different configurations are never averaged (``study_children``). The configuration's
(arm, seed) pairs with no FINISHED run (a FAILED run: a diverged loss is a result too; a
KILLED or still RUNNING one) are listed beside the tables (also ``study_children``), never
silently dropped.

Two tidy tables, one row per observation:

- ``metrics``: run_id, study, arm, group, seed, epoch, metric, value. One row per run × epoch ×
  metric, epoch = the MLflow step (0-based). Metrics as the runner logs them: ``train/loss``
  (summed objective per clip), ``train/mse``, ``train/kl``, ``train/beta``, ``train/tfr``,
  ``train/lr``, ``val/loss`` (per-frame MSE), ``val/psnr`` (dB; only at evaluated epochs)
  and ``val/psnr_copy_first`` (the copy-first-frame floor, logged once at epoch 0).
- ``per_frame``: the same columns plus ``frame`` (the lab's 1-based frame number, 2..L):
  metric ``val/psnr_per_frame`` (the final model) or ``val/psnr_copy_first_per_frame`` (the
  floor); ``epoch`` is the epoch of the evaluation the frames come from (the last one).
  From each run's ``psnr_per_frame.csv`` artifact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments import tracking

# Tags the study orchestration (studies.grid) writes on a study's parent run.
PARENT_TAG = "study_parent"
TAG_ABLATION = "ablation"
TAG_REFERENCE = "reference_arm"
TAG_ARMS = "arm_order"
TAG_GROUPS = "group_order"
TAG_SCIENTIFIC = "scientific"
TAG_CONFIG = "study_config"
TAG_SPEC_HASHES = "spec_hashes"  # the configuration's arms, as resolved spec hashes
# Written by the study command (studies.cli): the readouts that answer the study's question
# (primary first), and for a study run until decided its sequential design: the readout its
# rounds tested, the looks (seeds at each), the most seeds, and the seeds the rounds ran.
TAG_READOUTS = "readouts"
TAG_SEQUENTIAL_READOUT = "sequential_readout"
TAG_SEQUENTIAL_LOOKS = "sequential_looks"
TAG_SEQUENTIAL_MAX_SEEDS = "sequential_max_seeds"
TAG_SEQUENTIAL_SEEDS = "sequential_seeds"
SEQUENTIAL_TAGS = (TAG_SEQUENTIAL_READOUT, TAG_SEQUENTIAL_LOOKS, TAG_SEQUENTIAL_MAX_SEEDS,
                   TAG_SEQUENTIAL_SEEDS)
PARENT_ID_TAG = "mlflow.parentRunId"

REPORTS = Path("mlruns") / "reports"  # every report's default folder, one per study

COLUMNS = ["run_id", "study", "arm", "group", "seed", "epoch", "metric", "value"]
FRAME_COLUMNS = ["run_id", "study", "arm", "group", "seed", "epoch", "frame", "metric", "value"]
PER_FRAME_METRICS = {"psnr": "val/psnr_per_frame",
                     "psnr_copy_first": "val/psnr_copy_first_per_frame"}


@dataclass(frozen=True)
class SequentialDesign:
    """How a study ran seeds until decided (``studies.cli``): the ``readout`` its rounds
    tested, the ``looks`` (seeds at each) planned up to ``max_seeds``, and the ``seeds`` its
    rounds ran, in order. ``studies.summary.sequential_boundaries(looks, max_seeds)`` rebuilds
    its boundaries."""

    readout: str
    looks: tuple[int, ...]
    max_seeds: int
    seeds: tuple[int, ...]

    def tags(self) -> dict[str, str]:
        return {TAG_SEQUENTIAL_READOUT: self.readout,
                TAG_SEQUENTIAL_LOOKS: ",".join(map(str, self.looks)),
                TAG_SEQUENTIAL_MAX_SEEDS: str(self.max_seeds),
                TAG_SEQUENTIAL_SEEDS: " ".join(map(str, self.seeds))}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> SequentialDesign | None:
        """The design a parent's tags record (None when it has none, or only part of one)."""
        if not all(tags.get(t) for t in SEQUENTIAL_TAGS):
            return None
        return cls(tags[TAG_SEQUENTIAL_READOUT],
                   tuple(int(n) for n in _split(tags[TAG_SEQUENTIAL_LOOKS])),
                   int(tags[TAG_SEQUENTIAL_MAX_SEEDS]),
                   tuple(int(s) for s in tags[TAG_SEQUENTIAL_SEEDS].split()))


@dataclass
class StudyMeta:
    """What the plots and tables need to know beyond the numbers (from the parent run)."""

    study: str
    parent_run_id: str | None = None
    ablation: str = ""
    scientific: str = ""
    profile: str = ""
    reference: str = ""
    arms: list[str] = field(default_factory=list)  # plotting order
    groups: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    readouts: list[str] = field(default_factory=lambda: ["final"])  # primary first
    sequential: SequentialDesign | None = None  # a study run until decided

    @property
    def grouped(self) -> bool:
        """True when groups hold several arms (e.g. teacher forcing × the three KL arms)."""
        return len(self.groups) < len(self.arms)


@dataclass
class StudyResults:
    meta: StudyMeta
    runs: list[Any]  # mlflow.entities.Run, the FINISHED children
    metrics: pd.DataFrame  # COLUMNS
    per_frame: pd.DataFrame  # FRAME_COLUMNS
    unfinished: list[Any] = field(default_factory=list)  # pairs with no FINISHED run


def client_or_default(client: Any | None = None) -> Any:
    """The given client, or one on the configured tracking store."""
    # MLflow draws a progress bar per downloaded artifact; a report downloads one per run.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if client is not None:
        return client
    from mlflow.tracking import MlflowClient

    tracking.configure()
    return MlflowClient()


# ---------------------------------------------------------------------------------------------
# Finding runs
# ---------------------------------------------------------------------------------------------
def search_all(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    """Every run matching ``filter_string`` (paged)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def experiments(client: Any) -> list[Any]:
    """Every active experiment (paged), in the store's order."""
    found, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def experiment_ids(client: Any, study: str | None = None) -> list[str]:
    """The experiment named after ``study`` when it exists, else every active experiment."""
    if study is not None:
        found = client.get_experiment_by_name(study)
        if found is not None and found.lifecycle_stage == "active":
            return [found.experiment_id]
    return [e.experiment_id for e in experiments(client)]


def is_parent(run: Any) -> bool:
    return run.data.tags.get(PARENT_TAG) == "1"


def find_parents(client: Any, study: str | None = None) -> list[Any]:
    """Study parent runs (of ``study``, or of every study), most recently used first."""
    query = f"tags.{PARENT_TAG} = '1'"
    if study is not None:
        query += f" and tags.study = {tracking.quote_filter_value(study)}"
    runs = search_all(client, experiment_ids(client, study), query)
    return sorted(runs, key=lambda r: r.info.end_time or r.info.start_time or 0, reverse=True)


def study_children(client: Any, study: str,
                   parent_run_id: str | None = None) -> tuple[list[Any], list[Any]]:
    """The runs of ``study`` that are not parent runs, as (finished, unfinished); with
    ``parent_run_id``, those of that parent's configuration.

    A configuration's runs are those whose ``spec_hash`` is one of its arms' (the parent's
    ``spec_hashes`` tag), whichever parent created them: a run reused by a later
    configuration (an arm whose resolved spec did not change) belongs to both. A parent
    without that tag (written by an older version) holds the runs that point at it. Of two
    FINISHED runs of one (spec, seed) the newest counts, as the runner would reuse it.
    ``unfinished``: the newest run of each (spec, seed) that has no FINISHED run (FAILED, e.g.
    a non-finite loss with its ``stop_reason``; KILLED; RUNNING), what the tables leave out.
    Both lists carry the same arm labels (``_label_configurations``).
    """
    finished = _newest_per_pair(client, study, parent_run_id, "= 'FINISHED'")
    others = _newest_per_pair(client, study, parent_run_id, "!= 'FINISHED'")
    unfinished = [run for key, run in others.items() if key not in finished]
    _label_configurations([*finished.values(), *unfinished])

    def ordered(runs):
        return sorted(runs, key=lambda r: (r.data.tags.get("arm", ""), run_seed(r)))

    return ordered(finished.values()), ordered(unfinished)


def _newest_per_pair(client: Any, study: str, parent_run_id: str | None,
                     status: str) -> dict[tuple[str, int], Any]:
    """(spec_hash, seed) -> the newest run of ``study`` whose status matches ``status`` (an
    MLflow filter clause) among the configuration's runs (see ``study_children``)."""
    query = f"tags.study = {tracking.quote_filter_value(study)} and attributes.status {status}"
    hashes: set[str] | None = None
    if parent_run_id is not None:
        tag = client.get_run(parent_run_id).data.tags.get(TAG_SPEC_HASHES)
        if tag:
            hashes = set(_split(tag))
        else:
            query += f" and tags.{PARENT_ID_TAG} = {tracking.quote_filter_value(parent_run_id)}"
    newest: dict[tuple[str, int], Any] = {}
    for run in search_all(client, experiment_ids(client, study), query):
        spec = run.data.tags.get("spec_hash", run.info.run_id)
        if is_parent(run) or (hashes is not None and spec not in hashes):
            continue
        key = (spec, run_seed(run))
        if key not in newest or run.info.start_time > newest[key].info.start_time:
            newest[key] = run
    return newest


def _label_configurations(runs: Sequence[Any]) -> None:
    """Give an arm whose runs hold several configurations (spec hashes) one label per
    configuration, ``arm@hash``, in the runs' tags as loaded (not in the store), so that
    runs with different settings are never pooled as seeds of one arm. A study's parent
    holds one configuration per arm; runs filed without one can hold several:
    ``experiments run`` with different ``--set``, or the trials of a tuning study."""
    hashes: dict[str, set[str]] = {}
    for run in runs:
        if "arm" in run.data.tags:
            hashes.setdefault(run.data.tags["arm"], set()).add(run.data.tags.get("spec_hash", ""))
    for run in runs:
        tags = run.data.tags
        arm = tags.get("arm")
        if arm is not None and len(hashes[arm]) > 1:
            label = f"{arm}@{tags.get('spec_hash', '')[:8] or 'unknown'}"
            if tags.get("group", arm) == arm:
                tags["group"] = label
            tags["arm"] = label


def run_seed(run: Any) -> int:
    """The run's seed (tag, else param); -1 when it has none."""
    try:
        return int(run.data.tags.get("seed", run.data.params.get("seed", -1)))
    except ValueError:
        return -1


def _split(text: str | None) -> list[str]:
    return [t for t in (text or "").split(",") if t]


def study_meta(study: str, runs: Sequence[Any], parent: Any | None = None) -> StudyMeta:
    """Arm and group order, reference arm and profile: from the parent's tags when there is
    one, otherwise from the runs (sorted names, first arm as reference)."""
    tags = parent.data.tags if parent is not None else {}
    present_arms = {r.data.tags.get("arm", "") for r in runs}
    present_groups = {r.data.tags.get("group", "") for r in runs}
    arms = [a for a in _split(tags.get(TAG_ARMS)) if a in present_arms]
    arms += sorted(present_arms - set(arms))
    groups = [g for g in _split(tags.get(TAG_GROUPS)) if g in present_groups]
    groups += sorted(present_groups - set(groups))
    profiles = sorted({r.data.tags.get("profile", "") for r in runs} - {""})
    return StudyMeta(
        study=study,
        parent_run_id=parent.info.run_id if parent is not None else None,
        ablation=tags.get(TAG_ABLATION, ""),
        scientific=tags.get(TAG_SCIENTIFIC, ""),
        profile=tags.get("profile") or "+".join(profiles),
        reference=tags.get(TAG_REFERENCE) or (arms[0] if arms else ""),
        arms=arms, groups=groups, seeds=sorted({run_seed(r) for r in runs}),
        readouts=_split(tags.get(TAG_READOUTS)) or ["final"],
        sequential=SequentialDesign.from_tags(tags),
    )


# ---------------------------------------------------------------------------------------------
# Tidy tables
# ---------------------------------------------------------------------------------------------
def _labels(run: Any, study: str) -> dict[str, Any]:
    tags = run.data.tags
    arm = tags.get("arm", run.info.run_name or run.info.run_id)
    return {"run_id": run.info.run_id, "study": tags.get("study", study), "arm": arm,
            "group": tags.get("group", arm), "seed": run_seed(run)}


def tidy_metrics(client: Any, runs: Iterable[Any], *, study: str = "",
                 keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Full metric curves (``get_metric_history``) of ``runs`` as the tidy ``COLUMNS`` table.

    A step logged twice for one key (only possible by hand) keeps its latest value, so there
    is exactly one row per run × epoch × metric.
    """
    rows = []
    for run in runs:
        labels = _labels(run, study)
        for key in keys if keys is not None else sorted(run.data.metrics):
            history = sorted(client.get_metric_history(run.info.run_id, key),
                             key=lambda m: (m.step, m.timestamp))
            latest = {m.step: m.value for m in history}
            rows.extend({**labels, "epoch": step, "metric": key, "value": value}
                        for step, value in latest.items())
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({"seed": "int64", "epoch": "int64", "value": "float64"}) \
        .sort_values(["arm", "seed", "metric", "epoch"], kind="stable").reset_index(drop=True)


def _final_epoch(run: Any, metrics: pd.DataFrame) -> int:
    steps = metrics.loc[(metrics["run_id"] == run.info.run_id)
                        & (metrics["metric"] == "val/psnr"), "epoch"]
    if len(steps):
        return int(steps.max())
    return int(run.data.params.get("train.epochs", 0)) - 1


def tidy_per_frame(client: Any, runs: Iterable[Any], *, study: str = "",
                   metrics: pd.DataFrame | None = None,
                   workdir: str | Path | None = None) -> pd.DataFrame:
    """Each run's ``psnr_per_frame.csv`` (frame, psnr, psnr_copy_first) as the tidy
    ``FRAME_COLUMNS`` table. Runs without the artifact are left out."""
    metrics = metrics if metrics is not None else pd.DataFrame(columns=COLUMNS)
    frames = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for run in runs:
            if not has_artifact(client, run.info.run_id, "psnr_per_frame.csv"):
                continue  # e.g. a run recorded by an older version
            dst = Path(tmp) / run.info.run_id
            dst.mkdir()
            path = client.download_artifacts(run.info.run_id, "psnr_per_frame.csv", str(dst))
            wide = pd.read_csv(path)
            long = wide.melt(id_vars="frame", value_vars=list(PER_FRAME_METRICS),
                             var_name="metric", value_name="value")
            long["metric"] = long["metric"].map(PER_FRAME_METRICS)
            for key, value in _labels(run, study).items():
                long[key] = value
            long["epoch"] = _final_epoch(run, metrics)
            frames.append(long[FRAME_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=FRAME_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    return table.astype({"seed": "int64", "epoch": "int64", "frame": "int64",
                         "value": "float64"}) \
        .sort_values(["arm", "seed", "metric", "frame"], kind="stable").reset_index(drop=True)


def has_artifact(client: Any, run_id: str, path: str) -> bool:
    folder = path.rpartition("/")[0] or None
    return any(a.path == path for a in client.list_artifacts(run_id, folder))


def prediction_arrays(client: Any, run_id: str, workdir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction), each (L, H, W, 3) uint8, from the run's ``val_prediction.npz``."""
    path = client.download_artifacts(run_id, "val_prediction.npz", str(workdir))
    with np.load(path) as arrays:
        return arrays["truth"], arrays["prediction"]


# ---------------------------------------------------------------------------------------------
# A whole study
# ---------------------------------------------------------------------------------------------
def resolve_parent(client: Any, study: str, parent_run_id: str | None = None) -> Any | None:
    """The given parent run, or the study's most recently used one (None if it has none)."""
    if parent_run_id is not None:
        from mlflow.exceptions import MlflowException

        from experiments.spec import SpecError

        try:
            run = client.get_run(parent_run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # an unreachable store is not the run's fault
            raise SpecError(f"--parent {parent_run_id}: no such run in "
                            f"{tracking.mask_secrets(tracking.tracking_uri())}") from None
        if not is_parent(run) or run.data.tags.get("study") != study:
            raise SpecError(f"run {parent_run_id} is not a parent run of study {study!r}")
        return run
    parents = find_parents(client, study)
    return parents[0] if parents else None


def load_study(study: str, *, parent_run_id: str | None = None, client: Any | None = None,
               per_frame: bool = True) -> StudyResults:
    """The study's FINISHED child runs, their metric curves and per-frame PSNR."""
    client = client_or_default(client)
    parent = resolve_parent(client, study, parent_run_id)
    parent_id = parent.info.run_id if parent is not None else None
    runs, unfinished = study_children(client, study, parent_id)
    metrics = tidy_metrics(client, runs, study=study)
    frames = tidy_per_frame(client, runs, study=study, metrics=metrics) if per_frame \
        else pd.DataFrame(columns=FRAME_COLUMNS)
    return StudyResults(study_meta(study, runs, parent), runs, metrics, frames, unfinished)


def write_tables(results: StudyResults, out_dir: str | Path) -> list[Path]:
    """``metrics.{csv,parquet}`` and ``psnr_per_frame.{csv,parquet}`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in (("metrics", results.metrics), ("psnr_per_frame", results.per_frame)):
        csv, parquet = out / f"{name}.csv", out / f"{name}.parquet"
        table.to_csv(csv, index=False)
        table.to_parquet(parquet, index=False)
        written += [csv, parquet]
    return written
