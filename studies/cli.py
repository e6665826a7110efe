"""The command line every ablation study shares (``python -m studies.<name>``): flags ->
``Grid`` -> run it (here, in packs, or through worker processes) -> report.

A study module declares a ``Study`` (its name, ablation, docstring and defaults) and calls
``run_cli``; everything else is here and in ``studies.grid`` / ``studies.queue``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

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
    parser = Parser(prog=prog, description=study.doc,
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
    return parser


def _check(args: argparse.Namespace) -> None:
    args.storage = storages.given(args.storage)
    if args.pack is not None and args.pack < 1:
        raise SpecError(f"--pack={args.pack} must be >= 1 (1: no packing)")
    if args.jobs is not None and args.jobs < (0 if args.storage else 1):
        raise SpecError(f"--jobs={args.jobs} must be >= {0 if args.storage else 1}")
    if args.worker and not args.storage:
        raise SpecError("--worker takes its pairs from a queue: give --storage URL")


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
        ran = run(grid, args, device)
        if ran is None:
            return 0
        try:
            report = report_study(grid.study, parent_run_id=ran.parent_run_id)
        except LookupError as err:
            return fail(str(err))
        print()
        print(report.markdown)
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
