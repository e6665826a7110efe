"""The command line every ablation study shares (``python -m studies.<name>``): flags ->
``Grid`` -> run it (here, in packs, or through worker processes) -> report.

A study module declares a ``Study`` (its name, ablation, docstring, the readouts that answer
its question and its defaults) and calls ``run_cli``; everything else is here and in
``studies.grid`` / ``studies.queue``.

Seeds until decided (``--until-decided --max-seeds N [--seed-step K]``): the seeds run in
rounds, the given ``--seeds`` first, then K more at a time (each round a Grid of its seeds run
the usual way: in parallel with ``--jobs`` or ``--pack``, finished runs reused, so a rerun
after an interruption continues the rounds). After each round the study's primary readout of
every arm is tested against the reference with a group-sequential paired t-test
(``studies.summary.sequential_test``: looks at every K seeds up to N, O'Brien-Fleming-type
alpha spending; Lan & DeMets 1983, Jennison & Turnbull 2000 ch. 7), which keeps the chance of
ever calling an arm that does not differ "better" or "worse" at or below 5% however many
rounds run. A decided arm runs no more seeds; the study stops when every comparison is
decided or N seeds have run. The design goes on the parent run as tags
(``studies.results.SequentialDesign``), so ``python -m studies.report`` redraws the same
verdicts.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from dataclasses import dataclass, replace

from experiments.cli import (
    Parser,
    add_common,
    fail,
    guarded,
    pin_threads,
    resolve_profile_and_device,
    seed_arg,
)
from experiments.registry import get_ablation
from experiments.spec import SpecError
from studies import queue
from studies import storage as storages
from studies.grid import Grid, StudyRun, pending, run_here
from studies.results import SEQUENTIAL_TAGS, TAG_READOUTS, SequentialDesign
from studies.summary import READOUT_NAMES, planned_looks


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
    # The readouts (studies.summary.READOUTS) that answer the study's question; the first is
    # its primary readout: ``--until-decided`` tests it, and the report shows it first.
    readouts: tuple[str, ...] = ("final",)

    def __post_init__(self) -> None:
        unknown = [r for r in self.readouts if r not in READOUT_NAMES]
        if not self.readouts or unknown:
            raise ValueError(f"study {self.name}: readouts {list(self.readouts)} must name "
                             f"some of {', '.join(READOUT_NAMES)}")

    @property
    def primary(self) -> str:
        return self.readouts[0]

    def main(self, argv: list[str] | None = None) -> int:
        """``python -m studies.<name>``: this study's command (``run_cli``)."""
        return run_cli(self, argv)


def default_jobs(device: str, runs: int) -> int:
    """Runs at once on this machine: on a CPU one single-threaded process per core (measured
    on 2 cores at the cpu profile: 2 one-thread processes train 1.28x the frames per second
    of one two-thread process: the model's small per-frame operators leave a second thread
    waiting); on a GPU one process (``--pack`` trains several members in it)."""
    if device != "cpu" or runs <= 1:
        return 1
    return max(1, min(queue.cpu_count(), runs))


DEFAULT_PACK_CUDA = 15  # the report's 3 KL arms x 5 seeds in one pack
MEMBER_BYTES = 4.5e9  # GPU memory per packed member at the lab's size, with margin (README)


def default_pack(device: str) -> int:
    """Packs only on CUDA: up to 15 members, fewer when the GPU's free memory is short."""
    if device != "cuda":
        return 1
    import torch

    free, _ = torch.cuda.mem_get_info()
    return max(1, min(DEFAULT_PACK_CUDA, int(0.9 * free // MEMBER_BYTES)))


def build_parser(study: Study, prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=study.doc, epilog=_epilog(study),
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
    _add_queue_flags(parser, study)
    return parser


def _epilog(study: Study) -> str:
    studies = " and ".join([study.name, *(v.study for v in study.variants)])
    return textwrap.fill(
        f"Runs go to the MLflow experiment{'s' * bool(study.variants)} {studies} under one "
        "parent run per configuration; the figures and the summary to "
        "mlruns/reports/<experiment>/ (redraw them with python -m studies.report --study "
        "<experiment>). Rerunning the command reuses finished runs and resumes interrupted "
        "ones (with --until-decided it goes on with its rounds).", 92)


def _add_queue_flags(parser: argparse.ArgumentParser, study: Study) -> None:
    """The rounds of --until-decided, and the several-machines flags."""
    decide = parser.add_argument_group(
        "seeds until decided (a group-sequential test that keeps false positives <= 5%%)")
    decide.add_argument("--until-decided", action="store_true",
                        help="run --seeds, then --seed-step more seeds at a time, testing "
                             f"the primary readout (here: {study.primary}) of every arm "
                             "against the reference after each round; stop when every "
                             "comparison is decided or --max-seeds seeds have run")
    decide.add_argument("--max-seeds", type=int, default=None, metavar="N",
                        help="with --until-decided: the most seeds per arm (>= 2)")
    decide.add_argument("--seed-step", type=int, default=None, metavar="K",
                        help=f"with --until-decided: seeds per round (default {SEED_STEP})")
    several = parser.add_argument_group(
        "several machines (an Optuna study as the work queue; see README)")
    several.add_argument("--storage", default=None, metavar="URL",
                         help="the shared queue: postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB "
                              "(or sqlite:///PATH, PATH.log on one machine; default: "
                              f"${storages.ENV_URL}, or the file ${storages.ENV_FILE}, if set). "
                              "Without --worker: create the MLflow experiment and parent run, "
                              "queue the (arm, seed) pairs, wait for them and write the report")
    several.add_argument("--worker", action="store_true",
                         help="take pairs from --storage's queue until none is left (the "
                              "study's settings come from the queue; set MLFLOW_TRACKING_URI "
                              "to the shared server)")
    several.add_argument("--queue-name", default=None, metavar="NAME",
                         help="the Optuna study holding the queue (default: the study's name)")
    several.add_argument("--no-wait", dest="wait", action="store_false",
                         help="with --storage: return once the pairs are queued")
    storages.add_flags(several)


SEED_STEP = 2  # seeds per round of --until-decided


def _check(args: argparse.Namespace) -> None:
    args.storage = storages.given(args.storage)
    if args.pack is not None and args.pack < 1:
        raise SpecError(f"--pack={args.pack} must be >= 1 (1: no packing)")
    if args.jobs is not None and args.jobs < (0 if args.storage else 1):
        raise SpecError(f"--jobs={args.jobs} must be >= {0 if args.storage else 1}")
    if args.worker and not args.storage:
        raise SpecError("--worker takes its pairs from a queue: give --storage URL")
    _check_sequential(args)


def _check_sequential(args: argparse.Namespace) -> None:
    if not args.until_decided:
        given = [f for f, v in (("--max-seeds", args.max_seeds), ("--seed-step", args.seed_step))
                 if v is not None]
        if given:
            raise SpecError(f"{' and '.join(given)}: only with --until-decided")
        return
    if args.max_seeds is None:
        raise SpecError("--until-decided needs --max-seeds N: the most seeds per arm")
    if args.max_seeds < 2:
        raise SpecError(f"--max-seeds={args.max_seeds} must be >= 2 (a paired test needs 2)")
    if args.seed_step is not None and args.seed_step < 1:
        raise SpecError(f"--seed-step={args.seed_step} must be >= 1")
    if len(set(args.seeds)) > args.max_seeds:
        raise SpecError(f"--seeds gives {len(set(args.seeds))} seeds, more than --max-seeds "
                        f"{args.max_seeds}")
    if args.worker or (args.storage and not args.wait):
        raise SpecError("--until-decided runs its rounds from the command that waits for them "
                        "(not with --worker or --no-wait)")


def _variant(study: Study, args: argparse.Namespace) -> tuple[str, str]:
    """(study name, ablation): a variant flag picks another ablation, filed as another study."""
    for variant in study.variants:
        if getattr(args, variant.flag.lstrip("-").replace("-", "_")):
            return variant.study, variant.ablation
    return study.name, study.ablation


def make_grid(study: Study, args: argparse.Namespace, profile: str) -> Grid:
    """The grid the flags ask for."""
    name, ablation = _variant(study, args)
    return Grid(name, get_ablation(ablation), tuple(args.seeds), profile,
                arms=tuple(args.arms or ()), epochs=args.epochs, data=args.data, doc=study.doc)


def run(grid: Grid, args: argparse.Namespace, device: str) -> StudyRun | None:
    """The grid through the queue (``--storage``, or several jobs here) or in this process."""
    beats = storages.Beats(args.heartbeat, args.grace)
    if args.storage:
        return queue.run_queued(grid, queue.Queueing(args.storage, args.queue_name, args.wait,
                                                     beats), device=device, jobs=args.jobs or 0)
    todo = pending(grid)
    pack = args.pack if args.pack is not None else default_pack(device)
    jobs = args.jobs if args.jobs is not None else (
        1 if pack > 1 else default_jobs(device, todo))
    if jobs > 1 and pack > 1:
        raise SpecError(f"--jobs {jobs} and --pack {pack}: choose one (packs train in this "
                        "process)")
    if jobs > 1 and todo > 1:
        return queue.run_queued(grid, queue.Queueing(beats=beats), device=device,
                                jobs=min(jobs, todo))
    pin_threads(args.threads)
    return run_here(grid, device=device, pack=pack)


# ---------------------------------------------------------------------------------------------
# Seeds until decided
# ---------------------------------------------------------------------------------------------
def record_design(parent_run_id: str, study: Study, design: SequentialDesign | None) -> None:
    """The parent run's tags for the report: the readouts that answer the study's question,
    and the sequential design of a study run until decided (a study run with fixed seeds
    drops an earlier one: its report reads every seed of the configuration at once)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_tag(parent_run_id, TAG_READOUTS, ",".join(study.readouts))
    tags = client.get_run(parent_run_id).data.tags
    if design is not None:
        for key, value in design.tags().items():
            client.set_tag(parent_run_id, key, value)
        return
    for key in SEQUENTIAL_TAGS:
        if key in tags:
            client.delete_tag(parent_run_id, key)


def verdicts(study: str, parent_run_id: str) -> dict[str, str]:
    """The sequential verdict of the design recorded on the parent (``record_design``) for
    each arm, or each group when groups hold several arms (name -> verdict), the reference
    left out: the primary readout's verdicts as the report reads them."""
    from studies import summary
    from studies.report import boundaries_of, summary_metrics, table_group_of
    from studies.results import load_study

    results = load_study(study, parent_run_id=parent_run_id, per_frame=False)
    meta = results.meta
    by = "group" if meta.grouped else "arm"
    reference = table_group_of(results, meta.reference) if meta.grouped else meta.reference
    readout = [r for r in summary.READOUTS if r.name == meta.sequential.readout]
    table = summary.summarize_readouts(
        summary_metrics(results), reference=reference, by=by,
        order=meta.groups if meta.grouped else meta.arms, boundaries=boundaries_of(meta),
        readouts=readout)
    return {str(r[by]): r["verdict"] for _, r in table.iterrows()
            if r["verdict"] != "reference"}


def _decided(verdict: str) -> bool:
    return verdict in ("better", "worse")


def _round_line(number: int, grid: Grid, seeds: list[int], max_seeds: int,
                found: dict[str, str]) -> str:
    decided = [f"{name} {verdict}" for name, verdict in found.items() if _decided(verdict)]
    undecided = [name for name, verdict in found.items() if not _decided(verdict)]
    arms = "" if not grid.arms else f" of {', '.join(grid.arms)}"
    return (f"round {number}: seeds {' '.join(map(str, grid.seeds))}{arms} ({len(seeds)} of "
            f"at most {max_seeds}); decided: {', '.join(decided) or 'none'}; undecided: "
            f"{', '.join(undecided) or 'none'}")


def _next_round(grid: Grid, seeds: list[int], step: int, max_seeds: int,
                found: dict[str, str]) -> Grid:
    """The next round: ``step`` new seeds (at most up to ``max_seeds`` in all) of the
    reference (its group's arms) and of the arms (groups) not yet decided: a decided
    comparison keeps its decision, so its arm runs no more seeds."""
    undecided = {name for name, verdict in found.items() if not _decided(verdict)}
    reference = grid.arm(grid.ablation.reference)
    arms = [a.name for a in grid.chosen
            if a.group == reference.group or a.name in undecided or a.group in undecided]
    start = max(seeds) + 1
    return replace(grid, seeds=tuple(range(start, start + min(step, max_seeds - len(seeds)))),
                   arms=tuple(arms) if len(arms) < len(grid.chosen) else grid.arms)


def run_until_decided(study: Study, grid: Grid, args: argparse.Namespace,
                      device: str) -> StudyRun:
    """Rounds of seeds (``grid.seeds`` first, then ``--seed-step`` more) through ``run``,
    each followed by the group-sequential test of the study's primary readout (module
    docstring), until every comparison is decided or ``--max-seeds`` seeds have run."""
    if grid.ablation.reference not in {a.name for a in grid.chosen}:
        raise SpecError(f"--until-decided compares every arm with the reference arm "
                        f"{grid.ablation.reference}: keep it in --arms")
    step = args.seed_step or SEED_STEP
    looks = tuple(planned_looks(args.max_seeds, seed_step=step))
    seeds, this_round, failures = list(grid.seeds), grid, []
    for number in range(1, args.max_seeds + 1):
        ran = run(this_round, args, device)
        failures += ran.failures
        design = SequentialDesign(study.primary, looks, args.max_seeds, tuple(seeds))
        record_design(ran.parent_run_id, study, design)
        found = verdicts(grid.study, ran.parent_run_id)
        print(_round_line(number, this_round, seeds, args.max_seeds, found), flush=True)
        if all(_decided(v) for v in found.values()) or len(seeds) >= args.max_seeds:
            break
        this_round = _next_round(grid, seeds, step, args.max_seeds, found)
        seeds += this_round.seeds
    ran.failures = failures
    return ran


def run_cli(study: Study, argv: list[str] | None = None) -> int:
    """``python -m studies.<name>``: run the study, write its report, print its summary."""
    from studies.report import report_study

    @guarded
    def main(argv: list[str] | None) -> int:
        args = build_parser(study, f"python -m studies.{study.name}").parse_args(argv)
        _check(args)
        if args.worker:
            name = args.queue_name or _variant(study, args)[0]  # the rest comes from the queue
            worker = queue.run_worker(args.storage, name, device=args.device,
                                      beats=storages.Beats(args.heartbeat, args.grace))
            return 1 if worker.failed else 0
        profile, device = resolve_profile_and_device(args)
        grid = make_grid(study, args, profile)
        started = time.monotonic()
        ran = run_until_decided(study, grid, args, device) if args.until_decided \
            else run(grid, args, device)
        if ran is None:
            return 0
        if not args.until_decided:
            record_design(ran.parent_run_id, study, None)
        try:
            report = report_study(grid.study, parent_run_id=ran.parent_run_id)
        except LookupError as err:
            return fail(str(err))
        print()
        print(report.terminal)
        print(f"report: {len(report.files)} files in {report.out_dir}/ (also logged to parent "
              f"run {ran.parent_run_id} under report/); redraw with: "
              f"python -m studies.report --study {grid.study}", flush=True)
        print(f"wall time: {time.monotonic() - started:.0f} s", flush=True)
        if ran.failures:
            print(f"{len(ran.failures)} run(s) failed:\n  " + "\n  ".join(ran.failures),
                  file=sys.stderr)
            return 1
        return 0

    return main(argv)
