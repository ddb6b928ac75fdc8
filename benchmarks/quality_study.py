"""The quality table: I3S vs GaLore vs a fair AdamW on the largest LLaMA this CPU trains in a
background run, with per-method tuned learning rates, >= 50 refreshes and 3 seeds.

    .venv/bin/python benchmarks/quality_study.py run    [--out runs/quality] [--jobs 2]
    .venv/bin/python benchmarks/quality_study.py report [--out runs/quality] [--results benchmarks/results]

Model `small` (5.3M parameters, hidden 256, 4 layers, vocab 4096) on the embedded KJV corpus,
sequence 128, batch 8, warmup 10% then cosine to 10%, clip 1.0, rank 64 (hidden / 4) on every
attention/MLP matrix, scale 0.25, refresh every 25 steps. Phases (each a `subspace compare`; a
phase whose report exists is skipped, so `run` can be stopped and started again):
1. `sweep-subspace`: GaLore and I3S at lr {1e-2, 2e-2, 4e-2}, 500 steps, seed 0.
2. `sweep-adamw-fair`: AdamW with the dense parameters (embeddings, LM head, norms) at GaLore's best
   lr, as in the subspace runs, and the matrices' lr swept {1e-3, 3e-3, 1e-2}; `sweep-adamw-plain`:
   AdamW with one lr for everything, {1e-3, 3e-3, 1e-2}.
3. `full-*`: each method at its best lr, 1,500 steps (60 refreshes, 1.5M tokens), seeds 0, 1, 2.
`report` writes `quality_small.md`: mean ± std over seeds, the gap of each subspace method to the
fair AdamW, and the relative reduction of GaLore's gap by I3S, ``1 - gap_I3S / gap_GaLore``, with
its spread over the seed-paired differences.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COMMON = ["--model", "small", "--rank", "64", "--update-proj-gap", "25", "--batch-size", "8",
          "--eval-every", "250", "--threads", "1", "--no-progress"]
SWEEP_STEPS, FULL_STEPS, SEEDS = 500, 1500, "0,1,2"
SUBSPACE_LRS, ADAMW_LRS = (1e-2, 2e-2, 4e-2), (1e-3, 3e-3, 1e-2)


def compare(out: Path, optimizers: str, lrs: str, steps: int, seeds: str, extra=()) -> list[str]:
    return [sys.executable, "-m", "subspace_lab.cli", "compare", *COMMON, "--optimizers", optimizers,
            "--lrs", lrs, "--steps", str(steps), "--seeds", seeds, "--out-dir", str(out), *extra]


def grid(name: str, values) -> str:
    return f"{name}=" + ":".join(f"{v:g}" for v in values)


def rows(phase_dir: Path) -> list[dict]:
    with open(phase_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def best_lr(phase_dir: Path, optimizer: str) -> float:
    candidates = [r for r in rows(phase_dir) if r["optimizer"] == optimizer]
    return float(min(candidates, key=lambda r: float(r["final_val_loss"]))["lr"])


def execute(commands: dict[str, list[str]], out: Path, jobs: int) -> None:
    todo = {name: cmd for name, cmd in commands.items() if not (out / name / "results.csv").exists()}

    def one(item):
        name, cmd = item
        print(f"[quality] {name}: {' '.join(cmd[2:])}", flush=True)
        with open(out / f"{name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"[quality] {name}: done", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo.items()))


def run(out: Path, jobs: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    execute({"sweep-subspace": compare(out / "sweep-subspace", "galore,i3s",
                                       f"{grid('galore', SUBSPACE_LRS)},{grid('i3s', SUBSPACE_LRS)}",
                                       SWEEP_STEPS, "0")}, out, jobs)
    dense = best_lr(out / "sweep-subspace", "galore")
    execute({"sweep-adamw-fair": compare(out / "sweep-adamw-fair", "adamw", grid("adamw", ADAMW_LRS),
                                         SWEEP_STEPS, "0", ["--dense-lr", f"{dense:g}"]),
             "sweep-adamw-plain": compare(out / "sweep-adamw-plain", "adamw", grid("adamw", ADAMW_LRS),
                                          SWEEP_STEPS, "0")}, out, jobs)
    g, i = best_lr(out / "sweep-subspace", "galore"), best_lr(out / "sweep-subspace", "i3s")
    fair, plain = best_lr(out / "sweep-adamw-fair", "adamw"), best_lr(out / "sweep-adamw-plain", "adamw")
    execute({"full-galore": compare(out / "full-galore", "galore", f"galore={g:g}", FULL_STEPS, SEEDS),
             "full-i3s": compare(out / "full-i3s", "i3s", f"i3s={i:g}", FULL_STEPS, SEEDS),
             "full-adamw-fair": compare(out / "full-adamw-fair", "adamw", f"adamw={fair:g}", FULL_STEPS,
                                        SEEDS, ["--dense-lr", f"{dense:g}"]),
             "full-adamw-plain": compare(out / "full-adamw-plain", "adamw", f"adamw={plain:g}",
                                         FULL_STEPS, SEEDS)}, out, jobs)


def losses(phase_dir: Path) -> dict[int, float]:
    return {int(r["seed"]): float(r["final_val_loss"]) for r in rows(phase_dir)}


def mean_std(values) -> str:
    values = list(values)
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(out: Path, results: Path) -> None:
    dense = best_lr(out / "sweep-subspace", "galore")
    runs = {"AdamW, one lr": "full-adamw-plain", f"AdamW fair (dense lr {dense:g})": "full-adamw-fair",
            "GaLore": "full-galore", "I3S": "full-i3s"}
    by = {label: losses(out / phase) for label, phase in runs.items()}
    lrs = {label: float(rows(out / phase)[0]["lr"]) for label, phase in runs.items()}
    state = {label: float(rows(out / phase)[0]["optimizer_state_mb"]) for label, phase in runs.items()}
    fair = by[f"AdamW fair (dense lr {dense:g})"]
    seeds = sorted(fair)
    lines = ["# Quality: I3S vs GaLore vs AdamW on the `small` LLaMA (CPU, KJV)", "",
             "`python benchmarks/quality_study.py run` then `report` (" + " ".join(COMMON) + "; sweeps "
             f"{SWEEP_STEPS} steps seed 0, full runs {FULL_STEPS} steps = {FULL_STEPS // 25} refreshes, "
             f"seeds {SEEDS}). Validation loss = token-weighted mean NLL on the held-out split.", "",
             "## Learning-rate sweeps (seed 0, 500 steps)", "", "| phase | optimizer | lr | val loss |",
             "|---|---|---|---|"]
    for phase in ("sweep-subspace", "sweep-adamw-fair", "sweep-adamw-plain"):
        for r in sorted(rows(out / phase), key=lambda r: (r["optimizer"], float(r["lr"]))):
            lines.append(f"| {phase} | {r['optimizer']} | {float(r['lr']):g} | {float(r['final_val_loss']):.4f} |")
    lines += ["", f"## Full runs ({FULL_STEPS} steps, 3 seeds)", "",
              "| method | lr (matrices) | val loss | gap to fair AdamW (paired) | optimizer state MB |",
              "|---|---|---|---|---|"]
    for label, values in by.items():
        gap = [values[s] - fair[s] for s in seeds]
        lines.append(f"| {label} | {lrs[label]:g} | {mean_std(values.values())} | "
                     f"{mean_std(gap) if label.startswith(('GaLore', 'I3S')) else '-'} | {state[label]:.2f} |")
    g_gap = [by["GaLore"][s] - fair[s] for s in seeds]
    i_gap = [by["I3S"][s] - fair[s] for s in seeds]
    diff = [by["I3S"][s] - by["GaLore"][s] for s in seeds]
    mean_g = statistics.fmean(g_gap)
    reduction = 1 - statistics.fmean(i_gap) / mean_g if mean_g else float("nan")
    spread = statistics.stdev(diff) / abs(mean_g) if mean_g else float("nan")
    lines += ["", f"- I3S - GaLore, seed-paired: {mean_std(diff)} nats "
              f"({'I3S better' if statistics.fmean(diff) < 0 else 'GaLore better'} on average; "
              f"{sum(d < 0 for d in diff)} of {len(diff)} seeds favour I3S).",
              f"- Relative reduction of GaLore's gap to fair AdamW by I3S: {reduction:+.1%} "
              f"(± {spread:.1%} from the seed-paired spread; GaLore's mean gap {mean_g:+.4f})."]
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality_small.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("run", "report"))
    ap.add_argument("--out", default="runs/quality", type=Path)
    ap.add_argument("--results", default="benchmarks/results", type=Path)
    ap.add_argument("--jobs", type=int, default=1, help="compares run side by side (one thread each)")
    args = ap.parse_args()
    run(args.out, args.jobs) if args.action == "run" else report(args.out, args.results)


if __name__ == "__main__":
    main()
