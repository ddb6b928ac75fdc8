"""The frozen-subspace mechanism on a controlled problem: when does sampling the subspace (I3S) beat
taking the dominant one (GaLore)?

    .venv/bin/python benchmarks/frozen_subspace.py [--seeds 5] [--steps 500] [--out benchmarks/results]

The problem. One weight W (m x n, projected on the left: m < n), loss
``L(W) = ||W - W*||_F^2 / ||W_0 - W*||_F^2`` (1 at the start, 0 at the optimum). The stochastic
gradient is the true gradient ``W - W*`` plus zero-mean noise that lives in a FIXED r-dimensional
left subspace S (orthonormal basis ``U_S``, m x r): ``G_t = (W - W*) + rho * s_1 * U_S Z_t / sqrt(n)``,
``Z_t`` (r x n) standard Gaussian, ``s_1`` the largest singular value of ``W_0 - W*``, whose
singular values decay as ``1 / i``. This is the
situation the I3S paper describes in LLM pretraining: a few directions dominate every gradient (here
by construction, and they carry no progress on average), while the loss needs the others.

- ``rho = 0``: no noise; the dominant subspace is where the loss is, GaLore's greedy choice is right
  and sampling (I3S) or random subspaces spend steps on directions that matter less.
- ``rho`` large: the top-r left singular subspace of every gradient is S, so GaLore's subspace is
  frozen on S (overlap with S near 1) and it trains only what S can reach: the loss stalls near
  ``(m - r) / m`` of its start. I3S draws each singular vector with probability ~ sigma, so it
  keeps drawing directions outside S; random subspaces ignore the spectrum altogether.

Reported per method and noise level (mean +- std over seeds, each method at its best lr of a small
grid, chosen on the mean over seeds): the final loss, the mean overlap of the basis with S ("time
spent in the noise subspace", 1 = frozen on it), and the mean overlap between consecutive bases. A
plot of loss against noise level and one of the loss curves at the largest noise go next to the
table. Every method trains the same problems (same W_0, W*, S and noise per seed).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW, SubspaceOptimizer

M, N, RANK, GAP = 64, 256, 8, 25


def problem(seed: int, rho: float):
    """(W_0, W*, U_S, noise scale) of one seed; the noise's own stream is seeded separately.
    ``W* - W_0`` has singular values ``1 / i`` (i = 1..m) on random singular vectors: a decaying
    spectrum, as gradients of real weights have, so the dominant directions carry most of the loss."""
    g = torch.Generator().manual_seed(10_000 + seed)
    w0 = torch.randn(M, N, generator=g) / math.sqrt(N)
    u, _ = torch.linalg.qr(torch.randn(M, M, generator=g))
    v, _ = torch.linalg.qr(torch.randn(N, M, generator=g))
    sigma = 1.0 / torch.arange(1, M + 1, dtype=torch.float32)
    target = w0 + (u * sigma) @ v.T
    u_s, _ = torch.linalg.qr(torch.randn(M, RANK, generator=g))  # the noise subspace, unrelated to u
    return w0, target, u_s, rho * float(sigma[0])


def build(method: str, param: torch.nn.Parameter, lr: float, seed: int):
    group = [{"params": [param], "rank": RANK, "update_proj_gap": GAP, "scale": 1.0}]
    if method == "adamw":
        return torch.optim.AdamW([param], lr=lr, weight_decay=0.0)
    if method == "galore":
        return GaLoreAdamW(group, lr=lr, scale=1.0)
    if method == "i3s":
        return I3SAdamW(group, lr=lr, scale=1.0, seed=seed)
    if method == "random":
        return SubspaceOptimizer(group, lr=lr, selector="random", seed=seed)
    if method == "osd":
        return OnlineSubspaceAdamW(group, lr=lr, scale=1.0)
    if method == "ldadam":
        return LDAdamW([{"params": [param], "rank": RANK}], lr=lr)
    raise ValueError(f"method: unknown {method!r}")


METHODS = ("adamw", "galore", "i3s", "random", "osd", "ldadam")
LR_GRID = (3e-3, 1e-2, 3e-2)


def run(method: str, seed: int, rho: float, lr: float, steps: int) -> dict:
    w0, target, u_s, noise = problem(seed, rho)
    start = float(((w0 - target) ** 2).sum())
    w = torch.nn.Parameter(w0.clone())
    opt = build(method, w, lr, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(  # warmup 5%, cosine to 10%, the lab's shape
        opt, lambda t: min(1.0, (t + 1) / (0.05 * steps)) * (0.1 + 0.45 * (1 + math.cos(math.pi * t / steps))))
    noise_gen = torch.Generator().manual_seed(20_000 + seed)
    losses, in_s, consecutive, last = [], [], [], None
    for _ in range(steps):
        z = torch.randn(RANK, N, generator=noise_gen)
        with torch.no_grad():
            w.grad = (w - target) + noise * (u_s @ z) / math.sqrt(N)
        opt.step()
        sched.step()
        losses.append(float(((w.detach() - target) ** 2).sum()) / start)
        state = opt.state[w]
        basis = state.get("projector")
        if basis is not None:
            basis = basis.float()
            in_s.append(float((u_s.T @ basis).pow(2).sum()) / basis.shape[1])
            if last is not None and not torch.equal(basis, last):
                consecutive.append(float((last.T @ basis).pow(2).sum()) / basis.shape[1])
            last = basis.clone()
    return {"loss": losses[-1], "curve": losses[:: max(1, steps // 100)],
            "in_s": statistics.fmean(in_s) if in_s else None,
            "consecutive": statistics.fmean(consecutive) if consecutive else None}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--rhos", default="0,0.1,0.25,0.5,1,2,4,8", help="noise levels (comma list)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. _short)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rhos = [float(r) for r in args.rhos.split(",")]
    methods = args.methods.split(",")
    seeds = range(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    best: dict[tuple[str, float], dict] = {}
    t0 = time.time()
    for rho in rhos:
        for method in methods:
            by_lr = {}
            for lr in LR_GRID:
                by_lr[lr] = [run(method, s, rho, lr, args.steps) for s in seeds]
            lr = min(by_lr, key=lambda k: statistics.fmean(r["loss"] for r in by_lr[k]))
            best[(method, rho)] = {"lr": lr, "runs": by_lr[lr]}
            rs = by_lr[lr]
            print(f"rho {rho:g} {method:7s} lr {lr:g}: loss {fmt([r['loss'] for r in rs])}"
                  f"  ({time.time() - t0:.0f} s)", flush=True)

    lines = [
        "# Frozen subspace: a controlled problem (benchmarks/frozen_subspace.py)",
        "",
        f"W {M} x {N}, rank {RANK}, refresh every {GAP} steps ({args.steps // GAP} refreshes), "
        f"{args.steps} steps, warmup 5% + cosine to 10%, scale 1, {args.seeds} seeds; W* - W_0 with "
        f"singular values 1/i; lr per method "
        f"and noise level the best of {list(LR_GRID)} on the seed mean. Loss = ||W - W*||^2 relative "
        f"to the start; noise rho = noise singular value / top singular value of W_0 - W*, in a "
        f"fixed {RANK}-dimensional subspace S. 'in S' = mean ||U_S^T P||^2 / r over steps (1: the "
        f"basis is S); 'consecutive' = mean overlap of consecutive bases.",
        "",
        "Command: `" + " ".join(["python benchmarks/frozen_subspace.py", f"--seeds {args.seeds}",
                                f"--steps {args.steps}", f"--rhos {args.rhos}"]
                                + ([f"--tag {args.tag}"] if args.tag else [])) + "`",
        "",
        "| rho | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for rho in rhos:
        cells = []
        for m in methods:
            b = best[(m, rho)]
            cells.append(f"{fmt([r['loss'] for r in b['runs']])} (lr {b['lr']:g})")
        lines.append(f"| {rho:g} | " + " | ".join(cells) + " |")
    lines += ["", "Overlap of the basis with the noise subspace S / between consecutive bases:", "",
              "| rho | " + " | ".join(m for m in methods if m != "adamw") + " |",
              "|---|" + "---|" * (len(methods) - ("adamw" in methods)), ]
    for rho in rhos:
        cells = []
        for m in methods:
            if m == "adamw":
                continue
            runs = best[(m, rho)]["runs"]
            ins = [r["in_s"] for r in runs if r["in_s"] is not None]
            con = [r["consecutive"] for r in runs if r["consecutive"] is not None]
            cells.append(f"{statistics.fmean(ins):.3f} / " + (f"{statistics.fmean(con):.3f}" if con else "-"))
        lines.append(f"| {rho:g} | " + " | ".join(cells) + " |")
    (out / f"frozen_subspace{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(best, rhos, methods, args.steps, out / f"frozen_subspace{args.tag}.png")


def plot(best, rhos, methods, steps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        means = [statistics.fmean(r["loss"] for r in best[(m, rho)]["runs"]) for rho in rhos]
        stds = [statistics.stdev([r["loss"] for r in best[(m, rho)]["runs"]])
                if len(best[(m, rho)]["runs"]) > 1 else 0.0 for rho in rhos]
        a.errorbar(rhos, means, yerr=stds, marker="o", capsize=3, label=m)
        curves = [r["curve"] for r in best[(m, rhos[-1])]["runs"]]
        mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        xs = [i * max(1, steps // 100) for i in range(len(mean_curve))]
        b.plot(xs, mean_curve, label=m)
    a.set_xlabel("noise in the fixed subspace (rho)")
    a.set_ylabel("final relative loss")
    a.set_yscale("log")
    a.set_title("Final loss vs noise level (best lr each)")
    a.legend()
    b.set_xlabel("step")
    b.set_ylabel("relative loss")
    b.set_yscale("log")
    b.set_title(f"Loss curves at rho = {rhos[-1]:g} (seed mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
