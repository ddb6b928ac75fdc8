"""Peak memory of a whole training step (weights, gradients, optimizer state, activations) of LLaMA
models at batch 1 x 2048 with activation checkpointing, per optimizer and update mode.

    .venv/bin/python benchmarks/bench_memory.py --device cpu --models 60m --dtype float32
    .venv/bin/python benchmarks/bench_memory.py --device meta --models 60m,130m,350m,1b,7b --dtype bfloat16

Peak = the most live tensor bytes at any op of the measured step (``memory_tracker.PeakTracker``);
on ``meta`` the same code runs with shapes only, which is how 1B and 7B are accounted for here (no
GPU on this machine). Models: GaLore's LLaMA shapes (``subspace_lab.models``), vocabulary 32,000,
Hugging Face ``LlamaForCausalLM`` with its activation checkpointing (non-reentrant) and SDPA
attention. Ranks: GaLore's (60M 128, 130M/350M 256, 1B 512, 7B 1024). Update modes: ordinary
``opt.step()``; updates inside backward (``step_in_backward``); ordinary accumulation over two
micro-batches (full gradients summed in ``.grad``); accumulation in the subspace (inside backward,
``accumulate=2``). Accumulation peaks are over the whole two-micro-batch window. Steps: the first step
creates the state (and takes the first basis); the second, an ordinary step, is measured; with
``--refresh`` the third, a refresh step (gap 2), is measured too.

galore-torch's 8-bit layer-wise recipe (its README's 7B command, ``torchrun_main.py`` with
``--optimizer galore_adamw8bit_per_layer``) is run as written there: one ``GaLoreAdamW8bit`` per
attention/MLP weight (rank, scale 0.25, ``proj_type="std"``) and one bitsandbytes ``Adam8bit`` per
other parameter, stepped in ``register_post_accumulate_grad_hook``; its projector keeps the
gradient's dtype. Its ``torch.cuda.synchronize()`` is a no-op here (no CUDA).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory_tracker import MetaTruth, PeakTracker  # noqa: E402

RANKS = {"micro": 8, "tiny": 32, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
VOCAB, SEQ, ACCUMULATE = 32000, 2048, 2
MODES = ("ordinary", "in_backward", "ordinary_accumulate", "accumulate")


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    from subspace_lab.models import llama_config

    cfg = llama_config(name, VOCAB, max_seq_len=SEQ)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


# ---------------------------------------------------------------------------------- optimizers
def _ours(cls_name: str, subspace: bool = True, **kw):
    def make(model, rank):
        import subspace_optim as so

        if subspace:
            groups = so.subspace_param_groups(model, "all-linear", rank=rank, update_proj_gap=2, scale=0.25)
        else:
            groups = [{"params": list(model.parameters()), "subspace": False}]
        return getattr(so, cls_name)(groups, lr=1e-3, **kw)
    return make


def _torch_adamw(model, rank):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)


def _bnb_adamw8bit(model, rank):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.0)


def _galore_params(model):
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(key in name for key in ("attn", "mlp"))]


def _galore_torch(model, rank):
    """galore-torch's GaLoreAdamW8bit as one optimizer (its non-layer-wise mode)."""
    from galore_torch import GaLoreAdamW8bit

    galore = {id(p) for p in _galore_params(model)}
    return GaLoreAdamW8bit([{"params": [p for p in model.parameters() if id(p) not in galore]},
                            {"params": [p for p in model.parameters() if id(p) in galore], "rank": rank,
                             "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}], lr=1e-3, weight_decay=0.0)


def _bnb_on_meta() -> None:
    """bitsandbytes' 32-bit update (for tensors under 4,096 elements) is in place and allocates
    nothing, but its meta kernel rejects an argument: skip it on the meta device."""
    import bitsandbytes.functional as F

    real = F.optimizer_update_32bit
    if getattr(real, "meta_skip", False):
        return

    def update(optimizer_name, g, p, *args, **kwargs):
        if p.device.type != "meta":
            return real(optimizer_name, g, p, *args, **kwargs)

    update.meta_skip = True
    F.optimizer_update_32bit = update


def _flash_attention_on_meta() -> None:
    """On CPU, SDPA without a mask runs the flash-attention kernel (no (T, T) score matrix is kept;
    GPUs do the same with theirs); the meta device would take the math path and materialise the
    scores. Route meta inputs to the CPU flash kernel's meta function, so both devices count alike."""
    F = torch.nn.functional
    real = F.scaled_dot_product_attention
    if getattr(real, "meta_flash", False):
        return

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type == "meta" and attn_mask is None and dropout_p == 0.0 and not enable_gqa:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p=0.0, is_causal=is_causal, scale=scale)[0]
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)

    sdpa.meta_flash = True
    F.scaled_dot_product_attention = sdpa


class GaLoreTorchLayerwise:
    """galore-torch's per-layer recipe (see the module docstring): steps happen in the hooks."""

    def __init__(self, model, rank):
        import bitsandbytes as bnb
        from galore_torch import GaLoreAdamW8bit

        galore = {id(p) for p in _galore_params(model)}
        self.opts = {}
        for p in model.parameters():
            if id(p) in galore:
                self.opts[p] = GaLoreAdamW8bit([{"params": [p], "rank": rank, "update_proj_gap": 2, "scale": 0.25,
                                                 "proj_type": "std"}], lr=1e-3, weight_decay=0.0)
            else:
                self.opts[p] = bnb.optim.Adam8bit([p], lr=1e-3, weight_decay=0.0)
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p):
        if p.grad is not None:
            self.opts[p].step()
            self.opts[p].zero_grad()

    def state_bytes(self):
        return sum(_state_bytes(o) for o in self.opts.values())


OPTIMIZERS = {  # name -> (builder, modes it supports)
    "AdamW (torch)": (_torch_adamw, ("ordinary", "ordinary_accumulate")),
    "AdamW (ours, dense; = torch's arithmetic)": (_ours("SubspaceOptimizer", subspace=False), MODES[:2]),
    "AdamW 8-bit (bitsandbytes)": (_bnb_adamw8bit, ("ordinary", "ordinary_accumulate")),
    "AdamW 8-bit (ours, dense, state_bits=8)": (_ours("SubspaceOptimizer", subspace=False, state_bits=8),
                                                 MODES[:2]),
    "GaLore, fp32 states": (_ours("GaLoreAdamW"), MODES),
    "GaLore, 8-bit states": (_ours("GaLoreAdamW", state_bits=8), MODES),
    "I3S, fp32 states": (_ours("I3SAdamW"), MODES),
    "I3S, 8-bit states": (_ours("I3SAdamW", state_bits=8), MODES),
    "I3S, 8-bit states, bf16 projector": (_ours("I3SAdamW", state_bits=8, projector_bits=16), MODES),
    "galore-torch GaLoreAdamW8bit": (_galore_torch, ("ordinary", "ordinary_accumulate")),
    "galore-torch 8-bit layer-wise recipe": (GaLoreTorchLayerwise, ("in_backward",)),
}


def _state_bytes(opt) -> int:
    total, stack = 0, list(opt.state.values())
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            total += v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif hasattr(v, "ortho_matrix"):  # galore-torch's projector object
            stack.append(v.ortho_matrix)
    return total


# --------------------------------------------------------------------------------- one step
def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def run_step(model, opt, handle, mode, batches) -> None:
    if isinstance(opt, GaLoreTorchLayerwise):
        for ids in batches:
            _loss(model, ids).backward()
    elif mode.startswith("ordinary"):
        for ids in batches:
            (_loss(model, ids) / len(batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        for ids in batches:
            handle.backward(_loss(model, ids) / len(batches))
        opt.step()


def measure(model_name, optimizer, mode, device, dtype, refresh: bool) -> dict:
    builder, _ = OPTIMIZERS[optimizer]
    tracker = PeakTracker()
    meta = MetaTruth() if device == "meta" else None
    with tracker, (meta or _null()):
        model = build_model(model_name, device, dtype)
        weights = tracker.current
        opt = builder(model, RANKS[model_name])
        handle = None
        k = ACCUMULATE if mode.endswith("accumulate") else 1
        if not mode.startswith("ordinary") and not isinstance(opt, GaLoreTorchLayerwise):
            handle = opt.step_in_backward(accumulate=k)
        g = torch.Generator(device="cpu").manual_seed(0)

        def batches():
            return [torch.randint(0, VOCAB, (1, SEQ), generator=g).to(device) for _ in range(k)]

        run_step(model, opt, handle, mode, batches())
        out = {"weights": weights}
        for label in ("plain", "refresh") if refresh else ("plain",):
            ids = batches()
            tracker.reset_peak()
            run_step(model, opt, handle, mode, ids)
            out[label] = tracker.peak
            out[label + "_op"] = tracker.peak_op
        out["state"] = opt.state_bytes() if isinstance(opt, GaLoreTorchLayerwise) else _state_bytes(opt)
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="meta", choices=("cpu", "meta"))
    parser.add_argument("--models", default="60m")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--only", default=None, help="';'-separated substrings of optimizer names")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--refresh", action="store_true", help="also measure a refresh step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print the op at each peak")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.cuda.synchronize = lambda *a, **k: None  # galore-torch's step calls it; there is no CUDA here
    if args.device == "meta":
        _bnb_on_meta()
        _flash_attention_on_meta()
    warnings.filterwarnings("ignore")
    dtype = getattr(torch, args.dtype)
    modes = args.modes.split(",")
    names = [n for n in OPTIMIZERS if not args.only or any(s in n for s in args.only.split(";"))]
    print(f"device={args.device} dtype={args.dtype} batch 1 x {SEQ}, activation checkpointing; GB = 1e9 bytes")
    for model_name in args.models.split(","):
        print(f"\n### LLaMA {model_name} (rank {RANKS[model_name]})\n")
        cols = " | ".join(f"peak, {m} (GB)" for m in modes)
        print(f"| optimizer | weights (GB) | state (GB) | {cols} |" + (" refresh step, in backward (GB) |"
                                                                       if args.refresh else ""))
        print("|---" * (3 + len(modes) + args.refresh) + "|")
        for name in names:
            cells, state, weights, refresh = [], None, None, None
            for mode in modes:
                if mode not in OPTIMIZERS[name][1]:
                    cells.append("—")
                    continue
                r = measure(model_name, name, mode, args.device, dtype, args.refresh and mode == "in_backward")
                cells.append(f"{r['plain'] / 1e9:.3f}")
                if args.verbose:
                    print(f"  {name} / {mode}: plain step peak {r['plain']} B at {r['plain_op']}", file=sys.stderr)
                state, weights = r["state"], r["weights"]
                refresh = r.get("refresh", refresh)
            extra = "" if not args.refresh else (" — |" if refresh is None else f" {refresh / 1e9:.3f} |")
            print(f"| {name} | {weights / 1e9:.3f} | {state / 1e9:.3f} | " + " | ".join(cells) + " |" + extra,
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
