"""The quality table: I3S vs GaLore vs a fair AdamW on the largest LLaMA this CPU trains in a
background run, with per-method tuned learning rates, >= 50 refreshes and 3 seeds.

    .venv/bin/python benchmarks/quality_study.py run    [--out runs/quality] [--jobs 2]
    .venv/bin/python benchmarks/quality_study.py report [--out runs/quality] [--results benchmarks/results]

Model `small` (5.3M parameters, hidden 256, 4 layers, vocab 4096) on the embedded KJV corpus,
sequence 128, batch 8, warmup 10% then cosine to 10%, clip 1.0, rank 64 (hidden / 4) on every
attention/MLP matrix, scale 0.25, refresh every 25 steps. Phases (each a `subspace compare`; a
phase whose report exists is skipped, so `run` can be stopped and started again):
1. `sweep-subspace*`: GaLore and I3S at lr {2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2}, 500 steps, seed 0.
2. `sweep-adamw-fair`: AdamW with the dense parameters (embeddings, LM head, norms) at GaLore's best
   lr, as in the subspace runs, and the matrices' lr swept {1e-4, 3e-4, 1e-3, 3e-3, 1e-2};
   `sweep-adamw-plain*`: AdamW with one lr for everything, {3e-4, 1e-3, 3e-3, 1e-2} (reported from
   the sweep only: it is far behind the fair AdamW, so it gets no full runs).
3. `full-*`: GaLore, I3S and the fair AdamW, each at its best lr, 1,250 steps (50 refreshes, 1.3M tokens), seeds 0, 1, 2.
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
SWEEP_STEPS, FULL_STEPS, SEEDS = 500, 1250, "0,1,2"
# each sweep phase is (its folder, its grid); a method's best lr is taken over all its phases, and
# a grid was extended (a new phase) whenever the best lr sat on its edge
SUBSPACE_SWEEPS = (("sweep-subspace", (1e-2, 2e-2, 4e-2)), ("sweep-subspace-low", (2.5e-3, 5e-3)))
ADAMW_SWEEPS = (("", (1e-3, 3e-3, 1e-2)), ("-low", (3e-4,)))
FAIR_ONLY_SWEEPS = (("-lower", (1e-4,)),)  # the fair AdamW's best was still on the edge at 3e-4


def compare(out: Path, optimizers: str, lrs: str, steps: int, seeds: str, extra=()) -> list[str]:
    return [sys.executable, "-m", "subspace_lab.cli", "compare", *COMMON, "--optimizers", optimizers,
            "--lrs", lrs, "--steps", str(steps), "--seeds", seeds, "--out-dir", str(out), *extra]


def grid(name: str, values) -> str:
    return f"{name}=" + ":".join(f"{v:g}" for v in values)


def rows(phase_dir: Path) -> list[dict]:
    with open(phase_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def sweep_rows(out: Path, dirs, optimizer: str) -> list[dict]:
    return [r for d in dirs for r in rows(out / d) if r["optimizer"] == optimizer]


def best_lr(out: Path, dirs, optimizer: str) -> float:
    return float(min(sweep_rows(out, dirs, optimizer), key=lambda r: float(r["final_val_loss"]))["lr"])


def fair_dirs(dense: float) -> list[str]:
    return [f"sweep-adamw-fair-dense{dense:g}{suffix}" for suffix, _ in ADAMW_SWEEPS + FAIR_ONLY_SWEEPS]


PLAIN_DIRS = [f"sweep-adamw-plain{suffix}" for suffix, _ in ADAMW_SWEEPS]
SUBSPACE_DIRS = [d for d, _ in SUBSPACE_SWEEPS]


def chosen(out: Path, given: dict[str, float] | None = None) -> dict[str, tuple[float, list[str]]]:
    """method -> (best lr, extra compare flags), from the sweeps or from ``--chosen``."""
    if given is None:
        given = {"galore": best_lr(out, SUBSPACE_DIRS, "galore"), "i3s": best_lr(out, SUBSPACE_DIRS, "i3s")}
        given["adamw-fair"] = best_lr(out, fair_dirs(given["galore"]), "adamw")
    dense = given["galore"]
    return {"galore": (dense, []), "i3s": (given["i3s"], []),
            "adamw-fair": (given["adamw-fair"], ["--dense-lr", f"{dense:g}"])}


def parse_chosen(text: str | None) -> dict[str, float] | None:
    """``galore=1e-2,i3s=1e-2,adamw-fair=3e-4`` -> a dict; every method named exactly once."""
    if text is None:
        return None
    try:
        given = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--chosen: expected method=lr,... got {text!r}")
    if sorted(given) != ["adamw-fair", "galore", "i3s"]:
        raise SystemExit(f"--chosen: name galore, i3s and adamw-fair once each, got {sorted(given)}")
    return given


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


def run(out: Path, jobs: int, given: dict[str, float] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if given is None:
        run_sweeps(out, jobs)
    execute({full_dir(m, lr): compare(out / full_dir(m, lr), m.split("-")[0], f"{m.split('-')[0]}={lr:g}",
                                      FULL_STEPS, SEEDS, extra)
             for m, (lr, extra) in chosen(out, given).items()}, out, jobs)


def run_sweeps(out: Path, jobs: int) -> None:
    execute({d: compare(out / d, "galore,i3s", f"{grid('galore', lrs)},{grid('i3s', lrs)}", SWEEP_STEPS, "0")
             for d, lrs in SUBSPACE_SWEEPS}, out, jobs)
    dense = best_lr(out, SUBSPACE_DIRS, "galore")
    sweeps = {}
    for (_, lrs), fair in zip(ADAMW_SWEEPS + FAIR_ONLY_SWEEPS, fair_dirs(dense)):
        sweeps[fair] = compare(out / fair, "adamw", grid("adamw", lrs), SWEEP_STEPS, "0",
                               ["--dense-lr", f"{dense:g}"])
    for (_, lrs), plain in zip(ADAMW_SWEEPS, PLAIN_DIRS):
        sweeps[plain] = compare(out / plain, "adamw", grid("adamw", lrs), SWEEP_STEPS, "0")
    execute(sweeps, out, jobs)


def full_dir(method: str, lr: float) -> str:
    return f"full-{method}-lr{lr:g}"


def finished(phase_dir: Path) -> dict[int, dict]:
    """seed -> summary of every finished run of a full-run phase (a phase stopped part-way still
    counts its finished seeds; the report pairs the seeds all three methods finished)."""
    import json

    out = {}
    for summary in sorted(phase_dir.glob("*-seed*/summary.json")):
        record = json.loads(summary.read_text())
        out[int(record["seed"])] = record
    return out


def summary(values) -> str:
    """mean ± std over seeds, or the one value."""
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def sweep_table(out: Path, dense: float, sweeps_csv: Path) -> dict[str, list[tuple[str, float, float]]]:
    """phase -> [(optimizer, lr, val loss)] sorted by lr: from the sweep folders under ``out``, or,
    where they are not there (full runs started with ``--chosen``), from ``sweeps_csv`` (columns
    phase, optimizer, lr, final_val_loss), which keeps an earlier sweep's results."""
    table: dict[str, list[tuple[str, float, float]]] = {}
    if (out / SUBSPACE_DIRS[0] / "results.csv").exists():
        for phase, dirs, opt in (("GaLore", SUBSPACE_DIRS, "galore"), ("I3S", SUBSPACE_DIRS, "i3s"),
                                 (f"AdamW, dense lr {dense:g}", fair_dirs(dense), "adamw"),
                                 ("AdamW, one lr", PLAIN_DIRS, "adamw")):
            table[phase] = [(opt, float(r["lr"]), float(r["final_val_loss"])) for r in sweep_rows(out, dirs, opt)]
    else:
        with open(sweeps_csv) as f:
            for r in csv.DictReader(f):
                table.setdefault(r["phase"], []).append((r["optimizer"], float(r["lr"]), float(r["final_val_loss"])))
    return {phase: sorted(found, key=lambda r: r[1]) for phase, found in table.items()}


def report(out: Path, results: Path, given: dict[str, float] | None = None) -> None:
    sweeps_csv = results / "quality_small_sweeps.csv"
    picks = chosen(out, given)
    dense = picks["galore"][0]
    runs = {f"AdamW fair (dense lr {dense:g})": full_dir("adamw-fair", picks["adamw-fair"][0]),
            "GaLore": full_dir("galore", picks["galore"][0]), "I3S": full_dir("i3s", picks["i3s"][0])}
    done = {label: finished(out / phase) for label, phase in runs.items()}
    fair_label = f"AdamW fair (dense lr {dense:g})"
    if not all(done.values()):
        raise SystemExit(f"report: a method has no finished full run: { {k: sorted(v) for k, v in done.items()} }")
    by = {label: {s: float(r["final_val_loss"]) for s, r in d.items()} for label, d in done.items()}
    lrs = {label: float(next(iter(d.values()))["lr"]) for label, d in done.items()}
    state = {label: next(iter(d.values()))["optimizer_state_bytes"] / 2**20 for label, d in done.items()}
    fair = by[fair_label]
    seeds = sorted(set.intersection(*(set(d) for d in by.values())))  # finished by all three
    pair = sorted(set(by["GaLore"]) & set(by["I3S"]))
    lines = ["# Quality: I3S vs GaLore vs AdamW on the `small` LLaMA (CPU, KJV)", "",
             "`python benchmarks/quality_study.py run` then `report` (" + " ".join(COMMON) + "; sweeps "
             f"{SWEEP_STEPS} steps seed 0, full runs {FULL_STEPS} steps = {FULL_STEPS // 25} refreshes, "
             f"planned seeds {SEEDS}; finished: " + "; ".join(f"{k} {sorted(v)}" for k, v in by.items()) + "). Validation loss = token-weighted mean NLL on the held-out split.", "",
             "## Learning-rate sweeps (seed 0, 500 steps)", ""]
    if not (out / SUBSPACE_DIRS[0] / "results.csv").exists():
        lines += [f"(From `{sweeps_csv.name}`: the sweeps of an earlier `run` whose run folders were not "
                  "kept; the full runs were started with `--chosen` at their best lrs.)", ""]
    lines += ["| phase | optimizer | lr | val loss |",
             "|---|---|---|---|"]
    for phase, found in sweep_table(out, dense, sweeps_csv).items():
        best = min(found, key=lambda r: r[2])
        for r in found:
            lines.append(f"| {phase} | {r[0]} | {r[1]:g}{' (best)' if r is best else ''} | {r[2]:.3f} |")
        if best in (found[0], found[-1]):
            lines.append(f"| {phase} | | best lr on the grid's edge | |")
    lines += ["", f"## Full runs ({FULL_STEPS} steps)", "",
              "| method | lr (matrices) | seeds | val loss | gap to fair AdamW (seeds both finished) | optimizer state MB |",
              "|---|---|---|---|---|---|"]
    for label, values in by.items():
        shared = sorted(set(values) & set(fair))
        gap = summary([values[s] - fair[s] for s in shared]) if label != fair_label else "-"
        lines.append(f"| {label} | {lrs[label]:g} | {len(values)} | {summary(values.values())} | {gap} | "
                     f"{state[label]:.2f} |")
    diff = [by["I3S"][s] - by["GaLore"][s] for s in pair]
    g_gap = [by["GaLore"][s] - fair[s] for s in seeds]
    i_gap = [by["I3S"][s] - fair[s] for s in seeds]
    mean_g = statistics.fmean(g_gap) if g_gap else float("nan")
    reduction = 1 - statistics.fmean(i_gap) / mean_g if g_gap and mean_g else float("nan")
    lines += ["", f"- I3S - GaLore, seed-paired over seeds {pair}: {summary(diff)} nats "
              f"({'I3S better' if statistics.fmean(diff) < 0 else 'GaLore better'} on average; "
              f"{sum(d < 0 for d in diff)} of {len(diff)} seeds favour I3S).",
              f"- Relative reduction of GaLore's gap to fair AdamW by I3S over seeds {seeds}: {reduction:+.1%} "
              f"(GaLore's gap {mean_g:+.4f}, I3S's {statistics.fmean(i_gap) if i_gap else float('nan'):+.4f})"
              + (f"; spread of the seed-paired I3S - GaLore difference relative to GaLore's gap: "
                 f"± {statistics.stdev(diff) / abs(mean_g):.1%}." if len(diff) >= 2 and g_gap and mean_g else
                 "; one seed: no uncertainty can be given.")]
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality_small.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("run", "report"))
    ap.add_argument("--out", default="runs/quality", type=Path)
    ap.add_argument("--results", default="benchmarks/results", type=Path)
    ap.add_argument("--jobs", type=int, default=1, help="compares run side by side (one thread each)")
    ap.add_argument("--chosen", help="skip the sweeps and run the full runs at these lrs, e.g. "
                    "galore=1e-2,i3s=1e-2,adamw-fair=3e-4 (the report then reads the sweep table from "
                    "RESULTS/quality_small_sweeps.csv)")
    args = ap.parse_args()
    given = parse_chosen(args.chosen)
    run(args.out, args.jobs, given) if args.action == "run" else report(args.out, args.results, given)


if __name__ == "__main__":
    main()
