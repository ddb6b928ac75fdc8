"""Save real gradients from a lab pretraining run, for the refresh benchmark and the I3S pool study.

Runs `subspace_lab.train.train` (the same loop as `subspace pretrain`) with an I3S optimizer whose
step pre-hook copies the gradients of a few projected weights at a few steps (after clipping: the
gradients the optimizer itself sees) into one `torch.save` file: {"meta": ..., "grads": {"name@step":
tensor}}.

    .venv/bin/python benchmarks/save_gradients.py --model tiny --steps 600 --save-steps 1,100,300,600 \
        --out runs/gradients/tiny.pt
    .venv/bin/python benchmarks/save_gradients.py --model 60m --steps 30 --batch-size 4 \
        --save-steps 1,10,30 --out runs/gradients/60m.pt
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from subspace_lab import optimizers as lab_optimizers
from subspace_lab.compare import default_compare_config
from subspace_lab.train import train

DEFAULT_WEIGHTS = r"layers\.(1|2)\.(self_attn\.(q|o)_proj|mlp\.(gate|up|down)_proj)\.weight$"


def recording_builder(base, pattern: re.Pattern, steps: set[int], sink: dict):
    """The lab builder `base`, with a step pre-hook that copies matching gradients at `steps`."""
    def build(model, options):
        opt = base(model, options)
        counter = {"step": 0}

        def hook(optimizer, args, kwargs):
            counter["step"] += 1
            if counter["step"] not in steps:
                return
            for group in optimizer.param_groups:
                for name, p in zip(group.get("param_names", ()), group["params"]):
                    if p.grad is not None and pattern.search(name):
                        sink[f"{name}@{counter['step']}"] = p.grad.detach().to(torch.float32).clone()
        opt.register_step_pre_hook(hook)
        return opt
    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-steps", default="1,100,300,600")
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS, help="regex on parameter names")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cfg = default_compare_config()
    cfg.model.name, cfg.steps, cfg.batch_size, cfg.seed = args.model, args.steps, args.batch_size, args.seed
    cfg.optim.name, cfg.optim.lr = "i3s-record", args.lr
    cfg.eval_every, cfg.progress = 0, False
    cfg.out_dir = str(Path(args.out).with_suffix("")) + "-run"
    grads: dict[str, torch.Tensor] = {}
    steps = {int(s) for s in args.save_steps.split(",")}
    lab_optimizers.OPTIMIZERS["i3s-record"] = recording_builder(
        lab_optimizers.OPTIMIZERS["i3s"], re.compile(args.weights), steps, grads)
    result = train(cfg)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "optimizer": "i3s", "final_val_loss": result.final_val_loss}
    torch.save({"meta": meta, "grads": grads}, args.out)
    print(f"saved {len(grads)} gradients to {args.out}; final val loss {result.final_val_loss}")


if __name__ == "__main__":
    main()
