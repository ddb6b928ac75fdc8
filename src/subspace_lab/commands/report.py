"""`subspace report DIR`: redraw the tables and plots of a run or comparison directory from its
JSON-lines files (nothing is retrained)."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="redraw tables and plots from a run directory",
                              description=__doc__)
    p.add_argument("dir", help="a run directory or a comparison directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compare import print_summary
    from ..report import write_report

    print_summary(write_report(args.dir))
    return 0
