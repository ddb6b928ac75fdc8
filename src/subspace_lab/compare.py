"""Compare optimizers under the same work: same data, order, token budget, init, schedule shape,
clipping, parameter routing, rank and refresh gap; only the method and its learning rate differ.

The default (`subspace compare` with no flags) is the project's main job: the embedded King James
Bible, the `tiny` LLaMA (1.9M params, vocab 4096, seq 128, batch 8), AdamW vs GaLore vs I3S at
rank 32 of 128 on every attention/MLP linear, 600 steps (0.6M tokens) per method, about 2-3
minutes per method on this project's 2-core machine. `update_proj_gap=12` gives each subspace
method 50 refreshes, enough for the dominant-vs-sampled difference in subspace overlap to show
(fair-comparison.md). One torch thread: on a 2-core machine shared with other jobs, two OpenMP
threads spin against the other jobs and run up to 10x slower (measured: 4.4k vs 0.3-1k tokens/s),
while one thread is steady. Learning rates: AdamW 3e-3; GaLore and I3S 1e-2 with scale 0.25
(GaLore's recipe: the projected weights' effective step is 2.5e-3, near AdamW's; the dense
embeddings, head and norms get 1e-2). These are defaults, not a tuned result: for a ranking,
sweep each method's lr (`--lrs`) and use several seeds (`--seeds 0,1,2`).
"""
from __future__ import annotations

import copy
import shlex
import sys
from pathlib import Path

from .config import TrainConfig
from .data import InMemoryData, StreamingData, build_data
from .optimizers import check_method, without_subspace_options
from .preflight import prepare_out_dir, preflight
from .report import markdown_table, write_report
from .train import train

DEFAULT_OPTIMIZERS = ("adamw", "galore", "i3s")
DEFAULT_LRS = {"adamw": 3e-3, "galore": 1e-2, "i3s": 1e-2}


def default_compare_config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.steps = 600
    cfg.batch_size = 8
    cfg.threads = 1
    cfg.optim.rank = 32
    cfg.optim.update_proj_gap = 12
    cfg.eval_every = 50
    cfg.eval_batches = 8
    cfg.log_every = 10
    cfg.out_dir = "runs/compare"
    return cfg


def parse_lrs(spec: str | None) -> dict[str, list[float]]:
    """'adamw=3e-3,galore=5e-3:1e-2' -> {'adamw': [0.003], 'galore': [0.005, 0.01]}.
    Several lrs for one optimizer (separated by ':') make an lr sweep: one run per lr and seed,
    and the report marks the best lr of each optimizer."""
    out: dict[str, list[float]] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"--lrs expects name=lr[:lr...] pairs separated by commas, got {item!r}")
        name, values = item.split("=", 1)
        try:
            out[name.strip()] = [float(v) for v in values.split(":") if v.strip()]
        except ValueError:
            raise ValueError(f"--lrs: bad learning rate in {item!r}") from None
        if not out[name.strip()] or min(out[name.strip()]) <= 0:
            raise ValueError(f"--lrs: learning rates must be > 0 in {item!r}")
    return out


def _fresh(data, seed: int, cfg: TrainConfig):
    """The same packed sequences with a fresh cursor (and this seed's order)."""
    if isinstance(data, StreamingData):
        return build_data(cfg.data, seed, cfg.eval_batches * cfg.batch_size)
    assert isinstance(data, InMemoryData)
    return InMemoryData(data.train, data.val, data.tokenizer, seed)


def for_method(base: TrainConfig, name: str) -> TrainConfig:
    """`base` for one method; subspace-only options (`--svd-method`, ...) apply to the methods
    that project and are left out of the others' runs."""
    cfg = copy.deepcopy(base)
    cfg.optim.method = name
    if not check_method(name).projects:
        cfg.optim = without_subspace_options(cfg.optim)
    return cfg


def run_compare(base: TrainConfig, optimizers, lrs: dict[str, list[float]], seeds,
                out_dir: str | Path,
                command: str | None = None) -> dict[str, Path]:
    for name in optimizers:  # every cheap check before the corpus is read or a tokenizer trained
        preflight(for_method(base, name))
    out = prepare_out_dir(out_dir)
    (out / "command.txt").write_text((command or shlex.join(["subspace", *sys.argv[1:]])) + "\n")
    data = build_data(base.data, seeds[0], base.eval_batches * base.batch_size)
    for seed in seeds:
        for name in optimizers:
            grid = lrs.get(name) or [base.optim.lr]
            for lr in grid:
                cfg = for_method(base, name)
                cfg.seed, cfg.optim.lr = seed, lr
                tag = f"{name}-lr{lr:g}" if len(grid) > 1 else name
                cfg.out_dir = str(out / f"{tag}-seed{seed}")
                print(f"[compare] {name} seed {seed} lr {lr:g} -> {cfg.out_dir}", flush=True)
                train(cfg, data=_fresh(data, seed, cfg))
    return write_report(out)


def print_summary(paths: dict[str, Path]) -> None:
    from .report import load_rows

    paths = {k: Path(v).resolve() for k, v in paths.items()}
    root = paths["markdown"].parent
    print()
    print(markdown_table(load_rows(root)))
    print(f"Report: {paths['markdown']}")
    print(f"Plots:  {paths['val_loss_plot']}  {paths['overlap_plot']}")
    print(f"Table:  {paths['csv']}")
