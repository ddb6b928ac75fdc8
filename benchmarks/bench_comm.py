"""Bytes communicated by the subspace optimizers' own collectives on FSDP2-sharded LLaMA weights, per
ordinary step and per refresh step, next to FSDP2's own all-gather / reduce-scatter bytes of a training
step. Everything is counted on real gloo collectives (CPU), nothing is estimated from formulas.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_comm.py --world 8 --out benchmarks/results/comm_gloo.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_comm.py --world 2 --hidden 256 --intermediate 683 --rank 64

Run plainly, the script launches itself under ``python -m torch.distributed.run --standalone
--nproc_per_node WORLD`` (gloo, one thread per process) and formats what rank 0 collects.

Model: ``--layers`` real copies (default 1) of one LLaMA decoder layer's weights, as bias-free
``nn.Linear``: q, k, v, o (hidden x hidden), gate, up (intermediate x hidden), down (hidden x
intermediate); LLaMA-1B's shapes by default (hidden 2048, intermediate 5461, ``subspace_lab.models``'s
"1b", GaLore's configs/llama_1b.json). The forward is a stand-in for attention and the SwiGLU MLP that
uses every weight (the bytes do not depend on it). Each Linear is ``fully_shard``ed (its own FSDP2
unit), then the root. Whole-model numbers = per-layer numbers x ``--model-layers`` (24, the 1B config's
``num_hidden_layers``); the multiplication is shown in the output. Embeddings, the LM head and the
norms are not built: our optimizers keep them dense, which communicates nothing, but FSDP would
all-gather and reduce-scatter them too, so the FSDP column is an undercount for a whole model.

Optimizers: ``GaLoreAdamW``, ``I3SAdamW``, ``OnlineSubspaceAdamW`` (OSD), ``LDAdamW`` (their presets'
defaults, every Linear weight projected via ``subspace_param_groups(model, rank=--rank,
update_proj_gap=2)``) and ``torch.optim.AdamW`` as the reference. Three training steps each:

1. the first step (the initial basis: one factorisation per weight, no previous basis);
2. an ordinary step (no refresh due for GaLore / I3S; OSD and LDAdam move their basis every step, so
   their "ordinary" step is counted under the "refresh" kind of ``opt.communication``);
3. a refresh step at ``update_proj_gap`` (new basis, overlap diagnostic, state transition).

Counting, per process:

- ours: ``opt.communication`` (``sharding.RowShards._count``), cleared before each ``opt.step()``,
  summed over its kinds ("step", "refresh"). Cross-checked against a ``TorchDispatchMode`` that
  intercepts every ``c10d`` op issued during ``opt.step()``: the two must agree byte for byte.
- FSDP: the same dispatch mode around forward + backward, summing FSDP2's ``c10d`` all-gathers
  (forward, and again in backward: ``reshard_after_forward=True``) and reduce-scatters (gradients).

Convention (the same for both): the bytes a process SENDS INTO a collective = the size
(numel x element_size) of its input buffer: the (padded) local shard for an all-gather, the whole
(padded) unsharded gradient for a reduce-scatter, the tensor for an all-reduce. This is what
``_count`` counts. It is not what crosses the network: a ring all-gather of an s-byte shard moves
(W-1) s per process, a ring reduce-scatter of an S-byte input (W-1)/W S, a ring all-reduce of S bytes
2 (W-1)/W S. A second table applies those factors to the counted per-op inputs ("ring bytes": derived
from the counts, labelled as such). Reported: rank 0's value and the maximum over ranks.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

MODEL_LAYERS_1B = 24  # subspace_lab.models.MODEL_SHAPES["1b"].layers (GaLore's llama_1b.json)
OPTIMIZERS = ("galore", "i3s", "osd", "ldadam", "adamw")
LABELS = {"galore": "GaLore (GaLoreAdamW)", "i3s": "I3S (I3SAdamW)", "osd": "OSD (OnlineSubspaceAdamW)",
          "ldadam": "LDAdam (LDAdamW)", "adamw": "torch.optim.AdamW (reference)"}
STEPS = ("first", "ordinary", "refresh")
GAP = 2  # update_proj_gap: step 1 first basis, step 2 ordinary, step 3 refresh
# the name of the argument that holds what a process sends, per c10d op schema
INPUT_ARGS = ("input_tensor", "input_tensors", "inputs", "input", "tensors")
# ring-algorithm bytes on the wire per process, as a multiple of the input buffer (W = world size)
RING = {"allreduce": lambda w: 2 * (w - 1) / w, "allgather": lambda w: w - 1,
        "reduce_scatter": lambda w: (w - 1) / w}


def op_family(name: str) -> str | None:
    """'allreduce', 'allgather', 'reduce_scatter' or None for a c10d op name like ``c10d::_allgather_base_``."""
    if "allreduce" in name:
        return "allreduce"
    if "allgather" in name or "all_gather" in name:
        return "allgather"
    if "reduce_scatter" in name:
        return "reduce_scatter"
    return None


# ------------------------------------------------------------------------------------------ counting
def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class CommCounter(TorchDispatchMode):
    """Counts every ``c10d`` op dispatched while active: ``ops[name] = [calls, input bytes]``, the
    input being the argument a process sends (see ``INPUT_ARGS``)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            schema = func._schema
            values = {a.name: (args[i] if i < len(args) else kwargs.get(a.name))
                      for i, a in enumerate(schema.arguments)}
            nbytes = next((_tensor_bytes(values[n]) for n in INPUT_ARGS if n in values), 0)
            entry = self.ops.setdefault(schema.name, [0, 0])
            entry[0] += 1
            entry[1] += nbytes
        return func(*args, **kwargs)

    def total(self, family: str | None = None) -> int:
        return sum(b for name, (_, b) in self.ops.items() if family is None or op_family(name) == family)


# ------------------------------------------------------------------------------------------ the model
class DecoderLayerWeights(nn.Module):
    """One LLaMA decoder layer's projected weights; the forward only has to use each of them."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        attn = self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x)  # stands in for attention
        x = x + self.o_proj(attn)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def build_model(args, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[DecoderLayerWeights(args.hidden, args.intermediate) for _ in range(args.layers)])
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_optimizer(name: str, model, rank: int):
    import subspace_optim as so

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    cls = {"galore": so.GaLoreAdamW, "i3s": so.I3SAdamW, "osd": so.OnlineSubspaceAdamW, "ldadam": so.LDAdamW}[name]
    return cls(so.subspace_param_groups(model, "all-linear", rank=rank, update_proj_gap=GAP), lr=1e-3)


def fsdp_expected(model, world: int) -> dict[str, int]:
    """What FSDP2 should send per forward+backward under our convention, from the shapes: all-gather
    inputs = 2 x the padded local shards (forward, and backward after resharding), reduce-scatter
    inputs = the padded unsharded gradients. Printed next to the counts as a check only."""
    shard = 0
    for p in model.parameters():
        rows = -(-p.shape[0] // world)
        shard += rows * (p.numel() // p.shape[0]) * p.element_size()
    return {"allgather": 2 * shard, "reduce_scatter": world * shard}


# ------------------------------------------------------------------------------------------ the worker
def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, me = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    result = {"world": world, "rank": me, "optimizers": {}}
    for name in args.optimizers.split(","):
        t_start = time.perf_counter()
        model = build_model(args, mesh)
        opt = build_optimizer(name, model, args.rank)
        n_params = sum(p.numel() for p in model.parameters())  # DTensor numel: the whole weight
        steps = {}
        for i, label in enumerate(STEPS):
            gen = torch.Generator().manual_seed(1000 * me + i)  # each process its own batch
            x = torch.randn(args.batch, args.hidden, generator=gen)
            opt.zero_grad(set_to_none=True)
            with CommCounter() as fsdp:
                model(x).pow(2).mean().backward()
            communication = getattr(opt, "communication", None)
            if communication is not None:
                communication.clear()
            t0 = time.perf_counter()
            with CommCounter() as ours_ops:
                opt.step()
            seconds = time.perf_counter() - t0
            steps[label] = {"fsdp_ops": fsdp.ops, "ours_ops": ours_ops.ops,
                            "ours": dict(communication) if communication is not None else {},
                            "step_seconds": seconds}
            if me == 0:
                print(f"[bench_comm] {name} {label}: ours {sum(steps[label]['ours'].values())} B "
                      f"(dispatch {ours_ops.total()} B), FSDP all-gather {fsdp.total('allgather')} B "
                      f"reduce-scatter {fsdp.total('reduce_scatter')} B, step {seconds:.1f}s", flush=True)
        result["optimizers"][name] = {"steps": steps, "params": n_params,
                                      "fsdp_expected": fsdp_expected(model, world),
                                      "seconds": time.perf_counter() - t_start}
        del model, opt
        gc.collect()
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if me == 0:
        Path(args.result).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort a normal interpreter teardown


# ------------------------------------------------------------------------------------------ the report
def mib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 20:,.2f} MiB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.4f}" if b else "n/a"


def summarise(ranks: list[dict], name: str, scale: float) -> dict:
    """Per-model numbers (per-layer x scale) for one optimizer: ours per step kind and FSDP's, rank 0's
    and the max over ranks, plain and ring-derived, and the dispatch cross-check."""
    world = ranks[0]["world"]

    def ours(r, label):
        return sum(r["optimizers"][name]["steps"][label]["ours"].values())

    def dispatch_ours(r, label):
        return sum(b for _, b in r["optimizers"][name]["steps"][label]["ours_ops"].values())

    def ring(ops):
        return sum(b * RING[op_family(n)](world) for n, (_, b) in ops.items() if op_family(n))

    def fsdp(r, label="ordinary"):
        ops = r["optimizers"][name]["steps"][label]["fsdp_ops"]
        return sum(b for n, (_, b) in ops.items() if op_family(n) in ("allgather", "reduce_scatter"))

    out = {"extra": {}}  # step -> the set over ranks of (dispatch count - opt.communication), per layer built
    for label in STEPS:
        vals = [ours(r, label) for r in ranks]
        out[label] = (vals[0] * scale, max(vals) * scale)
        rings = [ring(r["optimizers"][name]["steps"][label]["ours_ops"]) for r in ranks]
        out["ring_" + label] = (rings[0] * scale, max(rings) * scale)
        out["extra"][label] = sorted({dispatch_ours(r, label) - ours(r, label) for r in ranks})
    vals = [fsdp(r) for r in ranks]
    out["fsdp"] = (vals[0] * scale, max(vals) * scale)
    rings = [ring({n: v for n, v in r["optimizers"][name]["steps"]["ordinary"]["fsdp_ops"].items()}) for r in ranks]
    out["ring_fsdp"] = (rings[0] * scale, max(rings) * scale)
    return out


def pair(values: tuple[float, float]) -> str:
    first, top = values
    return mib(first) if first == top else f"{mib(first)} (max {mib(top)})"


def report(ranks: list[dict], args, command: str, wall: float) -> str:
    world = ranks[0]["world"]
    names = list(ranks[0]["optimizers"])
    scale = args.model_layers / args.layers
    first = ranks[0]["optimizers"][names[0]]
    per_layer_params = first["params"] // args.layers
    lines = [
        "# Communication per step: our collectives vs FSDP2's (gloo, counted)",
        "",
        f"Command: `{command}`  ",
        f"Generated by `benchmarks/bench_comm.py` on {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"gloo on CPU, {world} processes, OMP_NUM_THREADS=1 ({wall / 60:.1f} min wall).",
        "",
        f"- Layer: hidden {args.hidden}, intermediate {args.intermediate}: q, k, v, o ({args.hidden}x{args.hidden}), "
        f"gate, up ({args.intermediate}x{args.hidden}), down ({args.hidden}x{args.intermediate}), bias-free "
        f"`nn.Linear`, each its own `fully_shard` unit, then the root; {per_layer_params:,} parameters per layer, "
        "fp32.",
        f"- Counted on {args.layers} real layer(s); **whole-model numbers = per-layer count x {args.model_layers} "
        f"layers** (x {scale:g} of what was counted"
        + (", the LLaMA-1B config's 24 decoder layers" if args.model_layers == MODEL_LAYERS_1B else "") + "). "
        "Embeddings, LM head and norms are not included (dense under our optimizers: no communication of ours; "
        "FSDP would communicate them too, so its column is an undercount for a whole model).",
        f"- Optimizers: presets' defaults, every Linear weight projected at rank {args.rank}, "
        f"update_proj_gap {GAP}. Steps: first (initial basis), ordinary, refresh (at the gap). OSD and LDAdam "
        "move their basis every step: their ordinary step is their every-step selector's traffic.",
        "- **Convention: bytes a process sends into a collective = the size of its input buffer** "
        "(numel x element_size): the padded local shard for an all-gather, the padded unsharded gradient for a "
        "reduce-scatter, the tensor for an all-reduce; the same for ours (`opt.communication`, "
        "`sharding.RowShards._count`) and FSDP's (a `TorchDispatchMode` on the `c10d` ops of forward+backward).",
        "- Per process: rank 0's value; `(max ...)` where the maximum over ranks differs. "
        f"MiB = 2^20 bytes.",
        "",
        "## Per step, whole model (input-buffer convention)",
        "",
        "| optimizer | ours, ordinary step | ours, refresh step | ours, first step | FSDP all-gather + "
        "reduce-scatter per step | ordinary / FSDP | refresh / FSDP |",
        "|---|---|---|---|---|---|---|",
    ]
    summaries = {name: summarise(ranks, name, scale) for name in names}
    for name in names:
        s = summaries[name]
        lines.append(f"| {LABELS[name]} | {pair(s['ordinary'])} | {pair(s['refresh'])} | {pair(s['first'])} | "
                     f"{pair(s['fsdp'])} | {ratio(s['ordinary'][1], s['fsdp'][0])} | "
                     f"{ratio(s['refresh'][1], s['fsdp'][0])} |")
    lines += [
        "",
        "Ratios: the max over ranks of ours over rank 0's FSDP bytes.",
        "",
        "## Ring bytes on the wire, whole model (derived from the counted per-op inputs)",
        "",
        f"Each counted collective's input times the ring algorithm's factor at W = {world}: all-gather W-1, "
        "reduce-scatter (W-1)/W, all-reduce 2(W-1)/W (gloo's actual algorithms may differ).",
        "",
        "| optimizer | ours, ordinary step | ours, refresh step | ours, first step | FSDP per step | "
        "ordinary / FSDP | refresh / FSDP |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = summaries[name]
        lines.append(f"| {LABELS[name]} | {pair(s['ring_ordinary'])} | {pair(s['ring_refresh'])} | "
                     f"{pair(s['ring_first'])} | {pair(s['ring_fsdp'])} | "
                     f"{ratio(s['ring_ordinary'][1], s['ring_fsdp'][0])} | "
                     f"{ratio(s['ring_refresh'][1], s['ring_fsdp'][0])} |")
    lines += ["", f"## What was counted (rank 0, per real layer{'s' if args.layers > 1 else ''} built: "
              f"{args.layers}, bytes)", "",
              "| optimizer | step | `opt.communication` | our c10d ops (calls, input bytes) | FSDP c10d ops "
              "(calls, input bytes) | step time (s) |", "|---|---|---|---|---|---|"]
    for name in names:
        for label in STEPS:
            st = ranks[0]["optimizers"][name]["steps"][label]
            ops = "; ".join(f"`{n}` {c} x, {b:,}" for n, (c, b) in sorted(st["ours_ops"].items())) or "none"
            fops = "; ".join(f"`{n}` {c} x, {b:,}" for n, (c, b) in sorted(st["fsdp_ops"].items())) or "none"
            comm = ", ".join(f"{k}: {v:,}" for k, v in sorted(st["ours"].items())) or "{}"
            lines.append(f"| {name} | {label} | {comm} | {ops} | {fops} | {st['step_seconds']:.1f} |")
    exp = first["fsdp_expected"]
    got = ranks[0]["optimizers"][names[0]]["steps"]["ordinary"]["fsdp_ops"]
    got_ag = sum(b for n, (_, b) in got.items() if op_family(n) == "allgather")
    got_rs = sum(b for n, (_, b) in got.items() if op_family(n) == "reduce_scatter")
    extras = {name: summaries[name]["extra"] for name in names
              if any(v != [0] for v in summaries[name]["extra"].values())}
    if extras:
        check = ("the dispatch mode counts more than `opt.communication` (bytes per counted layer(s), every rank): "
                 + "; ".join(f"{name} " + ", ".join(f"{label} +{'/'.join(map(str, v))} B" for label, v in e.items())
                             for name, e in extras.items())
                 + ". Where it is +8 B: the float64 flag all-reduce of `nonfinite.first_nonfinite` (the "
                 "non-finite screen of sharded gradients, once per `step()`), which `opt.communication` does not "
                 "count; negligible, the tables use `opt.communication`.")
    else:
        check = "equal on every rank and step."
    lines += [
        "",
        "## Checks",
        "",
        f"- FSDP, counted layer(s), rank 0: all-gather inputs {got_ag:,} B vs 2 x padded local shards "
        f"{exp['allgather']:,} B (forward + backward re-gather); reduce-scatter inputs {got_rs:,} B vs padded "
        f"unsharded gradients {exp['reduce_scatter']:,} B: "
        + ("equal." if (got_ag, got_rs) == (exp["allgather"], exp["reduce_scatter"]) else "**differ**."),
        "- `opt.communication` vs the dispatch mode's count of the c10d ops issued in `opt.step()`: "
        + check,
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=8, help="processes (gloo, CPU)")
    ap.add_argument("--layers", type=int, default=1, help="real decoder layers to build and count")
    ap.add_argument("--model-layers", type=int, default=MODEL_LAYERS_1B,
                    help="decoder layers of the model the per-layer numbers are scaled to (1B: 24)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5461)
    ap.add_argument("--rank", type=int, default=512, help="subspace rank (the 1B papers' 512)")
    ap.add_argument("--batch", type=int, default=4, help="rows of the random input per process")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, of {OPTIMIZERS}")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def forwarded(args) -> list[str]:
    return ["--layers", str(args.layers), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
            "--rank", str(args.rank), "--batch", str(args.batch), "--optimizers", args.optimizers]


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    unknown = set(args.optimizers.split(",")) - set(OPTIMIZERS)
    if unknown:
        raise SystemExit(f"--optimizers: unknown {sorted(unknown)}; allowed {OPTIMIZERS}")
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_comm.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.world}", os.path.abspath(__file__), "--worker",
                        "--result", result, *forwarded(args)], env=env, check=True)
        wall = time.perf_counter() - t0
        ranks = json.loads(Path(result).read_text())
    text = report(ranks, args, command, wall)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
