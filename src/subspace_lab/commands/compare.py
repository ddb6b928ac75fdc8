"""`subspace compare`: several optimizers, same data / seed / token budget / init. With no flags,
the project's main job (see `subspace_lab.compare`): KJV, tiny LLaMA, AdamW vs GaLore vs I3S."""
from __future__ import annotations

import shlex
import sys

_SET_PER_RUN = ("method", "seed", "resume")  # compare sets these itself (--optimizers, --seeds)


def add_parser(subparsers) -> None:
    from ..compare import DEFAULT_LRS, DEFAULT_OPTIMIZERS, default_compare_config
    from ..config import TrainConfig
    from ..optimizers import METHODS

    p = subparsers.add_parser("compare", dataclass_types=TrainConfig, description=__doc__,
                              base=default_compare_config(),
                              help="compare optimizers on the same budget")
    p.hide(*_SET_PER_RUN)
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                   help="comma list of optimizer names, from: " + ", ".join(METHODS))
    p.add_argument("--lrs", default=None,
                   help="per-optimizer peak lr, e.g. adamw=3e-3,galore=1e-2; several lrs "
                        "separated by ':' sweep them, e.g. galore=5e-3:1e-2:2e-2 (defaults: "
                        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LRS.items())
                        + "; an explicit --lr replaces these defaults)")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    for action in p._actions:  # compare's own words for two shared flags
        if action.dest == "lr":
            action.help = "one peak learning rate for every optimizer without an entry in --lrs"
        elif action.dest == "steps":
            action.help = ("optimizer steps of every run (--tokens alone sets them from a token "
                           "budget instead)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..args import train_config
    from ..compare import DEFAULT_LRS, parse_lrs, print_summary, run_compare
    from ..optimizers import check_method
    from ..preflight import rank_warning

    given = args.given_keys
    for key, instead in zip(_SET_PER_RUN, ("--optimizers", "--seeds", "nothing: compare starts "
                                           "fresh runs")):
        if key in given:
            raise ValueError(f"compare sets {key} per run; use {instead}")
    cfg = train_config(args)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds expects a comma list of integers, got {args.seeds!r}") from None
    if not optimizers or not seeds:
        raise ValueError("--optimizers and --seeds must not be empty")
    for name in optimizers:
        check_method(name)
    lrs = parse_lrs(args.lrs)
    unknown = sorted(set(lrs) - set(optimizers))
    if unknown:
        raise ValueError(f"--lrs names {unknown}, which are not in --optimizers {optimizers}")
    for name in optimizers:  # --lrs, else an explicit --lr, else the per-method default
        lrs.setdefault(name, [cfg.optim.lr] if "lr" in given
                       else [DEFAULT_LRS.get(name, cfg.optim.lr)])
    warning = rank_warning(cfg, optimizers)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    command = shlex.join(["subspace", *getattr(args, "argv", ["compare"])])
    paths = run_compare(cfg, optimizers, lrs, seeds, cfg.out_dir, command)
    print_summary(paths)
    return 0
