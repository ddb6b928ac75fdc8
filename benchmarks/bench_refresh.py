"""Refresh cost: every projected weight of LLaMA 60M / 350M / 1B (GaLore's shapes, at the papers' ranks
128 / 256 / 512) refreshed once, by
galore-torch (full SVD), our exact paths (``svd``, ``gram``) and the randomized method (power
iterations 0-3, and I3S's randomized pool), one CPU thread, timed interleaved (A, B, A, B, ...;
medians). Per method: the time of a refresh of all weights (per shape median x count), its ratio to
galore-torch side by side, the captured gradient energy ``||P^T G||_F^2`` relative to the exact
top-r subspace's (worst shape), and the refresh cost amortised over ``--gap`` steps as a share of a
training step (6 x params x GaLore's 131k-token batch, at the single-thread matmul rate measured
between the timed refreshes, so under the same machine load).

Spectra: ``gaussian`` (i.i.d.), ``decay`` (sigma_i ~ 1/i), ``real-profile`` (the flattest spectrum
among the saved lab gradients, stretched to each shape) and, for the shapes of the saved gradients themselves,
``real`` (those gradients). Save them first with ``benchmarks/save_gradients.py``.

    .venv/bin/python benchmarks/bench_refresh.py --quick
    nice .venv/bin/python benchmarks/bench_refresh.py --out benchmarks/results/refresh_cpu.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from refresh_cases import (captured_energy, fmt_ratio, galore_torch, gemm_rate, left_form, model_weights, ours,
                           spectrum_matrix, step_seconds)
from subspace_optim.linalg import svd_fp32

POWER_ITERS = (0, 1, 2, 3)
POOL = 2.0  # I3S on a randomized pool of 2 r triplets (opt-in: it changes the law)


SKIP: set[str] = set()  # method names left out (--skip), e.g. to fit a busy machine's time


def methods(ranks: list[int]) -> list[tuple[str, int | None, object]]:
    """(name, rank or None for a rank-independent cost, refresh(matrix, rank)), less ``SKIP``."""
    out = []
    peer = galore_torch()
    if peer is not None:
        out.append(("galore-torch (svd)", None, peer))
    out += [("svd", None, ours("dominant", "svd")), ("gram", None, ours("dominant", "gram"))]
    for r in ranks:
        out += [(f"randomized q={q}", r, ours("dominant", "randomized", rsvd_power_iters=q)) for q in POWER_ITERS]
        out.append((f"i3s pool {POOL:g}", r, ours("importance", "randomized", importance_pool=POOL)))
    return [m for m in out if m[0] not in SKIP]


def measure(matrix: torch.Tensor, ranks: list[int], repeats: int) -> tuple[dict, dict, float]:
    """({(name, rank): median seconds}, {(name, rank): energy ratio}, matmul flop/s) for one matrix:
    every method, and a matmul probe after each round, timed interleaved (same machine load)."""
    plan = methods(ranks)
    times = {(name, r): [] for name, r, _ in plan}
    energy, rates = {}, []
    s = svd_fp32(left_form(matrix))[1].double()
    for rep in range(repeats):
        for name, r, refresh in plan:
            t0 = time.perf_counter()
            basis = refresh(matrix, r or max(ranks))
            times[(name, r)].append(time.perf_counter() - t0)
            if rep == 0 and not name.startswith("i3s"):
                for rr in ([r] if r else ranks):
                    energy[(name, rr)] = captured_energy(basis[:, :rr], matrix) / float((s[:rr] ** 2).sum())
        rates.append(gemm_rate(0.2))
    return {key: statistics.median(ts) for key, ts in times.items()}, energy, statistics.median(rates)


def real_gradients(paths: str | None) -> dict[tuple[int, int], torch.Tensor]:
    """Every saved gradient in the comma-separated ``paths``, keyed by shape (the last one saved of
    each shape)."""
    last = {}
    for path in (paths or "").split(","):
        if not path or not Path(path).exists():
            continue
        grads = torch.load(path, weights_only=True)["grads"]
        for key in sorted(grads, key=lambda k: int(k.rsplit("@", 1)[1])):
            last[tuple(grads[key].shape)] = grads[key]
    return last


def flattest_profile(paths: str | None) -> torch.Tensor | None:
    """The normalised spectrum of the saved gradient whose top quarter holds the least energy: the
    hardest real case for a randomized method."""
    best, best_share = None, 2.0
    for path in (paths or "").split(","):
        if not path or not Path(path).exists():
            continue
        for grad in torch.load(path, weights_only=True)["grads"].values():
            s = svd_fp32(left_form(grad.float()))[1].double()
            share = float((s[: len(s) // 4] ** 2).sum() / (s ** 2).sum())
            if share < best_share:
                best, best_share = s / s[0], share
    return best


def model_table(model: str, spectrum: str, ranks: list[int], repeats: int, gap: int,
                real: dict, profile) -> list[str]:
    weights, layers, params = model_weights(model)
    per_shape = []
    for i, w in enumerate(weights):
        if spectrum == "real":
            if (w.m, w.n) not in real:
                return []
            matrix = real[(w.m, w.n)].float()
        else:
            matrix = spectrum_matrix(spectrum, w, seed=i, real_profile=profile)
        per_shape.append((w, *measure(matrix, ranks, repeats)))
        print(f"  ({model} {spectrum} {w.left[0]}x{w.left[1]}: " + ", ".join(  # progress, for long runs
            f"{k[0]} {v:.2f}s" for k, v in per_shape[-1][1].items()) + ")", flush=True)
    rate = statistics.median(r for *_, r in per_shape)
    step = step_seconds(params, rate)
    lines = [f"\n### {model}: {spectrum} spectra ({layers} layers, {sum(w.per_layer for w in weights) * layers} "
             f"projected weights, {params / 1e6:.0f}M params; matmul rate during the runs {rate / 1e9:.0f} GFLOP/s, "
             f"step estimate {step:.0f} s)\n",
             "| method | rank | refresh of all weights (s) | galore-torch / method | captured energy (worst shape) | "
             f"refresh amortised over {gap} steps, share of a step |", "|---|---|---|---|---|---|"]
    keys = list(per_shape[0][1])
    peer = next((k for k in keys if k[0].startswith("galore-torch")), None)
    for r in ranks:
        peer_total = sum(t[peer] * w.per_layer * layers for w, t, *_ in per_shape) if peer else None
        for key in keys:
            if key[1] not in (None, r):
                continue
            total = sum(t[key] * w.per_layer * layers for w, t, *_ in per_shape)
            energies = [e.get((key[0], r)) for _, _, e, _ in per_shape]
            worst = "sampled" if key[0].startswith("i3s") else f"{min(energies):.4f}"
            ratio = fmt_ratio(peer_total / total) if peer_total else "n/a"
            lines.append(f"| {key[0]} | {r} | {total:.2f} | {ratio} | {worst} | {100 * total / gap / step:.3f}% |")
    shapes = ", ".join(f"{w.left[0]}x{w.left[1]}: " + ", ".join(
        f"{k[0]}{'' if k[1] is None else f' r={k[1]}'} {v:.3f}s" for k, v in t.items()) for w, t, *_ in per_shape)
    lines.append(f"\nPer-weight medians: {shapes}\n")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="60m:128,350m:256,1b:512", help="model:rank,... (the papers' ranks)")
    ap.add_argument("--spectra", default="decay,gaussian,real-profile,real")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--gradients", default="runs/gradients/60m.pt,runs/gradients/tiny.pt",
                    help="saved lab gradients (.pt, comma-separated)")
    ap.add_argument("--quick", action="store_true", help="60M shapes, rank 128, one repeat (CI-sized)")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    ap.add_argument("--skip", default="", help="comma list of method names to leave out, e.g. 'svd,randomized q=3'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    SKIP.update(name for name in args.skip.split(",") if name)
    if args.quick:
        args.models, args.repeats = "60m:128", 1
    real = real_gradients(args.gradients)
    profile = flattest_profile(args.gradients)
    lines = [f"# Refresh cost on one CPU thread (torch {torch.__version__})\n",
             f"Command: `{' '.join(['bench_refresh.py', *sys.argv[1:]])}`. Medians of {args.repeats} "
             "interleaved repeats. No GPU in this session: CPU only."]
    print("\n".join(lines), flush=True)
    for model, rank in (spec.split(":") for spec in args.models.split(",")):
        ranks = [int(rank)]
        for spectrum in args.spectra.split(","):
            if (spectrum == "real" and not real) or (spectrum == "real-profile" and profile is None):
                continue
            table = model_table(model, spectrum, ranks, args.repeats, args.gap, real, profile)
            print("\n".join(table), flush=True)
            lines += table
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
