"""Tables and plots from a run directory's JSON-lines files (matplotlib, Agg backend).

A run directory is either one training run (it holds `summary.json`, `metrics.jsonl`) or a
comparison whose sub-directories are runs. `write_report(dir)` (re)draws `results.csv`,
`results.md` (per optimizer: mean and std over seeds), `val_loss.png` and `overlap.png` (mean
overlap of consecutive subspaces over training, per optimizer: the I3S paper's frozen-subspace
picture; 1.0 means the refresh picked the same subspace again).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .metrics import read_jsonl

COLUMNS = ("optimizer", "seed", "lr", "steps", "final_val_loss", "final_val_ppl",
           "optimizer_state_mb", "peak_memory_mb", "peak_memory_kind", "tokens_per_s",
           "refresh_time_s", "skipped_steps", "run")


def find_runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if (root / "summary.json").exists():
        return [root]
    runs = sorted(p.parent for p in root.glob("*/summary.json"))
    if not runs:
        raise FileNotFoundError(f"no runs under {root} (expected summary.json in it or in its "
                                f"sub-directories)")
    return runs


def load_rows(root: str | Path) -> list[dict]:
    rows = []
    for run in find_runs(root):
        s = json.loads((run / "summary.json").read_text())
        rows.append({"optimizer": s.get("optimizer"), "seed": s.get("seed"), "lr": s.get("lr"),
                     "steps": s.get("steps"), "final_val_loss": s.get("final_val_loss"),
                     "final_val_ppl": s.get("final_val_ppl"),
                     "optimizer_state_mb": s.get("optimizer_state_bytes", 0) / 2**20,
                     "peak_memory_mb": s.get("peak_memory_mb"),
                     "peak_memory_kind": s.get("peak_memory_kind"),
                     "tokens_per_s": s.get("tokens_per_s"),
                     "refresh_time_s": s.get("refresh_time_s"),
                     "skipped_steps": s.get("skipped_steps"),
                     "run": str(run)})
    return rows


def _mean_std(xs: list) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    if not all(math.isfinite(x) for x in xs):  # a diverged seed (ppl inf): no spread to show
        return statistics.fmean(xs), None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(mean, std, digits=3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (optimizer, lr), in first-seen order: mean and std over seeds of each quantity.
    `best` marks the lr with the lowest mean validation loss of its optimizer (lr sweeps)."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["optimizer"], r["lr"])].append(r)
    out = []
    for (name, lr), rs in by.items():
        agg = {"optimizer": name, "seeds": len(rs), "lr": lr}
        for k in ("final_val_loss", "final_val_ppl", "optimizer_state_mb", "peak_memory_mb",
                  "tokens_per_s", "refresh_time_s"):
            agg[k] = _mean_std([r.get(k) for r in rs])
        out.append(agg)
    for name in {a["optimizer"] for a in out}:
        mine = [a for a in out if a["optimizer"] == name and a["final_val_loss"][0] is not None]
        if len(mine) > 1:
            min(mine, key=lambda a: a["final_val_loss"][0])["best"] = True
    return out


def markdown_table(rows: list[dict], command: str | None = None) -> str:
    mem_kind = rows[0].get("peak_memory_kind") if rows else None
    mem_col = "peak GPU mem (MB)" if mem_kind == "cuda_max_allocated" else "peak RSS (MB)"
    lines = [f"| optimizer | lr | seeds | val loss | val ppl | optimizer state (MB) | {mem_col} "
             f"| tokens/s | refresh time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for a in aggregate(rows):
        lr = f"{a['lr']:g}" + (" (best)" if a.get("best") else "")
        lines.append(f"| {a['optimizer']} | {lr} | {a['seeds']} | "
                     f"{_fmt(*a['final_val_loss'])} | {_fmt(*a['final_val_ppl'], digits=2)} | "
                     f"{_fmt(*a['optimizer_state_mb'], digits=2)} | "
                     f"{_fmt(*a['peak_memory_mb'], digits=0)} | {_fmt(*a['tokens_per_s'], digits=0)} | "
                     f"{_fmt(*a['refresh_time_s'], digits=2)} |")
    text = "\n".join(lines) + "\n"
    text += ("\nMean ± std over seeds. Validation perplexity = exp(token-weighted mean NLL) on the "
             "fixed held-out set. Optimizer state = bytes of every tensor in the optimizer's "
             "state_dict. Tokens/s excludes evaluation and checkpointing; it includes subspace refreshes, whose "
             "extra time (refresh steps' optimizer time over the median plain step, summed) is "
             "shown separately. Peak memory: on CUDA, "
             "max_memory_allocated of the run; on CPU, the process's peak resident set size "
             "(VmHWM, reset at every logging window; it includes the Python/torch runtime, "
             "~0.5-1 GB).\n")
    if command:
        text += f"\nReproduce with:\n\n    {command}\n"
    return text


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_val_loss(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for r in rows:
        evals = [e for e in read_jsonl(Path(r["run"]) / "metrics.jsonl") if e.get("event") == "eval"
                 and e.get("val_loss") is not None]
        if not evals:
            continue
        name = f"{r['optimizer']} (lr {r['lr']:g})"
        line, = ax.plot([e["tokens"] / 1e6 for e in evals], [e["val_loss"] for e in evals],
                        color=colors.get(name), alpha=0.85, label=None if name in colors else name)
        colors.setdefault(name, line.get_color())
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def overlap_curve(run: str | Path) -> tuple[list[int], list[float]]:
    """Mean overlap over projected params at each refresh step of one run."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for rec in read_jsonl(Path(run) / "overlap.jsonl"):
        by_step[rec["step"]].append(rec["overlap"])
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot_overlap(rows: list[dict], path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    drawn = False
    for r in rows:
        steps, ov = overlap_curve(r["run"])
        if not steps:
            continue
        name = f"{r['optimizer']} (lr {r['lr']:g})"
        line, = ax.plot(steps, ov, marker=".", color=colors.get(name), alpha=0.85,
                        label=None if name in colors else name)
        colors.setdefault(name, line.get_color())
        drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel("overlap with the previous subspace")
    ax.set_ylim(0, 1.02)
    ax.set_title("Subspace overlap between consecutive refreshes\n"
                 "(mean over projected weights; 1 = frozen subspace)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_report(root: str | Path) -> dict[str, Path]:
    """(Re)write the tables and plots of a run or comparison directory; returns their paths."""
    root = Path(root)
    rows = load_rows(root)
    cmd_file = root / "command.txt"
    command = cmd_file.read_text().strip() if cmd_file.exists() else None
    paths = {"csv": root / "results.csv", "markdown": root / "results.md",
             "val_loss_plot": root / "val_loss.png", "overlap_plot": root / "overlap.png"}
    write_csv(rows, paths["csv"])
    paths["markdown"].write_text("# Results\n\n" + markdown_table(rows, command))
    plot_val_loss(rows, paths["val_loss_plot"])
    plot_overlap(rows, paths["overlap_plot"])
    return paths
