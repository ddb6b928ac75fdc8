"""Use our optimizers with the Hugging Face `Trainer` (needs `accelerate`, which `Trainer` imports).

Two ways, both keep our parameter routing (2-D attention/MLP weights projected; embeddings, LM
head, norms dense), which the Trainer's own decay/no-decay grouping would lose:

1. An instance:
       opt = build_trainer_optimizer(model, "i3s", lr=1e-2, rank=128, update_proj_gap=200)
       Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
2. A class and kwargs, so the Trainer builds it (e.g. after it has moved the model):
       Trainer(model=model, args=args, train_dataset=ds,
               optimizer_cls_and_kwargs=trainer_cls_and_kwargs(model, "galore", lr=1e-2))
   The kwargs carry `params` (our param groups), which the Trainer uses instead of its own.

In both cases the Trainer makes the LR scheduler; GaLore's recipe (warmup, cosine to 10%) is
`lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}`.
Checkpoints and `resume_from_checkpoint` work and continue identically: the optimizer state holds
only tensors and plain numbers and survives `torch.load(weights_only=True)`, which is where
`Trainer`'s GaLore/APOLLO integrations crash.
"""
from __future__ import annotations

from typing import Any

import torch

from .optimizers import OPTIMIZERS, OptimizerOptions, build_optimizer, parse_target_modules


def _options(lr: float, **kw) -> OptimizerOptions:
    if isinstance(kw.get("target_modules"), str):
        kw["target_modules"] = parse_target_modules(kw["target_modules"])
    return OptimizerOptions(lr=lr, **kw)


def build_trainer_optimizer(model: torch.nn.Module, name: str = "i3s", lr: float = 1e-2,
                            **options) -> torch.optim.Optimizer:
    """An optimizer instance for `Trainer(optimizers=(opt, None))`. `options`: any field of
    `OptimizerOptions` (rank, update_proj_gap, scale, weight_decay, target_modules, seed, ...)."""
    return build_optimizer(name, model, _options(lr, **options))


def trainer_cls_and_kwargs(model: torch.nn.Module, name: str = "i3s", lr: float = 1e-2,
                           **options) -> tuple[type, dict[str, Any]]:
    """`(optimizer class, kwargs)` for `Trainer(optimizer_cls_and_kwargs=...)`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(sorted(OPTIMIZERS))}")
    o = _options(lr, **options)
    class_and_kwargs = getattr(OPTIMIZERS[name], "class_and_kwargs", None)
    if class_and_kwargs is None:  # dense optimizers: let the Trainer group the params itself
        if name != "adamw":
            raise ValueError(f"optimizer {name!r} has no class form; use build_trainer_optimizer")
        return torch.optim.AdamW, {"lr": o.lr, "betas": o.betas, "eps": o.eps,
                                   "weight_decay": o.weight_decay}
    return class_and_kwargs(model, o)
