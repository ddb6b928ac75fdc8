"""Optimizer registry: `name -> builder(model, options) -> torch.optim.Optimizer`.

Adding an optimizer is one line in `OPTIMIZERS`: a subspace preset of the library is
`"osd": subspace("OnlineSubspaceAdamW")`. Every builder gets the same `OptimizerOptions`, and
the subspace builders route parameters the same way (2-D weights of the target linear layers
projected; embeddings, LM head, norms dense), which is what a fair comparison needs.
The library is imported lazily so the lab's AdamW path works without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class OptimizerOptions:
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6  # galore-torch's default; used for AdamW too so only the method differs
    rank: int = 32
    update_proj_gap: int = 20
    scale: float = 0.25
    target_modules: str | list[str] = "all-linear"
    seed: int = 0
    nonfinite: str = "error"
    state_bits: int = 32
    projector_bits: int = 32


def parse_target_modules(spec: str) -> str | list[str]:
    """'all-linear' and regexes stay strings; 'attn,mlp' becomes a substring list."""
    if spec == "all-linear" or "," not in spec:
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]


def adamw(model: torch.nn.Module, o: OptimizerOptions) -> torch.optim.Optimizer:
    if (o.state_bits, o.projector_bits) != (32, 32):
        raise ValueError("state_bits/projector_bits apply to the subspace optimizers; adamw is torch's AdamW")
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                             weight_decay=o.weight_decay)


def subspace(class_name: str, **fixed) -> Callable[[torch.nn.Module, OptimizerOptions], torch.optim.Optimizer]:
    """A builder for a `subspace_optim` preset class taking GaLore's group keys. `fixed` are the
    method's own settings, which the shared options do not override (e.g. LDAdam's betas and its
    unscaled update, the random baseline's selector)."""
    def class_and_kwargs(model: torch.nn.Module, o: OptimizerOptions) -> tuple[type, dict]:
        import subspace_optim as so

        group_keys = {"rank": o.rank, "update_proj_gap": o.update_proj_gap, "scale": o.scale}
        group_keys.update({k: v for k, v in fixed.items() if k in group_keys})
        groups = so.subspace_param_groups(model, target_modules=o.target_modules, **group_keys)
        kwargs = dict(params=groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                      seed=o.seed, nonfinite=o.nonfinite, state_bits=o.state_bits,
                      projector_bits=o.projector_bits)
        kwargs.update({k: v for k, v in fixed.items() if k not in group_keys})
        return getattr(so, class_name), kwargs

    def build(model: torch.nn.Module, o: OptimizerOptions) -> torch.optim.Optimizer:
        cls, kwargs = class_and_kwargs(model, o)
        return cls(**kwargs)
    build.__name__ = f"build_{class_name}"
    build.class_and_kwargs = class_and_kwargs  # lets hf_trainer hand (class, kwargs) to the HF Trainer
    return build


OPTIMIZERS: dict[str, Callable[[torch.nn.Module, OptimizerOptions], torch.optim.Optimizer]] = {
    "adamw": adamw,
    "galore": subspace("GaLoreAdamW"),
    "i3s": subspace("I3SAdamW"),
    "i3s-rotate": subspace("I3SAdamW", transition="rotate"),
    "random": subspace("SubspaceOptimizer", selector="random"),
    "osd": subspace("OnlineSubspaceAdamW"),
    "ldadam": subspace("LDAdamW", betas=(0.908, 0.99), scale=1.0, eps=1e-8),
}


def build_optimizer(name: str, model: torch.nn.Module, options: OptimizerOptions):
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name](model, options)


def options_from_config(cfg) -> OptimizerOptions:
    """`OptimizerOptions` from a `TrainConfig`."""
    o = cfg.optim
    return OptimizerOptions(lr=o.lr, weight_decay=o.weight_decay, rank=o.rank,
                            update_proj_gap=o.update_proj_gap, scale=o.scale,
                            target_modules=parse_target_modules(o.target_modules), seed=cfg.seed,
                            nonfinite=cfg.nonfinite, state_bits=o.state_bits,
                            projector_bits=o.projector_bits)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in `opt.state_dict()["state"]` (the library's definition)."""
    try:
        from subspace_optim import optimizer_state_bytes
        return int(optimizer_state_bytes(opt))
    except ImportError:
        pass
    total = 0
    stack = [opt.state_dict()["state"]]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


def diagnostics(opt: torch.optim.Optimizer) -> list[dict]:
    """Per-projected-param subspace records, or [] for optimizers without subspaces."""
    if not any(g.get("subspace") for g in opt.param_groups):
        return []
    from subspace_optim import subspace_diagnostics
    return subspace_diagnostics(opt)
