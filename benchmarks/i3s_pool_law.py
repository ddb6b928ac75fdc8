"""How far I3S's randomized pool moves the sampling law, on real gradients saved from lab runs.

For each saved gradient (``benchmarks/save_gradients.py``) in GaLore's left form, and each pool
factor: (1) the exact TV distance between the full law (sigma-weighted successive sampling over the
whole spectrum) and the pooled law with exact singular values, which is the probability that the
full law draws past the pool (``subspace_optim.pool_law``; bracketed, both ends printed when they
differ); (2) a Monte Carlo estimate of the TV distance over ordered draws between the full law and
the sampler actually run (pool weights = the randomized method's estimated singular values), which
bounds the TV over sets from above: ``E_full[max(0, 1 - Q(draw) / P(draw))]`` with both
probabilities exact for each draw.

    .venv/bin/python benchmarks/i3s_pool_law.py runs/gradients/tiny.pt --rank 32
"""
from __future__ import annotations

import argparse
import statistics

import torch

from subspace_optim.linalg import svd_fp32
from subspace_optim.pool_law import tail_draw_probability
from subspace_optim.randomized import RANDOMIZED_DEFAULTS, gaussian_test_matrix, pool_size, randomized_svd_fp32
from subspace_optim.selectors.base import numerically_nonzero


def sequence_log_prob(weights: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """log P(ordered draw) under successive sampling with ``weights`` (k,), for draws (n, r)."""
    w = weights[draws]  # (n, r)
    before = torch.cumsum(w, dim=1) - w  # weight already drawn before each pick
    return (torch.log(w) - torch.log(weights.sum() - before)).sum(dim=1)


def sequence_tv(full: torch.Tensor, pooled: torch.Tensor, rank: int, samples: int, seed: int
                ) -> tuple[float, float, float]:
    """Monte Carlo TV over ordered draws between successive sampling with ``full`` (k,) and with
    ``pooled`` (K,) on the first K indices: (estimate, standard error, mean number of the full
    law's draws past the pool)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(samples, full.numel(), generator=g, dtype=torch.float64).clamp_(min=1e-300)
    keys = torch.log(full)[None, :] - torch.log(-torch.log(u))
    draws = torch.topk(keys, rank, dim=1).indices  # (n, r), in draw order
    log_p = sequence_log_prob(full, draws)
    inside = (draws < pooled.numel()).all(dim=1)
    log_q = torch.full_like(log_p, -torch.inf)
    log_q[inside] = sequence_log_prob(pooled, draws[inside])
    gap = (1 - torch.exp(log_q - log_p)).clamp(min=0)
    past = (draws >= pooled.numel()).sum(dim=1).double().mean()
    return float(gap.mean()), float(gap.std() / samples ** 0.5), float(past)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gradients")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--pools", default="1.25,1.5,2,3")
    ap.add_argument("--power-iters", type=int, default=RANDOMIZED_DEFAULTS["rsvd_power_iters"])
    ap.add_argument("--oversampling", type=float, default=RANDOMIZED_DEFAULTS["rsvd_oversampling"])
    ap.add_argument("--samples", type=int, default=4000)
    args = ap.parse_args()
    saved = torch.load(args.gradients, weights_only=True)
    pools = [float(p) for p in args.pools.split(",")]
    rows = {p: [] for p in pools}
    print(f"# I3S pool law on {args.gradients} ({saved['meta']}), rank {args.rank}, randomized pool with "
          f"{args.power_iters} power iterations, oversampling {args.oversampling}\n")
    print("| gradient | k x l | " + " | ".join(f"pool {p:g}: exact TV / MC TV (randomized) / draws past pool" for p in pools) + " |")
    print("|---|---|" + "---|" * len(pools))
    for n, (name, grad) in enumerate(sorted(saved["grads"].items())):
        left = grad if grad.shape[0] < grad.shape[1] else grad.T
        s = svd_fp32(left.double())[1].double()
        # the sampler's own law: directions under the numerical-rank tolerance have weight zero
        full = s[numerically_nonzero(s, tuple(left.shape))]
        cells = []
        for p in pools:
            k = pool_size(args.rank, p, tuple(left.shape))
            if full.numel() <= max(args.rank, k):  # both laws are the dominant basis, or the same law
                rows[p].append((0.0, 0.0, 0.0))
                cells.append("0 (same law)")
                continue
            low, high = tail_draw_probability(full, args.rank, k)
            s_hat = randomized_svd_fp32(left, k, gaussian_test_matrix(torch.Generator().manual_seed(n)),
                                        args.oversampling, args.power_iters)[1].double()
            tv, se, past = sequence_tv(full, s_hat[:k].clamp(min=1e-300), args.rank, args.samples, seed=n)
            rows[p].append((high, tv, past))
            exact = f"{high:.3g}" if high - low < 0.01 * high + 1e-12 else f"[{low:.3g}, {high:.3g}]"
            cells.append(f"{exact} / {tv:.3g} ± {se:.1g} / {past:.2g}")
        print(f"| {name} | {left.shape[0]}x{left.shape[1]} | " + " | ".join(cells) + " |", flush=True)
    print("\n| pool | exact TV: median | max | MC TV with randomized weights: median | max | "
          f"full law's draws past the pool (of {args.rank}): median | max |\n|---|---|---|---|---|---|---|")
    for p in pools:
        ex, mc, past = ([r[i] for r in rows[p]] for i in range(3))
        print(f"| {p:g} | {statistics.median(ex):.3g} | {max(ex):.3g} | {statistics.median(mc):.3g} | {max(mc):.3g} | "
              f"{statistics.median(past):.2g} | {max(past):.2g} |")


if __name__ == "__main__":
    main()
