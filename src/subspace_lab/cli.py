"""The `subspace` command. Each subcommand lives in `subspace_lab/commands/<name>.py` and exposes
`add_parser(subparsers)`, which registers its parser (a `LabArgumentParser` over the command's
config dataclass) and sets `func(args) -> int`. Adding a subcommand (bench, ...) is a new module
plus its name in `commands.COMMANDS`.
Bad input and environment failures (a flag or value the parser refuses, `ValueError`, `OSError`:
a missing file, a full disk) end in one line on stderr and exit code 2; a non-finite loss under
`--nonfinite error` exits 3."""
from __future__ import annotations

import importlib
import sys

from .args import LabArgumentParser, UsageError
from .commands import COMMANDS


def build_parser() -> LabArgumentParser:
    parser = LabArgumentParser(
        prog="subspace", description="Train and compare memory-efficient subspace optimizers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"subspace_lab.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {_one_line(e)} (see {e.prog} --help)", file=sys.stderr)
        return 2
    args.argv = argv  # the exact command, recorded in run directories
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # bad input or a failing disk: one line, no traceback
        print(f"subspace {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .train import NonFiniteLossError
        if not isinstance(e, NonFiniteLossError):
            raise
        print(f"subspace {args.command}: error: {e}", file=sys.stderr)
        return 3


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
