"""`subspace finetune`: prompted fine-tuning of a pretrained causal LM with MeZO, SubZero or AdamW.

The recipe is MeZO's (arXiv 2305.17333; SubZero, arXiv 2410.08989, reuses it): each example is a
prompt, the loss is cross-entropy over the label words' next-token logits, and the zeroth-order
optimizers see only forward passes (two per step, same batch, model in eval mode so dropout is off,
under torch.no_grad). AdamW (first order, backward) is the reference, also in eval mode so that all
three optimize the same deterministic function. Reports accuracy and loss before and after, the
loss curve, forward/backward passes used and the peak memory of the training window, and writes
`results.json`, `results.md` and `loss.png` into the run directory.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

OPTIMIZERS = ("mezo", "subzero", "adamw")
DEFAULT_LR = {"mezo": 1e-5, "subzero": 1e-5, "adamw": 1e-5}


@dataclass
class FinetuneConfig:
    model: str = "smollm2-135m"
    task: str = "kjv-testament"
    eval_file: str | None = None
    template: str | None = None
    label_words: list[str] | None = None
    optimizer: str = "mezo"
    trainable: str | None = None  # regex on parameter names (re.search); None: all parameters
    steps: int = 100
    batch_size: int = 16
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    eps: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    rank: int = 8
    update_proj_gap: int = 1000
    estimator: str = "two-sided"
    nonfinite: str = "skip"
    n_train: int = 512
    n_eval: int = 200
    max_length: int = 64
    eval_batch_size: int = 32
    seed: int = 0
    data_seed: int = 0
    out_dir: str | None = None
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    progress: bool = True

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("steps", "batch_size", "n_train", "n_eval", "max_length", "eval_batch_size"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'steps' else 1}, got {getattr(self, name)}")


# ------------------------------------------------------------------------------- memory probe
def reset_peak_memory(device: torch.device) -> str:
    """Start a peak-memory window; returns the method used (for the report)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated"
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after /proc/self/clear_refs reset (peak RSS of the window)"
    except OSError:
        return "ru_maxrss (lifetime peak RSS; could not reset)"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------- pieces
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of step `step`: a keyed draw without replacement, independent of the global RNG."""
    from subspace_optim.rng import generator_for

    perm = torch.randperm(n, generator=generator_for(seed, "finetune-batch", step))
    return perm[:min(batch_size, n)].tolist()


def make_closure(scorer, task, idx: list[int]):
    """The zeroth-order closure: loss of a fixed batch, model in eval mode, no autograd graph."""
    prompts = [task.prompt(task.train[i][0]) for i in idx]
    labels = [task.train[i][1] for i in idx]

    def closure():
        scorer.model.eval()  # dropout off: both evaluations must see the same function
        with torch.no_grad():
            return scorer.loss(prompts, labels)

    return closure


@torch.no_grad()
def evaluate(scorer, examples, batch_size: int, task, progress: bool = False) -> dict:
    from tqdm.auto import tqdm

    scorer.model.eval()
    correct, loss_sum = 0, 0.0
    starts = range(0, len(examples), batch_size)
    for s in tqdm(starts, desc="eval", leave=False, disable=not progress):
        chunk = examples[s:s + batch_size]
        logits = scorer.logits([task.prompt(t) for t, _ in chunk])
        y = torch.tensor([l for _, l in chunk], device=logits.device)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(examples), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": len(examples),
            "forward_passes": len(starts)}


def build_optimizer(cfg: FinetuneConfig, model):
    from subspace_optim.zeroth_order import MeZO, SubZero

    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    common = dict(lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                  seed=cfg.seed, estimator=cfg.estimator, nonfinite=cfg.nonfinite)
    if cfg.optimizer == "mezo":
        return MeZO(params, **common)
    if cfg.optimizer == "subzero":
        return SubZero(params, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, **common)
    return torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------- the run
def finetune(cfg: FinetuneConfig) -> dict:
    from tqdm.auto import tqdm

    from .pretrained import VerbalizerScorer, load_model
    from .tasks import load_task

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    task = load_task(cfg.task, eval_file=cfg.eval_file, template=cfg.template,
                     label_words=cfg.label_words, n_train=cfg.n_train, n_eval=cfg.n_eval,
                     seed=cfg.data_seed)
    if not task.train or not task.eval:
        raise ValueError(f"task {task.name!r} has {len(task.train)} train / {len(task.eval)} eval examples")
    texts = [task.prompt(t) for t, _ in task.train + task.eval] + task.label_words
    model, tok = load_model(cfg.model, texts, seed=cfg.seed)
    model.to(device).eval()
    if cfg.trainable:
        pattern = re.compile(cfg.trainable)
        for n, p in model.named_parameters():
            p.requires_grad_(bool(pattern.search(n)))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"--trainable {cfg.trainable!r} matches no parameter")
    scorer = VerbalizerScorer(model, tok, task.label_words, cfg.max_length)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    before = evaluate(scorer, task.eval, cfg.eval_batch_size, task, cfg.progress)
    opt = build_optimizer(cfg, model)
    zo = cfg.optimizer != "adamw"
    losses, skipped = [], 0
    memory_method = reset_peak_memory(device)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"finetune {cfg.optimizer}", disable=not cfg.progress)
    for step in bar:
        idx = batch_indices(len(task.train), cfg.batch_size, cfg.seed, step)
        closure = make_closure(scorer, task, idx)
        if zo:
            counter = opt.param_groups[0]["step"]
            loss = float(opt.step(closure))
            skipped += int(opt.param_groups[0]["step"] == counter)
        else:
            opt.zero_grad(set_to_none=True)
            model.eval()
            out = scorer.loss([task.prompt(task.train[i][0]) for i in idx], [task.train[i][1] for i in idx])
            loss = float(out.detach())
            if not math.isfinite(loss):  # same policy as the zeroth-order optimizers
                if cfg.nonfinite == "error":
                    raise RuntimeError(f"non-finite loss {loss} at step {step}")
                skipped += 1
            else:
                out.backward()
                opt.step()
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
    train_seconds = time.perf_counter() - t0
    peak_mb = peak_memory_mb(device)
    after = evaluate(scorer, task.eval, cfg.eval_batch_size, task, cfg.progress)

    result = {
        "config": asdict(cfg), "task": task.describe(), "trainable_params": n_params,
        "before": before, "after": after, "train_losses": losses, "skipped_steps": skipped,
        "train_forward_passes": cfg.steps * (2 if zo else 1),
        "train_backward_passes": 0 if zo else cfg.steps,
        "train_examples_forwarded": cfg.steps * min(cfg.batch_size, len(task.train)) * (2 if zo else 1),
        "eval_forward_passes": before["forward_passes"] + after["forward_passes"],
        "peak_memory_mb": peak_mb, "peak_memory_method": memory_method,
        "train_seconds": train_seconds, "device": str(device),
    }
    out_dir = cfg.out_dir or os.path.join("runs", f"finetune-{task.name}-{cfg.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}")
    write_results(Path(out_dir), result)
    result["out_dir"] = out_dir
    return result


def write_results(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    c, b, a = result["config"], result["before"], result["after"]
    md = [f"# finetune: {c['model']} on {result['task']['name']} with {c['optimizer']}", "",
          "| | accuracy | loss |", "|---|---|---|",
          f"| before | {b['accuracy']:.4f} | {b['loss']:.4f} |",
          f"| after | {a['accuracy']:.4f} | {a['loss']:.4f} |", "",
          f"- steps {c['steps']}, batch {c['batch_size']}, lr {c['lr']}, seed {c['seed']}",
          f"- training forward passes {result['train_forward_passes']}, backward passes "
          f"{result['train_backward_passes']}, skipped steps {result['skipped_steps']}",
          f"- peak memory of the training window {result['peak_memory_mb']:.1f} MiB "
          f"({result['peak_memory_method']})",
          f"- training time {result['train_seconds']:.1f} s on {result['device']}", ""]
    (out_dir / "results.md").write_text("\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(result["train_losses"])
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (batch)")
        ax.set_title(f"{c['optimizer']} on {result['task']['name']}")
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="prompted fine-tuning with MeZO, SubZero or AdamW",
                              description=__doc__)
    d = FinetuneConfig()
    p.add_argument("--model", default=d.model,
                   help="smollm2-135m (embedded, offline), tiny-random, or a Hugging Face name/path")
    p.add_argument("--task", default=d.task,
                   help="kjv-testament (embedded), a .jsonl file of {text, label}, or a HF dataset (sst2)")
    p.add_argument("--eval-file", default=None, help="jsonl eval file (else the task file is split)")
    p.add_argument("--template", default=None, help='prompt with "{text}"')
    p.add_argument("--label-words", default=None, help="comma-separated, one per class, e.g. ' no, yes'")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--trainable", default=None,
                   help="regex on parameter names to fine-tune (default: all), e.g. 'layers\\.2[6-9]'")
    for name in ("steps", "batch_size", "rank", "update_proj_gap", "n_train", "n_eval",
                 "max_length", "eval_batch_size", "seed", "data_seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=None, help=f"default per optimizer: {DEFAULT_LR}")
    for name in ("eps", "weight_decay", "momentum"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--estimator", choices=("two-sided", "one-sided"), default=d.estimator)
    p.add_argument("--nonfinite", choices=("error", "skip"), default=d.nonfinite)
    p.add_argument("--out-dir", default=None, help="run directory (default runs/finetune-...)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is often faster on a busy shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.set_defaults(func=run)


def config_from_args(args) -> FinetuneConfig:
    words = None
    if args.label_words:
        words = [w if w.startswith(" ") else " " + w for w in (s.strip() for s in args.label_words.split(","))]
    fields = {k: getattr(args, k) for k in ("model", "task", "eval_file", "template", "optimizer", "trainable",
                                            "steps", "batch_size", "lr", "eps", "weight_decay",
                                            "momentum", "rank", "update_proj_gap", "estimator",
                                            "nonfinite", "n_train", "n_eval", "max_length",
                                            "eval_batch_size", "seed", "data_seed", "out_dir", "device",
                                            "threads")}
    return FinetuneConfig(label_words=words, progress=not args.no_progress, **fields)


def run(args) -> int:
    result = finetune(config_from_args(args))
    summary = {k: result[k] for k in ("out_dir", "train_forward_passes", "peak_memory_mb", "train_seconds")}
    summary.update(before=result["before"]["accuracy"], after=result["after"]["accuracy"],
                   loss_before=result["before"]["loss"], loss_after=result["after"]["loss"])
    print(json.dumps(summary, indent=1))
    return 0
