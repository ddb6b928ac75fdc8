"""Where does GaLore's subspace freeze? Overlap between consecutive subspaces, per weight type and
depth, and how it moves with rank, refresh gap, model size, batch size and training length.

    .venv/bin/python benchmarks/overlap_study.py run    [--out runs/overlap] [--only NAME,...]
    .venv/bin/python benchmarks/overlap_study.py report [--out runs/overlap] [--results benchmarks/results]

`run` trains each configuration of `STUDY` with `subspace pretrain` (one thread; a configuration
whose run directory already holds `summary.json` is skipped, so the study can be stopped and
restarted). `report` reads every run's `overlap.jsonl` (one record per refresh of each projected
weight: the overlap ``||P_prev^T P||_F^2 / r`` of its new basis with the previous one; 1 = frozen,
about r / k = unrelated random subspaces) and writes `overlap_study.md` and plots:
- per weight type (q, k, v, o, gate, up, down) and per layer: the mean overlap over the second half
  of training, next to the r / k of random subspaces;
- one factor at a time from the base (tiny LLaMA, KJV, GaLore, lr 2e-2, rank 32, gap 12, batch 8,
  600 steps): rank 8-64, gap 4-50, model micro/tiny/small (rank = hidden / 4), batch 8 / 32, and a
  3,000-step run for training length; I3S at the base for comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

BASE = dict(model="tiny", optimizer="galore", lr=2e-2, rank=32, update_proj_gap=12, batch_size=8,
            steps=600)
# the projected dimension k of every attention/MLP weight (GaLore projects the smaller side)
HIDDEN = {"micro": 32, "tiny": 128, "small": 256}
STUDY = {  # name -> changes to BASE; "factor" groups the one-at-a-time variations
    "base": {},
    "rank8": {"rank": 8}, "rank16": {"rank": 16}, "rank64": {"rank": 64},
    "gap4": {"update_proj_gap": 4}, "gap50": {"update_proj_gap": 50},
    "micro": {"model": "micro", "rank": 8}, "small": {"model": "small", "rank": 64},
    "batch32": {"batch_size": 32},
    "long": {"steps": 3000},
    "i3s": {"optimizer": "i3s"},
}
FACTORS = [("rank", ["rank8", "rank16", "base", "rank64"]), ("gap", ["gap4", "base", "gap50"]),
           ("model (rank = hidden/4)", ["micro", "base", "small"]), ("batch", ["base", "batch32"]),
           ("steps", ["base", "long"]), ("method", ["base", "i3s"])]
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def settings(name: str) -> dict:
    return {**BASE, **STUDY[name]}


def command(name: str, out: Path) -> list[str]:
    s = settings(name)
    args = [sys.executable, "-m", "subspace_lab.cli", "pretrain", "--out-dir", str(out / name),
            "--threads", "1", "--no-progress", "--eval-every", "100", "--seed", "0"]
    for key, value in s.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def run(out: Path, only: list[str] | None) -> None:
    for name in only or STUDY:
        if (out / name / "summary.json").exists():
            print(f"[overlap-study] {name}: done already", flush=True)
            continue
        print(f"[overlap-study] {name}: {settings(name)}", flush=True)
        subprocess.run(command(name, out), check=True)


def weight_type(name: str) -> tuple[str, int]:
    layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
    return next(t for t in TYPES if t in name), layer


def summarise(run_dir: Path, steps: int) -> dict:
    """Mean overlap over the second half of training, overall, per type and per layer; the curve."""
    by_type, by_layer, curve = defaultdict(list), defaultdict(list), defaultdict(list)
    for line in (run_dir / "overlap.jsonl").read_text().splitlines():
        rec = json.loads(line)
        curve[rec["step"]].append(rec["overlap"])
        if rec["step"] <= steps // 2:
            continue
        wtype, layer = weight_type(rec["name"])
        by_type[wtype].append(rec["overlap"])
        by_layer[layer].append(rec["overlap"])
    summary = json.loads((run_dir / "summary.json").read_text())
    late = [v for vs in by_type.values() for v in vs]
    return {"mean": statistics.fmean(late), "types": {t: statistics.fmean(v) for t, v in by_type.items()},
            "layers": {k: statistics.fmean(v) for k, v in sorted(by_layer.items())},
            "curve": sorted((s, statistics.fmean(v)) for s, v in curve.items()),
            "val_loss": summary["final_val_loss"]}


def report(out: Path, results: Path) -> None:
    rows = {name: summarise(out / name, settings(name)["steps"]) for name in STUDY
            if (out / name / "summary.json").exists()}
    lines = ["# Subspace overlap between consecutive refreshes: where does GaLore's subspace freeze?", "",
             "Runs: `python benchmarks/overlap_study.py run` (KJV, seed 0, one thread); this page: "
             "`python benchmarks/overlap_study.py report`. Overlap = ||P_prev^T P||_F^2 / r, the mean "
             "squared cosine of the principal angles between a weight's new basis and its previous one "
             "(1 = frozen; r / k = unrelated random subspaces). 'late' = mean over the refreshes in the "
             "second half of training.", "",
             "## One factor at a time (base: " + ", ".join(f"{k} {v}" for k, v in BASE.items()) + ")", "",
             "| factor | run | setting | late overlap (all weights) | random r/k | normalised (0 random, 1 frozen) | val loss |",
             "|---|---|---|---|---|---|---|"]
    for factor, names in FACTORS:
        for name in names:
            if name not in rows:
                continue
            s = settings(name)
            changed = ", ".join(f"{k} {v}" for k, v in STUDY[name].items()) or "base"
            rk = s["rank"] / HIDDEN[s["model"]]
            norm = (rows[name]["mean"] - rk) / (1 - rk)
            lines.append(f"| {factor} | {name} | {changed} | {rows[name]['mean']:.3f} | {rk:.3f} | "
                         f"{norm:.3f} | {rows[name]['val_loss']:.3f} |")
    lines += ["", "## Per weight type (late overlap)", "",
              "| run | " + " | ".join(t.replace("_proj", "") for t in TYPES) + " |",
              "|---|" + "---|" * len(TYPES)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['types'].get(t, float('nan')):.3f}" for t in TYPES) + " |")
    lines += ["", "## Per layer (late overlap, all types)", "", "| run | " + " | ".join(
        f"layer {i}" for i in range(max(len(r["layers"]) for r in rows.values()))) + " |",
        "|---|" + "---|" * max(len(r["layers"]) for r in rows.values())]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["layers"].values()) + " |")
    results.mkdir(parents=True, exist_ok=True)
    (results / "overlap_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, results)


def plot(rows: dict, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name in ("base", "long", "i3s", "rank8", "rank64", "batch32", "small"):
        if name in rows:
            steps, values = zip(*rows[name]["curve"])
            axes[0].plot(steps, values, label=name, lw=1)
    axes[0].set(xlabel="step", ylabel="overlap with previous subspace", title="Overlap over training")
    axes[0].legend(fontsize=8)
    for name in ("base", "long", "i3s"):
        if name in rows:
            t = rows[name]["types"]
            axes[1].plot([x.replace("_proj", "") for x in TYPES], [t.get(x, float("nan")) for x in TYPES],
                         marker="o", label=name)
    axes[1].set(ylabel="late overlap", title="Per weight type")
    axes[1].legend(fontsize=8)
    for factor, names in FACTORS[:3]:
        present = [n for n in names if n in rows]
        axes[2].plot(range(len(present)), [rows[n]["mean"] for n in present], marker="o", label=factor)
        for i, n in enumerate(present):
            axes[2].annotate(n, (i, rows[n]["mean"]), fontsize=7)
    axes[2].set(ylabel="late overlap", title="One factor at a time")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "overlap_study.png", dpi=110)
    print(f"plot: {results / 'overlap_study.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("run", "report"))
    ap.add_argument("--out", default="runs/overlap", type=Path)
    ap.add_argument("--results", default="benchmarks/results", type=Path)
    ap.add_argument("--only", default=None, help="comma list of run names from STUDY")
    args = ap.parse_args()
    if args.action == "run":
        run(args.out, args.only.split(",") if args.only else None)
    else:
        report(args.out, args.results)


if __name__ == "__main__":
    main()
