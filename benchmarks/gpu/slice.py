"""One resumable slice of a LLaMA-60M pretraining run on a GPU (GaLore's 60M shape, rank 128, gap 200).

    python benchmarks/gpu/slice.py --method galore [--slice-steps 2000] [--root runs/gpu60m]

Each call continues the method's run from its newest valid checkpoint (`subspace pretrain
--resume`) for at most `--slice-steps` steps, checkpoints and stops (`--stop-at`), so a run of
`--total-steps` advances in slices that each fit a short GPU lease (no GPU speed has been
measured yet: pick `--slice-steps` from the first slice's log). A slice that finds the
run finished only prints its summary. Settings (the same for every method, as in a fair
comparison): GaLore's 60M LLaMA (hidden 512, 8 layers, vocab 32000 from a BPE trained on the
corpus), sequence 256, batch 16, warmup 10% then cosine to 10%, clip 1.0, bf16 autocast, rank 128
on every attention/MLP matrix, refresh every 200 steps (50 refreshes in the default 10,000
steps), scale 0.25; learning rates are GaLore's (AdamW 1e-3, subspace methods 1e-2) unless
`--lr` is given. The corpus is the embedded KJV Bible (about 1M tokens), so the default run
passes over it many times: point `--source` at your own text or a Hugging Face dataset for a
real pretraining run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

LRS = {"adamw": 1e-3, "galore": 1e-2, "i3s": 1e-2}


def latest_step(run_dir: Path) -> int:
    from subspace_lab.checkpoint import find_latest_valid, read_manifest

    path = find_latest_valid(run_dir / "checkpoints", clean=False)
    return int(read_manifest(path)["step"]) if path is not None else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True, choices=sorted(LRS))
    ap.add_argument("--root", default="runs/gpu60m", type=Path)
    ap.add_argument("--slice-steps", type=int, default=2000)
    ap.add_argument("--total-steps", type=int, default=10_000)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--dense-lr", type=float, default=None,
                    help="lr of the parameters outside the projected matrices (a fair AdamW: the subspace runs' lr)")
    ap.add_argument("--source", default="kjv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="60m", help="another shape for a quick check (e.g. micro)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vocab-size", type=int, default=32000)
    args = ap.parse_args()
    run_dir = args.root / f"{args.method}-seed{args.seed}"
    done = latest_step(run_dir) if run_dir.exists() else 0
    if done >= args.total_steps:
        print((run_dir / "summary.json").read_text())
        return 0
    stop = min(done + args.slice_steps, args.total_steps)
    cmd = [sys.executable, "-m", "subspace_lab.cli", "pretrain", "--model", args.model,
           "--optimizer", args.method, "--lr", str(args.lr or LRS[args.method]),
           "--source", args.source, "--vocab-size", str(args.vocab_size), "--seq-len", "256",
           "--batch-size", "16", "--steps", str(args.total_steps), "--stop-at", str(stop),
           "--checkpoint-every", str(args.slice_steps), "--keep-last-k", "1",
           "--eval-every", "1000", "--eval-batches", "16", "--log-every", "100",
           "--seed", str(args.seed), "--device", args.device, "--out-dir", str(run_dir), "--no-progress"]
    if args.dense_lr is not None:
        cmd += ["--dense-lr", str(args.dense_lr)]
    if args.method != "adamw":
        cmd += ["--rank", "128", "--update-proj-gap", "200", "--scale", "0.25"]
    if done:
        cmd.append("--resume")
    print(f"[slice] {args.method}: steps {done} -> {stop} of {args.total_steps}", flush=True)
    subprocess.run(cmd, check=True)
    summary = run_dir / "summary.json"
    if summary.exists():
        print(json.dumps({k: v for k, v in json.loads(summary.read_text()).items()
                          if not isinstance(v, (list, dict))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
