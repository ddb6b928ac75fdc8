"""Optimizer-state bytes and step time on the LLaMA-60M weight shapes, as ratios to AdamW in one run.

    .venv/bin/python benchmarks/bench_step.py [--rank 128] [--steps 10] [--device cpu|cuda]

Parameters are the GaLore 60M model's (hidden 512, intermediate 1376, 8 layers, vocab 32000):
the 56 attention/MLP matrices are projected, embeddings, LM head and norms stay dense. Gradients
are fixed random tensors (no model forward), so the timings are the optimizer's alone. Reported:
state MB (sum over the state dict), the median time of an ordinary step, the time of a refresh step
(SVD or sampling), and the mean step time amortised over one ``update_proj_gap`` window. galore-torch
joins when installed (``pip install --no-deps galore-torch bitsandbytes tensorly``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW, SubspaceOptimizer

HIDDEN, INTER, LAYERS, VOCAB = 512, 1376, 8, 32000


def llama60m_params(device) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    g = torch.Generator().manual_seed(0)

    def param(*shape):
        return nn.Parameter((torch.randn(*shape, generator=g) * 0.02).to(device))

    projected, dense = [], [("embed_tokens.weight", param(VOCAB, HIDDEN)), ("lm_head.weight", param(VOCAB, HIDDEN))]
    for i in range(LAYERS):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            projected.append((f"layers.{i}.self_attn.{name}.weight", param(HIDDEN, HIDDEN)))
        projected.append((f"layers.{i}.mlp.gate_proj.weight", param(INTER, HIDDEN)))
        projected.append((f"layers.{i}.mlp.up_proj.weight", param(INTER, HIDDEN)))
        projected.append((f"layers.{i}.mlp.down_proj.weight", param(HIDDEN, INTER)))
        dense.append((f"layers.{i}.input_layernorm.weight", param(HIDDEN)))
        dense.append((f"layers.{i}.post_attention_layernorm.weight", param(HIDDEN)))
    dense.append(("norm.weight", param(HIDDEN)))
    return projected, dense


def _ours(cls, **extra):
    def build(projected, dense, rank, gap):
        return cls([{"params": dense}, {"params": projected, "subspace": True}], lr=1e-3, rank=rank,
                   update_proj_gap=gap, **extra)
    return build


def _galore_torch(projected, dense, rank, gap):
    from galore_torch import GaLoreAdamW as PeerGaLore

    return PeerGaLore([{"params": [p for _, p in dense]},
                       {"params": [p for _, p in projected], "rank": rank, "update_proj_gap": gap,
                        "scale": 0.25, "proj_type": "std"}], lr=1e-3)


def _adamw(projected, dense, rank, gap):
    return torch.optim.AdamW([p for _, p in dense + projected], lr=1e-3, weight_decay=0.0)


OPTIMIZERS = {
    "AdamW (torch)": _adamw,
    "GaLoreAdamW": _ours(GaLoreAdamW),
    "GaLoreAdamW, svd_method=gram": _ours(GaLoreAdamW, svd_method="gram"),
    "I3SAdamW": _ours(I3SAdamW),
    "I3SAdamW, svd_method=gram": _ours(I3SAdamW, svd_method="gram"),
    "I3SAdamW + reset": _ours(I3SAdamW, transition="reset"),
    "random subspace": _ours(SubspaceOptimizer, selector="random", scale=0.25),
    "I3SAdamW + rotate": _ours(I3SAdamW, transition="rotate"),
    "GaLoreAdamW + Lion": _ours(GaLoreAdamW, inner="lion", betas=(0.9, 0.99)),
    "OnlineSubspaceAdamW (paper)": _ours(OnlineSubspaceAdamW),
    "OnlineSubspaceAdamW (code)": _ours(OnlineSubspaceAdamW, osd_variant="code"),
    "LDAdamW": _ours(LDAdamW),
}


def _param_state_bytes(st: dict) -> int:
    total = sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
    # galore-torch keeps its projector as a Python object, outside the state dict's tensors
    ortho = getattr(st.get("projector"), "ortho_matrix", None)
    if isinstance(ortho, torch.Tensor):
        total += ortho.numel() * ortho.element_size()
    return total


def state_bytes(opt, only=None) -> int:
    """Optimizer-state bytes of the parameters in ``only`` (default: all)."""
    ids = None if only is None else {id(p) for p in only}
    return sum(_param_state_bytes(st) for p, st in opt.state.items() if ids is None or id(p) in ids)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(build, device, rank, gap, steps):
    projected, dense = llama60m_params(device)
    params = [p for _, p in projected + dense]
    g = torch.Generator(device=device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    opt = build(projected, dense, rank, gap)
    _sync(device)
    t0 = time.perf_counter()
    opt.step()  # the first step refreshes every projected weight
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"state_bytes": state_bytes(opt), "projected_bytes": state_bytes(opt, [p for _, p in projected]),
            "step": median, "refresh": first,
            "amortised": (first + (gap - 1) * median) / gap}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--update-proj-gap", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10, help="timed ordinary steps per optimizer")
    parser.add_argument("--only", default=None,
                        help="comma list of substrings: run only the matching optimizers (AdamW always runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    builders = dict(OPTIMIZERS)
    try:
        import galore_torch  # noqa: F401

        builders["galore-torch GaLoreAdamW (peer)"] = _galore_torch
    except Exception:
        print("galore-torch not installed: peer row skipped")
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
        builders = {n: b for n, b in builders.items()
                    if n == "AdamW (torch)" or any(w in n.lower() for w in wanted)}
    print(f"LLaMA-60M shapes, rank {args.rank}, update_proj_gap {args.update_proj_gap}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = {name: measure(build, device, args.rank, args.update_proj_gap, args.steps) for name, build in builders.items()}
    base = rows["AdamW (torch)"]
    print("| optimizer | state MB | x AdamW | projected-matrix state MB | x AdamW | step ms (median) | x AdamW "
          "| refresh step ms | amortised ms | x AdamW |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['state_bytes'] / 2**20:.1f} | {r['state_bytes'] / base['state_bytes']:.3f} | "
              f"{r['projected_bytes'] / 2**20:.1f} | {r['projected_bytes'] / base['projected_bytes']:.3f} | "
              f"{r['step'] * 1e3:.1f} | {r['step'] / base['step']:.2f} | {r['refresh'] * 1e3:.0f} | "
              f"{r['amortised'] * 1e3:.1f} | {r['amortised'] / base['amortised']:.2f} |")


if __name__ == "__main__":
    main()
