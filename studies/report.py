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
- ``summary_readouts.csv`` (+ ``summary_readouts_groups.csv``): every readout of
  ``studies.summary.READOUTS`` (final, best and mean val PSNR over training, epochs to the
  copy-first floor + 1 dB, mean train loss) with the same statistics, one row per readout and
  arm; ``summary.md`` has a section per readout, the study's own (tag ``readouts`` of the
  parent run: its primary first) first. A study run until decided (its parent carries the
  ``sequential_*`` tags) reads every verdict with its group-sequential boundaries, so this
  redraw agrees with the report the study wrote when it stopped
- ``beta.png`` (Fig. 1), ``teacher_forcing.png`` (Fig. 2), ``train_loss.png``, ``val_loss.png``,
  ``val_psnr.png`` (Table 1 / Fig. 3: mean ± 1 sd across seeds), ``psnr_per_frame.png``
  (Fig. 4, with the copy-first-frame floor), ``filmstrip.png`` (ground truth vs each arm)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from studies import catalog, plots, summary
from studies.results import (
    REPORTS,
    StudyMeta,
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
    readouts: pd.DataFrame | None = None  # summary_readouts.csv: every readout, per arm
    group_readouts: pd.DataFrame | None = None
    markdown: str = ""
    terminal: str = ""  # the short form the study commands print (fits 100 columns)


def _subtitle(results: StudyResults) -> str:
    """'study S · profile P · 2 seeds (0, 1)': each figure adds a line saying what its band
    is."""
    meta = results.meta
    parts = [f"study {meta.study}", f"profile {meta.profile or '?'}",
             plots.describe_seeds(meta.seeds)]
    return " · ".join(parts)


def ordered_readouts(meta: StudyMeta) -> list[summary.Readout]:
    """Every readout, those that answer the study's question first (its primary first)."""
    by_name = {r.name: r for r in summary.READOUTS}
    first = [by_name[name] for name in meta.readouts if name in by_name]
    return first + [r for r in summary.READOUTS if r not in first]


def boundaries_of(meta: StudyMeta) -> summary.SequentialBoundaries | None:
    """The group-sequential boundaries of a study run until decided (from its parent's
    tags), None for a study with fixed seeds."""
    design = meta.sequential
    if design is None:
        return None
    return summary.sequential_boundaries(design.looks, design.max_seeds)


def summary_metrics(results: StudyResults) -> pd.DataFrame:
    """The metrics the summary reads: a study run until decided counts the seeds its rounds
    ran (a seed of the same configuration run otherwise is not one of its looks)."""
    design = results.meta.sequential
    if design is None:
        return results.metrics
    return results.metrics[results.metrics["seed"].isin(design.seeds)]


def _design_text(meta: StudyMeta) -> str:
    design = meta.sequential
    boundaries = boundaries_of(meta)
    if design is None or boundaries is None:
        return ""
    looks = ", ".join(map(str, design.looks))
    levels = ", ".join(f"{level:.4f}" for level in boundaries.nominal)
    left_out = sorted(set(meta.seeds) - set(design.seeds))
    return (
        f"Seeds until decided (`--until-decided`): after each round of seeds the study tested "
        f"`{design.readout}` of every arm against `{meta.reference}` with a group-sequential "
        f"paired t-test, looks at {looks} of at most {design.max_seeds} seeds; an arm ran no "
        "more seeds once decided, and the study stopped when every comparison was decided or "
        "the last look was taken. The levels come from O'Brien-Fleming-type alpha "
        "spending (Lan & DeMets 1983; Jennison & Turnbull 2000, ch. 7): look k rejects when "
        f"the paired p-value is at most α(t_k) − α(t_(k−1)) ({levels}), so the chance of "
        "ever calling an arm that does not differ \"better\" or \"worse\" stays at or below "
        f"{boundaries.alpha:.0%}. Every verdict below is read the same way (each readout on "
        "its own): \"decided at N seeds\" names the look that decided it; an undecided one "
        "gives the seeds a difference of its observed size would need at 80% power (the "
        "fixed-seed count: the sequential test needs somewhat more). Seeds the rounds ran: "
        f"{' '.join(map(str, design.seeds))}"
        + (f" (seeds {' '.join(map(str, left_out))} of this configuration, run otherwise, are "
           "not in the summary)." if left_out else "."))


def _readout_sections(table: pd.DataFrame, meta: StudyMeta, *, reference: str) -> list[str]:
    """One section per readout, those that answer the study's question first."""
    sections = []
    for rank, readout in enumerate(ordered_readouts(meta)):
        text = summary.readouts_to_markdown(table, reference=reference, readouts=[readout])
        if not text:
            continue
        answers = readout.name in meta.readouts
        role = (" (primary: the readout the study's question turns on)" if rank == 0 and
                answers else " (answers the study's question)" if answers else "")
        sections += [f"### `{readout.name}`{role}", "", text, ""]
    return sections


_OTHERS = len(summary.READOUTS) - 1  # readouts besides the primary, none corrected for it
READOUTS_INTRO = (
    "Each readout is read off each run's curves, then given as mean ± sd over seeds with a "
    f"{summary.CONFIDENCE:.0%} t-interval, and Δ against the reference with the interval its "
    "verdict read (paired by seed). summary_readouts.csv holds them as one long table. Each "
    f"verdict keeps its {summary.ALPHA:.0%} false-positive rate for its own readout only: the "
    "study's question is decided on its primary readout, and an arm that does not differ from "
    f"the reference still has a {summary.ALPHA:.0%} chance of a \"better\" or \"worse\" on "
    f"each of the {_OTHERS} others (up to {1 - (1 - summary.ALPHA) ** _OTHERS:.0%} for one of "
    "them). Read a verdict on any readout but the primary one as a lead to test again on new "
    "seeds, not as a finding.")


def summary_markdown(results: StudyResults, report: Report) -> str:
    """``summary.md``: the final and best val PSNR table, then a section per readout (the
    study's own readouts first), the runs left out, and the same by group."""
    meta = results.meta
    lines = [f"# {meta.study}: summary", ""]
    about = [f"Ablation `{meta.ablation}`" if meta.ablation else "",
             f"scientific hyperparameter: {meta.scientific}" if meta.scientific else "",
             f"profile `{meta.profile}`", plots.describe_seeds(meta.seeds)]
    lines += ["; ".join(a for a in about if a) + ".", ""]
    answering = ", ".join(f"`{r}`" for r in meta.readouts)
    lines += [f"Readouts that answer this study's question: {answering} (primary first).", ""]
    if meta.sequential is not None:
        lines += [_design_text(meta), ""]
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
    lines += [method, "", summary.to_markdown(report.summary, reference=meta.reference)]
    if results.unfinished:
        left_out = "; ".join(
            f"`{r.data.tags.get('arm', r.info.run_name)}` seed {r.data.tags.get('seed', '?')}: "
            f"{r.info.status}" + (f" ({r.data.tags['stop_reason']})"
                                  if r.data.tags.get("stop_reason") else "")
            for r in results.unfinished)
        lines += ["", f"Not in the table (no FINISHED run of this arm and seed): {left_out}."]
    lines += ["", "## Readouts", "", READOUTS_INTRO, ""]
    lines += _readout_sections(report.readouts, meta, reference=meta.reference)
    if report.group_summary is not None:
        reference_group = table_group_of(results, meta.reference)
        heading = (f"## By group (each seed's runs averaged over the group's arms: the seeds "
                   f"are the replicates; reference group `{reference_group}`)")
        lines += [heading, "", summary.to_markdown(report.group_summary,
                                                   reference=reference_group), ""]
        lines += _readout_sections(report.group_readouts, meta, reference=reference_group)
    return "\n".join(lines).rstrip() + "\n"


def terminal_summary(report: Report, meta: StudyMeta, *, reference: str,
                     width: int = 100) -> str:
    """What a study command prints: each readout that answers the study's question (its
    primary first) in ``to_terminal``'s short form, by group (against ``reference``, the
    reference group) when groups hold several arms, and where the full tables are."""
    table = report.group_readouts if report.group_readouts is not None else report.readouts
    lines = [f"{meta.study}: profile {meta.profile}, {plots.describe_seeds(meta.seeds)}"]
    if meta.sequential is not None:
        design = meta.sequential
        lines += textwrap.wrap(
            f"seeds until decided: `{design.readout}` tested at "
            f"{', '.join(map(str, design.looks))} of at most {design.max_seeds} seeds "
            "(group-sequential, O'Brien-Fleming-type alpha spending)", width,
            break_on_hyphens=False)
    by_name = {r.name: r for r in summary.READOUTS}
    for name in meta.readouts:
        rows = summary.readout_rows(table, name)
        if name in by_name and not rows.empty:
            lines += ["", summary.to_terminal(rows, reference=reference, width=width,
                                              readout=by_name[name])]
    lines += ["", "full tables (every readout, Welch intervals, best PSNR, runs left out):",
              f"  {report.out_dir / 'summary.md'}"]
    return "\n".join(lines)


def table_group_of(results: StudyResults, arm: str) -> str:
    groups = results.metrics.loc[results.metrics["arm"] == arm, "group"]
    return str(groups.iloc[0]) if len(groups) else arm


def write_summary(results: StudyResults, out: Path, report: Report) -> None:
    """``summary.csv`` (final and best val PSNR per arm), ``summary_readouts.csv`` (every
    readout, one row per readout and arm), their ``_groups`` forms when groups hold several
    arms, ``summary.md``, and the terminal form. A study run until decided reads its
    verdicts with its sequential design's boundaries (``boundaries_of``)."""
    meta = results.meta
    metrics, boundaries = summary_metrics(results), boundaries_of(meta)
    readouts = ordered_readouts(meta)
    by = {"arm": (meta.reference, meta.arms)}
    if meta.grouped:
        by["group"] = (table_group_of(results, meta.reference), meta.groups)
    tables = {}
    for column, (reference, order) in by.items():
        options = {"reference": reference, "by": column, "order": order,
                   "boundaries": boundaries}
        suffix = "_groups" if column == "group" else ""
        tables[f"summary{suffix}.csv"] = summary.summarize(metrics, **options)
        tables[f"summary_readouts{suffix}.csv"] = summary.summarize_readouts(
            metrics, readouts=readouts, **options)
    for name, table in tables.items():
        table.to_csv(out / name, index=not name.startswith("summary_readouts"))
        report.files.append(out / name)
    report.summary, report.readouts = tables["summary.csv"], tables["summary_readouts.csv"]
    report.group_summary = tables.get("summary_groups.csv")
    report.group_readouts = tables.get("summary_readouts_groups.csv")
    report.markdown = summary_markdown(results, report)
    (out / "summary.md").write_text(report.markdown)
    report.files.append(out / "summary.md")
    report.terminal = terminal_summary(report, meta,
                                       reference=by["group" if meta.grouped else "arm"][0])


def write_figures(results: StudyResults, out_dir: Path, *, client: Any) -> list[Path]:
    """Every standard figure of the study into ``out_dir``. A metric with one value for every
    run and epoch (the KL study's teacher-forcing ratio: 0) gets no figure: a line on stdout
    says so, and an earlier drawing of it is removed."""
    meta, metrics = results.meta, results.metrics
    lines = plots.Lines("group", meta.groups) if meta.grouped else plots.Lines("arm", meta.arms)
    by_arm = plots.Lines("arm", meta.arms, *(("group", meta.groups) if meta.grouped else ()))
    floor = metrics.loc[metrics["metric"] == "val/psnr_copy_first", "value"]
    subtitle = _subtitle(results)
    figures = {  # file: what to draw, and its lines
        "beta.png": (plots.Curve("train/beta", "KL weight β per epoch (report Fig. 1)",
                                 "β (KL weight)", subtitle,
                                 note="β at each epoch's last batch"), by_arm),
        "teacher_forcing.png": (plots.Curve(
            "train/tfr", "Teacher-forcing ratio per epoch (report Fig. 2)",
            "teacher-forcing ratio (probability)", subtitle, ylim=(-0.04, 1.04)), lines),
        "train_loss.png": (plots.Curve(
            "train/loss", "Training loss per epoch (report Table 1 / Fig. 3)",
            r"train loss per clip: $\sum_t$ (MSE + β·KL)", subtitle, log_y=True), lines),
        "val_loss.png": (plots.Curve(
            "val/loss", "Validation loss per epoch (report Table 1 / Fig. 3)",
            "val loss: per-frame MSE, pixels in [0, 1]", subtitle, log_y=True), lines),
        "val_psnr.png": (plots.Curve(
            "val/psnr", "Validation PSNR per epoch (closed-loop generation, z from the prior)",
            "val PSNR (dB), mean over frames", subtitle,
            floor=float(floor.mean()) if len(floor) else None), lines),
    }
    files = []
    available = set(metrics["metric"])
    for name, (curve, curve_lines) in figures.items():
        if curve.metric not in available:
            continue
        flat = plots.flat_note(metrics, curve.metric)
        if flat is not None:
            (out_dir / name).unlink(missing_ok=True)
            print(f"{meta.study}: no {name}: {flat}", flush=True)
            continue
        files.append(plots.epoch_curve(metrics, curve, curve_lines, path=out_dir / name))
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

    write_summary(results, out, report)

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
