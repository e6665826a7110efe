"""Specs and single runs from the command line.

    python -m experiments list [PATTERN]
    python -m experiments show NAME|FILE.toml [--profile P] [--set key=value ...]
    python -m experiments run NAME|FILE.toml [--seeds 0 1 2] [--set key=value ...]
                              [--profile P] [--device cpu|cuda|mps] [--data PATH]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from cvae.train import NonFiniteLossError
from experiments.cli import (
    Parser,
    add_common,
    guarded,
    pin_threads,
    resolve_profile_and_device,
    seed_arg,
)
from experiments.registry import ABLATIONS, PROFILES, SPECS, list_specs, resolve
from experiments.runner import RunContext, run_experiment
from experiments.spec import ExperimentSpec, SpecError, flatten, parse_set, spec_hash, to_json
from experiments.tracking import RunBusyError, mask_secrets


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,show,run}")

    p_list = sub.add_parser("list", help="registered specs and ablations")
    p_list.add_argument("pattern", nargs="?", default="*", help="glob filter, e.g. 'kl_*'")

    p_show = sub.add_parser("show", help="the resolved spec as JSON")
    p_show.add_argument("spec", help="a registered name or a .toml file")
    p_show.add_argument("--profile", choices=PROFILES, default=None,
                        help="resolve under this profile (default: the spec as registered)")
    p_show.add_argument("--epochs", type=int, default=None, help="override the epochs")
    p_show.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a field, e.g. optim.lr=3e-4")

    p_run = sub.add_parser("run", help="train and record runs in MLflow")
    p_run.add_argument("spec", help="a registered name or a .toml file")
    p_run.add_argument("--seeds", type=seed_arg, nargs="+", default=[0], help="default: 0")
    p_run.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a field, e.g. optim.lr=3e-4")
    p_run.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    p_run.add_argument("--study", default="runs",
                       help="MLflow experiment to file the runs in (default: runs)")
    add_common(p_run)
    return parser


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        names = list_specs(args.pattern)
        if not names:
            raise SpecError(f"no registered spec matches {args.pattern!r}; registered: "
                            f"{', '.join(list_specs())}")
        width = max((len(n) for n in names), default=0)
        for name in names:
            print(f"{name:<{width}}  {SPECS[name].description}")
        print("\nablations:")
        for ablation in ABLATIONS.values():
            print(f"  {ablation.name}: {', '.join(a.name for a in ablation.arms)}")
        return 0
    if args.command == "show":
        overrides = parse_set(args.overrides)
        spec = resolve(args.spec, profile=args.profile, epochs=args.epochs, overrides=overrides)
        print(to_json(spec))
        print(f"spec_hash: {spec_hash(spec)}", file=sys.stderr)
        if args.profile is not None or args.epochs is not None:
            chosen = flatten(resolve(args.spec, profile=None, overrides=overrides))
            changed = [f"{k}={v} (spec: {chosen[k]})" for k, v in flatten(spec).items()
                       if chosen.get(k) != v and k != "description"]
            print(f"set by the profile {args.profile or 'full'}"
                  + (f" and --epochs {args.epochs}" if args.epochs is not None else "")
                  + f": {', '.join(changed) or 'nothing'}", file=sys.stderr)
        return 0

    pin_threads(args.threads)
    profile, device = resolve_profile_and_device(args)
    base = resolve(args.spec, profile=profile, epochs=args.epochs, data=args.data,
                   overrides=parse_set(args.overrides))
    return run_seeds(base, args.seeds, context=RunContext(study=args.study, profile=profile),
                     device=device)


def run_seeds(base: ExperimentSpec, seeds: list[int], *, context: RunContext,
              device: str) -> int:
    """Each seed runs whatever the others did: one line per seed; exit code 2 if another
    process trains one of them (refused), else 1 if one diverged (its run is FAILED), else 0."""
    failed = refused = 0
    for seed in seeds:
        spec = replace(base, seed=seed)
        try:
            outcome = run_experiment(spec, context=context, device=device)
        except NonFiniteLossError as err:
            epoch = "" if err.epoch is None else f" at epoch {err.epoch}"
            print(f"run {spec.name} seed {seed} FAILED{epoch}: non-finite loss "
                  f"(lr {short_number(spec.optim.lr)}); try a lower learning rate", flush=True)
            failed += 1
            continue
        except RunBusyError as err:
            print(f"error: {mask_secrets(str(err))}", file=sys.stderr, flush=True)
            refused += 1
            continue
        psnr = outcome.metrics.get("val/psnr", float("nan"))
        print(f"{spec.name} seed {seed}: run {outcome.run_id} {outcome.status} "
              f"val/psnr {psnr:.2f} dB", flush=True)
        failed += outcome.status != "FINISHED"
    return 2 if refused else 1 if failed else 0


def short_number(value: float) -> str:
    """1e9 -> '1e9', 0.0003 -> '0.0003' (``g`` format without its exponent padding)."""
    return f"{value:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


if __name__ == "__main__":
    sys.exit(main())
