"""Subcommands of `subspace`: module names under this package, each with `add_parser(subparsers)`."""
COMMANDS: tuple[str, ...] = ("pretrain", "compare", "report", "finetune")
