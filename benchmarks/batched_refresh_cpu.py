"""Side-by-side, interleaved CPU timing of one refresh of B equal-shape weights: per weight
(``selector.select``) against ``refresh_batch`` stacked (one batched call) and its CPU default (one
weight at a time). Run with OMP_NUM_THREADS=1; prints medians in ms."""

from __future__ import annotations

import statistics
import sys
import time

import torch

from subspace_optim.batched_refresh import refresh_batch
from subspace_optim.selectors import SelectionContext, get_selector


def main(batch=16, shape=(128, 512), rank=32, repeats=15):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) for _ in range(batch)]
    print(f"B={batch} shape={shape} rank={rank} threads={torch.get_num_threads()} torch {torch.__version__}")
    for selector in ("dominant", "importance"):
        for method in ("svd", "gram", "randomized"):
            group = {"seed": 0, "svd_method": method, "importance_pool": 2.0 if method == "randomized" else None}
            ctxs = [SelectionContext({}, group, f"w{i}", 0) for i in range(batch)]
            sel = get_selector(selector)
            runs = {
                "per_weight": lambda: [sel.select(x, None, rank, c) for x, c in zip(grads, ctxs)],
                "stacked": lambda: refresh_batch(sel, grads, [None] * batch, [rank] * batch, ctxs, stacked=True),
                "cpu_default": lambda: refresh_batch(sel, grads, [None] * batch, [rank] * batch, ctxs),
            }
            times = {k: [] for k in runs}
            for f in runs.values():
                f()  # warm-up
            for _ in range(repeats):  # interleaved: each round runs every variant once
                for k, f in runs.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            print(f"{selector:10s} {method:10s} " + "  ".join(f"{k} {v:7.2f}" for k, v in med.items())
                  + f"  stacked/per_weight {med['stacked'] / med['per_weight']:.2f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
