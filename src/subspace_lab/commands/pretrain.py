"""`subspace pretrain`: one pretraining run; every `TrainConfig` field is a flag.
Distributed: `torchrun --nproc_per_node N -m subspace_lab.cli pretrain ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> None:
    from ..config import add_config_args

    p = subparsers.add_parser("pretrain", help="pretrain a LLaMA-style model with one optimizer",
                              description=__doc__)
    add_config_args(p)
    p.add_argument("--accumulate", dest="grad_accum", type=int, metavar="INT", default=argparse.SUPPRESS,
                   help="alias of --grad-accum (with --step-in-backward: accumulation in the subspace)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import config_from_args
    from ..preflight import preflight, rank_warning
    from ..train import train

    cfg = config_from_args(args)
    preflight(cfg)
    main_rank = os.environ.get("RANK", "0") == "0"
    warning = rank_warning(cfg, [cfg.optim.name])
    if warning and main_rank:
        print(warning, file=sys.stderr, flush=True)
    result = train(cfg)
    summary = {"out_dir": result.out_dir, "steps": result.steps,
               "final_val_loss": result.final_val_loss, "final_val_ppl": result.final_val_ppl,
               "optimizer_state_mb": result.optimizer_state_bytes / 2**20,
               "tokens_per_s": result.tokens_per_s, "skipped_steps": result.skipped_steps}
    if main_rank:
        print(json.dumps(summary, indent=1))
    return 0
