"""Ordinary-step time of our execution paths against torch's AdamW, on the LLaMA-60M weight shapes.

    .venv/bin/python benchmarks/bench_step_paths.py [--rounds 15] [--rank 128] [--threads 1]

Paths: the per-tensor reference (``foreach=False``), the grouped path (``foreach=True``), and the
compiled step (``torch.compile(opt.step)``, inductor, ``nonfinite="skip"`` so that ordinary steps
are one graph), each for GaLore; against ``torch.optim.AdamW(foreach=True)`` and, when installed,
galore-torch's GaLoreAdamW. Fixed random gradients, no forward pass: the optimizer alone. Each
optimizer first takes its refresh step and (compiled) its warm-up steps; then rounds time one
ordinary step of each in turn (A, B, C, ..., A, B, C, ...: the machine is shared and noisy) and the
table reports medians and their ratio to AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_step import llama60m_params
from subspace_optim import GaLoreAdamW


def _ours(**options):
    def build(projected, dense, rank):
        return GaLoreAdamW([{"params": dense}, {"params": projected, "subspace": True}], lr=1e-3, rank=rank,
                           update_proj_gap=10**9, **options)
    return build


def _adamw(projected, dense, rank):
    return torch.optim.AdamW([p for _, p in dense + projected], lr=1e-3, foreach=True)


def _galore_torch(projected, dense, rank):
    from galore_torch import GaLoreAdamW as PeerGaLore

    return PeerGaLore([{"params": [p for _, p in dense]},
                       {"params": [p for _, p in projected], "rank": rank, "update_proj_gap": 10**9,
                        "scale": 0.25, "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)


PATHS = {
    "AdamW (torch, foreach)": (_adamw, False),
    "GaLore, per-tensor (reference)": (_ours(foreach=False), False),
    "GaLore, grouped (foreach=True)": (_ours(foreach=True), False),
    "GaLore, compiled": (_ours(foreach=False, nonfinite="skip"), True),
    "GaLore, compiled + grouped": (_ours(foreach=True, nonfinite="skip"), True),
    "galore-torch GaLoreAdamW (peer)": (_galore_torch, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps, gen = {}, torch.Generator().manual_seed(1)
    for name, (build, compiled) in PATHS.items():
        try:
            projected, dense = llama60m_params("cpu")
            opt = build(projected, dense, args.rank)
        except ImportError:
            print(f"(skipping {name}: not installed)")
            continue
        for _, p in projected + dense:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(4 if compiled else 2):  # the refresh, then (compiled) the ordinary graph
            step()
        steps[name] = step
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["AdamW (torch, foreach)"])
    print(f"\nLLaMA-60M shapes, rank {args.rank}, {args.threads} thread(s), {args.rounds} interleaved rounds\n")
    print("| path | ordinary step ms (median) | x AdamW |")
    print("|---|---|---|")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"| {name} | {median * 1e3:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
