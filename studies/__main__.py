"""The studies in the tracking store.

    python -m studies list               # every ablation study, tuning study and group of runs
    python -m studies list 'kl_*'        # those whose experiment name matches a glob

For each: its kind (ablation | tuning | runs), MLflow experiment, and per configuration (an
ablation's parent run, one per profile and epochs; a tuning study's parent run): profile,
epochs, arms (a tuning study: its spec), seeds, its runs by state (finished, running,
interrupted, failed; a tuning study's trials: complete, pruned, failed, running), the last
update and the report's folder. Reads the store ``MLFLOW_TRACKING_URI`` names (default
``sqlite:///mlruns/mlflow.db``); the last line says how to open it in the MLflow UI.
"""

from __future__ import annotations

import argparse
import sys

from experiments.cli import Parser, guarded
from experiments.spec import SpecError
from studies import catalog


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m studies", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list}",
                                parser_class=Parser)
    p_list = sub.add_parser("list", help="every study in the tracking store, with its state")
    p_list.add_argument("pattern", nargs="?", default="*",
                        help="glob filter on the study (experiment) name, e.g. 'kl_*'")
    return parser


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = catalog.open_store()
    entries = catalog.find(client, pattern=args.pattern)
    if not entries:
        matching = "" if args.pattern == "*" else f" matching {args.pattern!r}"
        raise SpecError(f"no studies{matching} in {catalog.store_name()}; run one first, "
                        "e.g. python -m studies.kl_ablation")
    print(catalog.listing(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
