"""Redraw every figure and table of a study from MLflow alone (no training).

    python -m studies.report                      # every study found in the tracking store
    python -m studies.report --study kl_ablation  # one study (its most recently used parent run)
    python -m studies.report --study kl_ablation --parent RUN_ID   # one configuration of it

Reads only through ``MlflowClient`` (run search, metric histories, artifact download), so
``MLFLOW_TRACKING_URI=http://host:5000`` works as well as the local SQLite store. Writes to
``mlruns/reports/<study>/`` (``--out DIR`` for ``DIR/<study>/``) and logs the same files to the
study's parent run under ``report/``:

- ``metrics.{csv,parquet}``, ``psnr_per_frame.{csv,parquet}``: the tidy tables (studies.results)
- ``summary.md``, ``summary.csv`` (+ ``summary_groups.csv`` when groups hold several arms):
  final and best val PSNR per arm, mean ± sd and 95% t-interval over seeds, and each arm
  against the reference arm (Welch 95% interval of the difference, and paired by seed; a
  plain verdict read from the paired interval); the arms
  and seeds without a FINISHED run (FAILED, KILLED, RUNNING) are named below the table
- ``beta.png`` (Fig. 1), ``teacher_forcing.png`` (Fig. 2), ``train_loss.png``, ``val_loss.png``,
  ``val_psnr.png`` (Table 1 / Fig. 3: mean ± 1 sd across seeds), ``psnr_per_frame.png``
  (Fig. 4, with the copy-first-frame floor), ``filmstrip.png`` (ground truth vs each arm)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from studies import catalog, plots, summary
from studies.results import (
    REPORTS,
    StudyResults,
    client_or_default,
    has_artifact,
    load_study,
    prediction_arrays,
    write_tables,
)
from studies.ui import log_group_metrics


@dataclass
class Report:
    study: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    summary: pd.DataFrame | None = None
    group_summary: pd.DataFrame | None = None
    markdown: str = ""


def _subtitle(results: StudyResults) -> str:
    """'study S · profile P · 2 seeds (0, 1)': each figure adds a line saying what its band
    is."""
    meta = results.meta
    parts = [f"study {meta.study}", f"profile {meta.profile or '?'}",
             plots.describe_seeds(meta.seeds)]
    return " · ".join(parts)


def summary_markdown(results: StudyResults, table: pd.DataFrame,
                     groups: pd.DataFrame | None) -> str:
    meta = results.meta
    lines = [f"# {meta.study}: summary", ""]
    about = [f"Ablation `{meta.ablation}`" if meta.ablation else "",
             f"scientific hyperparameter: {meta.scientific}" if meta.scientific else "",
             f"profile `{meta.profile}`", plots.describe_seeds(meta.seeds)]
    lines += ["; ".join(a for a in about if a) + ".", ""]
    method = (
        "Final = validation PSNR at the last epoch; best = the maximum over evaluated epochs "
        "(epochs are 0-based MLflow steps). mean ± sd over seeds with a 95% t-interval. "
        f"Δ = difference in mean final val PSNR against the reference arm `{meta.reference}`, "
        "with a 95% Welch interval (Welch–Satterthwaite df), and the same difference paired "
        "by seed: the mean of the per-seed differences over the seeds both arms ran, with a "
        "95% t-interval on n-1 df (runs of one seed share its initialisation, clip order and "
        "noise, and pairing removes that shared part). The verdict reads the paired interval "
        "(higher PSNR is better); where fewer than 2 seeds are shared, it reads Welch's and "
        "says so.")
    lines += [method, "", summary.to_markdown(table, reference=meta.reference)]
    if results.unfinished:
        left_out = "; ".join(
            f"`{r.data.tags.get('arm', r.info.run_name)}` seed {r.data.tags.get('seed', '?')}: "
            f"{r.info.status}" + (f" ({r.data.tags['stop_reason']})"
                                  if r.data.tags.get("stop_reason") else "")
            for r in results.unfinished)
        lines += ["", f"Not in the table (no FINISHED run of this arm and seed): {left_out}."]
    if groups is not None:
        reference_group = table_group_of(results, meta.reference)
        heading = (f"## By group (each seed's runs averaged over the group's arms: the seeds "
                   f"are the replicates; reference group `{reference_group}`)")
        lines += ["", heading, "", summary.to_markdown(groups, reference=reference_group)]
    return "\n".join(lines) + "\n"


def table_group_of(results: StudyResults, arm: str) -> str:
    groups = results.metrics.loc[results.metrics["arm"] == arm, "group"]
    return str(groups.iloc[0]) if len(groups) else arm


def write_figures(results: StudyResults, out_dir: Path, *, client: Any) -> list[Path]:
    """Every standard figure of the study into ``out_dir``. A metric with one value for every
    run and epoch (the KL study's teacher-forcing ratio: 0) gets no figure: a line on stdout
    says so, and an earlier drawing of it is removed."""
    meta, metrics = results.meta, results.metrics
    hue = "group" if meta.grouped else "arm"
    hue_order = meta.groups if meta.grouped else meta.arms
    by_hue = {"hue": hue, "hue_order": hue_order}
    grouped = {"col": "group", "col_order": meta.groups} if meta.grouped else {}
    floor = metrics.loc[metrics["metric"] == "val/psnr_copy_first", "value"]
    figures = {  # file: metric and drawing options
        "beta.png": ("train/beta", dict(
            hue="arm", hue_order=meta.arms, **grouped,
            title="KL weight β per epoch (report Fig. 1)", ylabel="β (KL weight)",
            subtitle=_subtitle(results), note="β at each epoch's last batch")),
        "teacher_forcing.png": ("train/tfr", dict(
            **by_hue, title="Teacher-forcing ratio per epoch (report Fig. 2)",
            ylabel="teacher-forcing ratio (probability)", ylim=(-0.04, 1.04),
            subtitle=_subtitle(results))),
        "train_loss.png": ("train/loss", dict(
            **by_hue, log_y=True, title="Training loss per epoch (report Table 1 / Fig. 3)",
            ylabel=r"train loss per clip: $\sum_t$ (MSE + β·KL)",
            subtitle=_subtitle(results))),
        "val_loss.png": ("val/loss", dict(
            **by_hue, log_y=True, title="Validation loss per epoch (report Table 1 / Fig. 3)",
            ylabel="val loss: per-frame MSE, pixels in [0, 1]", subtitle=_subtitle(results))),
        "val_psnr.png": ("val/psnr", dict(
            **by_hue, floor=float(floor.mean()) if len(floor) else None,
            title="Validation PSNR per epoch (closed-loop generation, z from the prior)",
            ylabel="val PSNR (dB), mean over frames", subtitle=_subtitle(results))),
    }
    files = []
    available = set(metrics["metric"])
    for name, (metric, options) in figures.items():
        if metric not in available:
            continue
        flat = plots.flat_note(metrics, metric)
        if flat is not None:
            (out_dir / name).unlink(missing_ok=True)
            print(f"{meta.study}: no {name}: {flat}", flush=True)
            continue
        files.append(plots.epoch_curve(metrics, metric=metric, path=out_dir / name, **options))
    if not results.per_frame.empty:
        files.append(plots.psnr_per_frame(
            results.per_frame, path=out_dir / "psnr_per_frame.png", hue="arm",
            hue_order=meta.arms,
            title="Validation PSNR per frame of the final models (report Fig. 4)",
            subtitle=_subtitle(results)))
    strip = _filmstrip(results, out_dir, client=client)
    if strip is not None:
        files.append(strip)
    return files


def _filmstrip(results: StudyResults, out_dir: Path, *, client: Any) -> Path | None:
    """Ground truth vs each arm's prediction (its lowest seed) at six frames."""
    finals = results.metrics[results.metrics["metric"] == "val/psnr"] \
        .sort_values("epoch").groupby("run_id")["value"].last()
    by_arm = {}
    for run in results.runs:
        arm, seed = run.data.tags.get("arm", ""), int(run.data.tags.get("seed", 0))
        if arm not in by_arm or seed < by_arm[arm][1]:
            by_arm[arm] = (run.info.run_id, seed)
    truth, predictions, seeds = None, {}, set()
    with tempfile.TemporaryDirectory() as tmp:
        for arm in results.meta.arms:
            if arm not in by_arm:
                continue
            run_id, seed = by_arm[arm]
            if not has_artifact(client, run_id, "val_prediction.npz"):
                continue
            dst = Path(tmp) / run_id
            dst.mkdir()
            arm_truth, prediction = prediction_arrays(client, run_id, dst)
            truth = arm_truth if truth is None else truth
            psnr = finals.get(run_id, float("nan"))
            predictions[f"{arm}\nseed {seed}, {psnr:.2f} dB"] = prediction
            seeds.add(seed)
    if truth is None:
        return None
    frames = plots.pick_frames(truth.shape[0])
    meta = results.meta
    return plots.filmstrip(
        truth, predictions, path=out_dir / "filmstrip.png", frames=frames,
        title="Validation sequence: ground truth vs each arm's prediction (closed loop)",
        subtitle=f"study {meta.study} · profile {meta.profile} · seed "
                 f"{', '.join(map(str, sorted(seeds)))} of each arm · frame 1 given, "
                 "the rest generated · 4× nearest upscaling · dB = the run's mean val PSNR")


def write_report(results: StudyResults, out_dir: str | Path | None = None, *,
                 client: Any | None = None, log_to_parent: bool = True) -> Report:
    """Tables, summary and figures of ``results`` in ``out_dir`` (default
    ``mlruns/reports/<study>``), also logged to the parent run under ``report/``."""
    client = client_or_default(client)
    meta = results.meta
    out = Path(out_dir) if out_dir is not None else REPORTS / meta.study
    out.mkdir(parents=True, exist_ok=True)
    report = Report(meta.study, out)
    report.files += write_tables(results, out)

    report.summary = summary.summarize(results.metrics, reference=meta.reference, by="arm",
                                       order=meta.arms)
    report.summary.to_csv(out / "summary.csv")
    report.files.append(out / "summary.csv")
    if meta.grouped:
        reference_group = table_group_of(results, meta.reference)
        report.group_summary = summary.summarize(results.metrics, reference=reference_group,
                                                 by="group", order=meta.groups)
        report.group_summary.to_csv(out / "summary_groups.csv")
        report.files.append(out / "summary_groups.csv")
    report.markdown = summary_markdown(results, report.summary, report.group_summary)
    (out / "summary.md").write_text(report.markdown)
    report.files.append(out / "summary.md")

    report.files += write_figures(results, out, client=client)
    if log_to_parent and meta.parent_run_id is not None:
        for path in report.files:
            client.log_artifact(meta.parent_run_id, str(path), "report")
        log_group_metrics(client, results, report.summary, report.group_summary)
    return report


def report_study(study: str, *, parent_run_id: str | None = None,
                 out_root: str | Path | None = None, client: Any | None = None) -> Report:
    """Load ``study`` from MLflow and write its report; a study without finished runs, or
    one the store does not hold (the error lists those it holds), is a ``LookupError``."""
    client = client_or_default(client)
    results = load_study(study, parent_run_id=parent_run_id, client=client)
    if not results.runs:
        entries = catalog.find(client)
        if study not in {e.study for e in entries}:
            raise LookupError(unknown_study(study, entries))
        raise LookupError(f"study {study!r} has no FINISHED runs in the tracking store")
    out = Path(out_root) / study if out_root is not None else None
    return write_report(results, out, client=client)


def unknown_study(study: str, entries: list[catalog.Entry]) -> str:
    """One line: the study is not in the store, and those that are."""
    kinds = {e.study: e.kind for e in entries}
    known = ", ".join(f"{name} ({kind})" for name, kind in kinds.items()) or "none"
    return f"no study {study!r} in {catalog.store_name()}; studies there: {known}"


def build_parser() -> argparse.ArgumentParser:
    from experiments.cli import Parser  # imports torch (via the runner): only when run

    parser = Parser(prog="python -m studies.report", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=None,
                        help="a study (MLflow experiment) name, e.g. kl_ablation or "
                             "tune-report_final-cpu-8ep (default: every ablation and tuning "
                             "study; python -m studies list shows them)")
    parser.add_argument("--parent", default=None, metavar="RUN_ID",
                        help="report this parent run's configuration (needs --study)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write to DIR/<study>/ (default: mlruns/reports/<study>/)")
    return parser


def _main(argv: list[str] | None) -> int:
    from experiments.cli import USER_ERRORS, fail, writable_folder
    from experiments.tracking import first_line

    args = build_parser().parse_args(argv)
    if args.parent and not args.study:
        return fail("--parent needs --study")
    if args.out is not None:
        writable_folder(args.out)
    client = catalog.open_store()
    entries = catalog.find(client)
    if args.study:
        chosen = [e for e in entries if e.study == args.study]
        if not chosen:
            return fail(unknown_study(args.study, entries))
    else:
        chosen = [e for e in entries if e.kind != "runs"]
        if not chosen:
            return fail(f"no study parent runs in {catalog.store_name()}; run a study first, "
                        "e.g. python -m studies.kl_ablation")
    failed = False
    for study in dict.fromkeys(e.study for e in chosen):
        mine = [e for e in chosen if e.study == study]
        try:
            if mine[0].kind == "tuning":
                _redraw_tuning(client, mine, parent_run_id=args.parent, out_root=args.out)
                continue
            report = report_study(study, parent_run_id=args.parent, out_root=args.out,
                                  client=client)
        except (LookupError, *USER_ERRORS) as err:  # one line, then the other studies
            failed = bool(fail(first_line(err)))
            continue
        print(report.markdown)
        print(f"{study}: {len(report.files)} files in {report.out_dir}/", flush=True)
    return 2 if failed else 0


def _redraw_tuning(client: Any, entries: list[catalog.Entry], *, parent_run_id: str | None,
                   out_root: str | None) -> None:
    """Each tuning study of the experiment (or the one of ``parent_run_id``), redrawn."""
    from experiments.spec import SpecError
    from studies import tuning  # imports torch (via the runner): only for tuning studies

    if parent_run_id is not None:
        study = entries[0].study
        entries = [e for e in entries if e.parent.info.run_id == parent_run_id]
        if not entries:
            raise SpecError(f"run {parent_run_id} is not a parent run of study {study!r}")
    for entry in entries:
        out, files, notes = tuning.redraw_report(
            client, entry.parent, out_root=Path(out_root) if out_root is not None else None)
        for note in notes:
            print(f"[{entry.name}] note: {note}", flush=True)
        print(f"[{entry.name}] tuning report: {len(files)} files in {out}/ (plots and "
              "trials.csv from its Optuna storage; best_spec.toml as studies.tune wrote it; "
              f"also logged to parent run {entry.parent.info.run_id} under tuning/)",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import guarded  # imports torch (via the runner): only when run

    return guarded(_main)(argv)


if __name__ == "__main__":
    sys.exit(main())
