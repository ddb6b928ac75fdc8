"""Zeroth-order benchmark: memory of a MeZO / SubZero step vs a first-order AdamW step, and
accuracy of SubZero vs MeZO at equal forward passes on the embedded KJV task.

Memory (part 1). Each method runs in a fresh subprocess on a LlamaForCausalLM with SmolLM2-135M's
exact shapes (random weights: memory does not depend on the values, and it skips the 20 s GGUF
load). After building the model and batch, freed heap is returned to the OS (malloc_trim) and the
kernel's peak-RSS counter is reset (Linux `/proc/self/clear_refs` = 5); two optimizer steps run;
the peak RSS of that window (VmHWM) is the measurement, `inference` (two forwards) is the floor.
Alongside, an analytic count: parameter bytes, gradient bytes, optimizer-state bytes (the
state_dict's tensors) and, for AdamW, activation bytes saved for backward (counted with
`torch.autograd.graph.saved_tensors_hooks`). On CUDA, torch.cuda.max_memory_allocated is used.

Accuracy (part 2). The embedded SmolLM2-135M-Instruct (GGUF, offline) on `kjv-testament` (Old or
New Testament, MeZO-style prompt and label words). Both optimizers get the same steps (so the same
forward passes, 2 per step), batches, lr and eps, over several seeds; the table gives mean and
standard deviation of eval accuracy and loss. The defaults are sized for the shared 2-core CPU
(20 steps, batch 4, 64 eval examples, one torch thread, and only the last six decoder layers
fine-tuned with `--trainable`; `--trainable ''` tunes all 134.5M parameters). At this budget the
comparison mostly measures noise; raise --steps / --seeds / --n-eval on a real machine.

    .venv/bin/python benchmarks/bench_zeroth_order.py            # both parts
    .venv/bin/python benchmarks/bench_zeroth_order.py --skip-memory --steps 100 --seeds 0 1 2 3 4
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                      max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)


# ------------------------------------------------------------------------------ part 1: memory
def _vm_hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _memory_worker(method: str, batch: int, seq: int, layers: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from subspace_optim.zeroth_order import MeZO, SubZero

    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(SMOLLM2_SHAPES, num_hidden_layers=layers), use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    params = list(model.named_parameters())
    opt = None
    if method == "mezo":
        opt = MeZO(params, lr=1e-6)
    elif method == "subzero":
        opt = SubZero(params, lr=1e-6, rank=8)
    elif method == "adamw":
        opt = torch.optim.AdamW([p for _, p in params], lr=1e-6)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm_hwm_mb()
    saved = [0]
    t0 = time.perf_counter()
    for _ in range(2):
        if method == "inference":
            with torch.no_grad():
                loss_fn(), loss_fn()
        elif method == "adamw":
            opt.zero_grad(set_to_none=True)
            saved[0] = 0

            def pack(t):
                saved[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn()
            loss.backward()
            opt.step()
        else:
            opt.step(loss_fn)
    seconds = (time.perf_counter() - t0) / 2
    peak = _vm_hwm_mb()
    param_b = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_b = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state_b = 0
    if opt is not None:
        for st in opt.state_dict()["state"].values():
            state_b += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return {"method": method, "rss_before_mb": base, "peak_rss_mb": peak, "step_seconds": seconds,
            "param_mb": param_b / 2**20, "grad_mb": grad_b / 2**20, "state_mb": state_b / 2**20,
            "saved_activations_mb": saved[0] / 2**20,
            "largest_param_mb": max(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def memory_part(args) -> list[dict]:
    rows = []
    for method in ("inference", "mezo", "subzero", "adamw"):
        cmd = [sys.executable, __file__, "--memory-worker", method, "--mem-batch", str(args.mem_batch),
               "--mem-seq", str(args.mem_seq), "--mem-layers", str(args.mem_layers),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  memory {method}: {rows[-1]}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------- part 2: accuracy
def accuracy_part(args) -> dict:
    from subspace_lab.finetune import batch_indices, evaluate, make_closure
    from subspace_lab.pretrained import VerbalizerScorer, load_model
    from subspace_lab.tasks import kjv_testament_task
    from subspace_optim.zeroth_order import MeZO, SubZero

    import re

    task = kjv_testament_task(args.n_train, args.n_eval, seed=0)
    model, tok = load_model("smollm2-135m", [])
    model.eval()
    pattern = re.compile(args.trainable) if args.trainable else None
    for n, p in model.named_parameters():
        p.requires_grad_(pattern is None or bool(pattern.search(n)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = VerbalizerScorer(model, tok, task.label_words, args.max_length)
    before = evaluate(scorer, task.eval, 32, task)
    runs = []
    for method in ("mezo", "subzero"):
        for seed in args.seeds:
            model.load_state_dict(initial)
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if method == "mezo":
                opt = MeZO(params, lr=args.lr, eps=args.eps, seed=seed)
            else:
                opt = SubZero(params, lr=args.lr, eps=args.eps, seed=seed, rank=args.rank,
                              update_proj_gap=args.update_proj_gap)
            t0 = time.perf_counter()
            losses = []
            for step in range(args.steps):
                idx = batch_indices(len(task.train), args.batch_size, seed, step)
                losses.append(float(opt.step(make_closure(scorer, task, idx))))
            sec = (time.perf_counter() - t0) / max(args.steps, 1)
            after = evaluate(scorer, task.eval, 32, task)
            runs.append({"method": method, "seed": seed, "accuracy": after["accuracy"],
                         "loss": after["loss"], "sec_per_step": sec,
                         "first_train_loss": losses[0] if losses else None,
                         "mean_last10_train_loss": statistics.fmean(losses[-10:]) if losses else None})
            print(f"  {method} seed {seed}: acc {after['accuracy']:.4f} loss {after['loss']:.4f} "
                  f"({sec:.2f} s/step)", file=sys.stderr)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"before": before, "runs": runs, "trainable_params": n_trainable}


def _ms(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(mem: list[dict] | None, acc: dict | None, args) -> str:
    lines = []
    if mem:
        by = {r["method"]: r for r in mem}
        lines += [f"## Memory: SmolLM2-135M shapes ({args.mem_layers} layers), batch {args.mem_batch} x "
                  f"{args.mem_seq} tokens, fp32, CPU", "",
                  "| method | peak RSS of the step window (MiB) | vs inference | params | grads | "
                  "optimizer state | saved activations | s/step |", "|---|---|---|---|---|---|---|---|"]
        for m in ("inference", "mezo", "subzero", "adamw"):
            r = by[m]
            lines.append(f"| {m} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / by['inference']['peak_rss_mb']:.2f}x | "
                         f"{r['param_mb']:.0f} | {r['grad_mb']:.0f} | {r['state_mb']:.1f} | "
                         f"{r['saved_activations_mb']:.0f} | {r['step_seconds']:.2f} |")
        lines += ["", f"AdamW / MeZO peak: {by['adamw']['peak_rss_mb'] / by['mezo']['peak_rss_mb']:.2f}x; "
                  f"AdamW / SubZero: {by['adamw']['peak_rss_mb'] / by['subzero']['peak_rss_mb']:.2f}x; "
                  f"SubZero / MeZO: {by['subzero']['peak_rss_mb'] / by['mezo']['peak_rss_mb']:.3f}x", ""]
    if acc:
        lines += [f"## Accuracy at equal forward passes: SmolLM2-135M-Instruct on kjv-testament",
                  f"{args.steps} steps x 2 forwards x batch {args.batch_size}, lr {args.lr}, eps {args.eps}, "
                  f"SubZero rank {args.rank}, F {args.update_proj_gap}, trainable {args.trainable!r} "
                  f"({acc['trainable_params']:,} params), {len(acc['runs']) // 2} seeds, "
                  f"{acc['before']['n']} eval examples", "",
                  "| method | eval accuracy mean ± std | eval loss mean ± std | s/step |", "|---|---|---|---|",
                  f"| before (zero-shot) | {acc['before']['accuracy']:.4f} | {acc['before']['loss']:.4f} | |"]
        for m in ("mezo", "subzero"):
            rs = [r for r in acc["runs"] if r["method"] == m]
            a, l, s = _ms([r["accuracy"] for r in rs]), _ms([r["loss"] for r in rs]), _ms([r["sec_per_step"] for r in rs])
            lines.append(f"| {m} | {a[0]:.4f} ± {a[1]:.4f} | {l[0]:.4f} ± {l[1]:.4f} | {s[0]:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mem-batch", type=int, default=8)
    p.add_argument("--mem-seq", type=int, default=64)
    p.add_argument("--mem-layers", type=int, default=30)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--update-proj-gap", type=int, default=10)
    p.add_argument("--trainable", default=r"layers\.2[4-9]\.")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, 2 threads spin-wait and run 3-5x slower)")
    p.add_argument("--out", default=None, help="also write the markdown table and raw JSON here (prefix)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.memory_worker, args.mem_batch, args.mem_seq, args.mem_layers)))
        return 0
    mem = None if args.skip_memory else memory_part(args)
    acc = None if args.skip_accuracy else accuracy_part(args)
    text = report(mem, acc, args)
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "memory": mem, "accuracy": acc}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
