"""Validation loss of I3S with the exact law against I3S on a randomized pool (and GaLore exact vs
randomized), on the lab's default comparison (tiny LLaMA, KJV, 600 steps, rank 32, gap 12), a few
seeds, one run at a time. Prints one markdown row per run and a mean +- std summary per method.

    nice .venv/bin/python benchmarks/pool_validation.py --seeds 0,1 --out-dir runs/pool-validation
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from subspace_lab import optimizers as lab_optimizers
from subspace_lab.compare import default_compare_config
from subspace_lab.train import train

VARIANTS = {
    "i3s exact (svd)": ("I3SAdamW", {}),
    "i3s randomized pool 2": ("I3SAdamW", {"svd_method": "randomized", "importance_pool": 2.0}),
    "i3s randomized pool 3": ("I3SAdamW", {"svd_method": "randomized", "importance_pool": 3.0}),
    "galore (svd)": ("GaLoreAdamW", {}),
    "galore randomized": ("GaLoreAdamW", {"svd_method": "randomized"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lr", type=float, default=2e-2, help="the tuned lr of galore and i3s (docs/results)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out-dir", default="runs/pool-validation")
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    print("| variant | seed | val loss | refresh time (s) |\n|---|---|---|---|", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.variants.split(","):
            cls, fixed = VARIANTS[name]
            key = "pool-" + name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
            lab_optimizers.OPTIMIZERS[key] = lab_optimizers.subspace(cls, **fixed)
            cfg = default_compare_config()
            cfg.optim.name, cfg.optim.lr, cfg.seed, cfg.steps = key, args.lr, seed, args.steps
            cfg.progress, cfg.eval_every = False, 0
            cfg.out_dir = str(Path(args.out_dir) / f"{key}-seed{seed}")
            summary = Path(cfg.out_dir) / "summary.json"
            if summary.exists():  # resumable: finished runs are read back
                done = json.loads(summary.read_text())
                loss, refresh = done["final_val_loss"], done["refresh_time_s"]
            else:
                result = train(cfg)
                loss, refresh = result.final_val_loss, result.refresh_time_s
            results.setdefault(name, []).append(loss)
            print(f"| {name} | {seed} | {loss:.4f} | {refresh:.2f} |", flush=True)
    print("\n| variant | seeds | val loss (mean ± std) |\n|---|---|---|")
    for name, losses in results.items():
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"| {name} | {len(losses)} | {statistics.mean(losses):.4f} ± {sd:.4f} |")


if __name__ == "__main__":
    main()
