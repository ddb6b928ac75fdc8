"""`subspace compare`: several optimizers, same data / seed / token budget / init. With no flags,
the project's main job (see `subspace_lab.compare`): KJV, tiny LLaMA, AdamW vs GaLore vs I3S."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    from ..compare import DEFAULT_LRS, DEFAULT_OPTIMIZERS, default_compare_config
    from ..config import add_config_args, optimizer_names

    p = subparsers.add_parser("compare", help="compare optimizers on the same budget",
                              description=__doc__)
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                   help="comma list of optimizer names, from: " + ", ".join(optimizer_names())
                   + " (default: %(default)s)")
    p.add_argument("--lrs", default=None,
                   help="per-optimizer peak lr, e.g. adamw=3e-3,galore=1e-2; several lrs "
                        "separated by ':' sweep them, e.g. galore=5e-3:1e-2:2e-2 (defaults: "
                        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LRS.items()) + "; an explicit --lr replaces these defaults)")
    p.add_argument("--seeds", default="0", help="comma list of seeds (default: %(default)s)")
    add_config_args(p, exclude=("optimizer", "seed", "resume"), defaults=default_compare_config(),
                    helps={"optim.lr": "one peak learning rate for every optimizer without an "
                                       "entry in --lrs",
                           "steps": "optimizer steps of every run (--tokens alone sets them "
                                    "from a token budget instead)"})
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compare import default_compare_config, parse_lrs, print_summary, run_compare
    from ..config import config_from_args
    from ..preflight import rank_warning

    cfg = config_from_args(args, base=default_compare_config())
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds expects a comma list of integers, got {args.seeds!r}") from None
    if not optimizers or not seeds:
        raise ValueError("--optimizers and --seeds must not be empty")
    import shlex
    command = shlex.join(["subspace", *getattr(args, "argv", ["compare"])])
    from ..compare import DEFAULT_LRS, check_optimizers
    check_optimizers(optimizers)
    lrs = parse_lrs(args.lrs)
    unknown = sorted(set(lrs) - set(optimizers))
    if unknown:
        raise ValueError(f"--lrs names {unknown}, which are not in --optimizers {optimizers}")
    for name in optimizers:  # --lrs, else an explicit --lr, else the per-method default
        lrs.setdefault(name, [cfg.optim.lr] if "optim.lr" in vars(args)
                       else [DEFAULT_LRS.get(name, cfg.optim.lr)])
    warning = rank_warning(cfg, optimizers)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    paths = run_compare(cfg, optimizers, lrs, seeds, cfg.out_dir, command)
    print_summary(paths)
    return 0
