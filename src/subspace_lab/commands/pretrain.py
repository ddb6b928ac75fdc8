"""`subspace pretrain`: one pretraining run; every `TrainConfig` field is a flag, and `--config`
reads them from a YAML/JSON file. Distributed: `torchrun --nproc_per_node N -m subspace_lab.cli
pretrain ...`. At the end (rank 0) the run's table and plots are written as `compare` writes them."""
from __future__ import annotations

import json
import os
import sys


def add_parser(subparsers) -> None:
    from ..config import TrainConfig

    p = subparsers.add_parser("pretrain", dataclass_types=TrainConfig, description=__doc__,
                              help="pretrain a LLaMA-style model with one optimizer")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..args import train_config
    from ..preflight import preflight, rank_warning
    from ..train import train

    cfg = train_config(args)
    preflight(cfg)
    main_rank = os.environ.get("RANK", "0") == "0"
    warning = rank_warning(cfg, [cfg.optim.method])
    if warning and main_rank:
        print(warning, file=sys.stderr, flush=True)
    result = train(cfg)
    if not main_rank:
        return 0
    from ..report import write_report

    paths = write_report(result.out_dir)
    summary = {"out_dir": result.out_dir, "steps": result.steps,
               "final_val_loss": result.final_val_loss, "final_val_ppl": result.final_val_ppl,
               "optimizer_state_mb": result.optimizer_state_bytes / 2**20,
               "tokens_per_s": result.tokens_per_s, "skipped_steps": result.skipped_steps,
               "report": str(paths["markdown"]),
               "plots": [str(paths["val_loss_plot"]), str(paths["overlap_plot"])]}
    print(json.dumps(summary, indent=1))
    return 0
