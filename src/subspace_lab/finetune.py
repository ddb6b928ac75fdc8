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

import inspect
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from subspace_optim.checks import NONFINITE_POLICIES
from subspace_optim.zeroth_order import MeZO, SubZero

from .metrics import peak_memory_mb, reset_peak_memory

OPTIMIZERS = ("mezo", "subzero", "adamw")
DEFAULT_LR = {"mezo": 1e-5, "subzero": 1e-5, "adamw": 1e-5}
ESTIMATORS = ("two-sided", "one-sided")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _subzero_default(name: str):
    """SubZero's own default for `name` (one source: the library's signature)."""
    return inspect.signature(SubZero).parameters[name].default


@dataclass
class FinetuneConfig:
    """Every field is a flag of `subspace finetune` (`commands/finetune.py`)."""

    model: str = _f("smollm2-135m", "smollm2-135m (embedded, offline), tiny-random, or a Hugging "
                    "Face name/path")
    task: str = _f("kjv-testament", "kjv-testament (embedded), a .jsonl file of {text, label}, or "
                   "a Hugging Face dataset (sst2)")
    eval_file: str | None = _f(None, "jsonl eval file (else the task file is split)")
    template: str | None = _f(None, 'prompt with "{text}"')
    label_words: list[str] | None = _f(None, "one per class, e.g. ' no' ' yes' (on the command "
                                       "line also 'no,yes'; a leading space is added)")
    optimizer: str = _f("mezo", "optimizer", choices=OPTIMIZERS)
    trainable: str | None = _f(None, "regex on parameter names to fine-tune (re.search; default: "
                               "all), e.g. 'layers\\.2[6-9]'")
    steps: int = _f(100, "optimizer steps (>= 0)")
    batch_size: int = _f(16, "examples per step")
    lr: float | None = _f(None, f"learning rate (default per optimizer: {DEFAULT_LR})")
    eps: float = _f(1e-3, "zeroth-order perturbation size")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    momentum: float = _f(0.0, "zeroth-order momentum")
    rank: int = _f(_subzero_default("rank"), "SubZero's subspace rank")
    update_proj_gap: int = _f(_subzero_default("update_proj_gap"),
                              "SubZero's steps between subspace refreshes")
    reshape_min_dim: int = _f(_subzero_default("reshape_min_dim"),
                              "SubZero: a matrix whose smaller side is below this is reshaped to "
                              "its most-square factorisation first (0: never)")
    exact_restore: bool = _f(False, "MeZO/SubZero: copy the weights back bitwise after the two "
                             "evaluations (one extra copy of the trainable weights) instead of "
                             "subtracting the perturbation (exact to rounding)")
    estimator: str = _f("two-sided", "zeroth-order gradient estimator", choices=ESTIMATORS)
    nonfinite: str = _f("skip", "non-finite loss: 'error' aborts, 'skip' skips the step",
                        choices=NONFINITE_POLICIES)
    n_train: int = _f(512, "training examples")
    n_eval: int = _f(200, "evaluation examples")
    max_length: int = _f(64, "tokens per prompt")
    eval_batch_size: int = _f(32, "examples per evaluation forward pass")
    seed: int = _f(0, "seed of the optimizer and the batches")
    data_seed: int = _f(0, "seed of the train/eval split")
    out_dir: str | None = _f(None, "run directory (default runs/finetune-...)")
    device: str = _f("cpu", "torch device")
    threads: int | None = _f(None, "torch CPU threads (1 is often faster on a busy shared "
                             "machine; default: torch's)")
    progress: bool = _f(True, "show tqdm progress bars")

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("steps", "batch_size", "n_train", "n_eval", "max_length", "eval_batch_size"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'steps' else 1}, got {getattr(self, name)}")


# ------------------------------------------------------------------------------------- pieces
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of step `step`: a keyed draw without replacement, independent of the global RNG."""
    from subspace_optim.rng import generator_for

    perm = torch.randperm(n, generator=generator_for(seed, "finetune-batch", step))
    return perm[:min(batch_size, n)].tolist()


def make_closure(scorer, task, idx: list[int], optimizer: torch.optim.Optimizer | None = None):
    """The step's closure (torch.optim's convention): the loss of a fixed batch, model in eval
    mode. Zeroth order (`optimizer` None): no autograd graph. First order: zero the gradients and
    backpropagate the loss if it is finite (a non-finite one leaves every gradient None, so the
    step changes nothing)."""
    prompts = [task.prompt(task.train[i][0]) for i in idx]
    labels = [task.train[i][1] for i in idx]

    def closure():
        scorer.model.eval()  # dropout off: both evaluations must see the same function
        if optimizer is None:
            with torch.no_grad():
                return scorer.loss(prompts, labels)
        optimizer.zero_grad(set_to_none=True)
        loss = scorer.loss(prompts, labels)
        if torch.isfinite(loss):
            loss.backward()
        return loss.detach()

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
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    common = dict(lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                  seed=cfg.seed, estimator=cfg.estimator, nonfinite=cfg.nonfinite,
                  exact_restore=cfg.exact_restore)
    if cfg.optimizer == "mezo":
        return MeZO(params, **common)
    if cfg.optimizer == "subzero":
        return SubZero(params, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
                       reshape_min_dim=cfg.reshape_min_dim, **common)
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
        loss = float(opt.step(make_closure(scorer, task, idx, None if zo else opt)))
        if not zo and not math.isfinite(loss):  # no gradient, so no update: the zeroth-order policy
            if cfg.nonfinite == "error":
                raise RuntimeError(f"non-finite loss {loss} at step {step}; no update was applied")
            skipped += 1
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
    if zo:  # the zeroth-order optimizers count their skips themselves
        skipped = opt.skipped_steps
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
