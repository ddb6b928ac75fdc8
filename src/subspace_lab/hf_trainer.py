"""Our optimizers in the Hugging Face `Trainer`, configured the Trainer's way (needs `accelerate`).

    from subspace_lab.hf_trainer import SubspaceTrainer
    args = TrainingArguments(..., learning_rate=1e-2, weight_decay=0.1,
                             optim_target_modules=["attn", "mlp"],
                             optim_args="method=i3s,rank=128,update_proj_gap=200,scale=0.25,svd_method=gram")
    SubspaceTrainer(model=model, args=args, train_dataset=ds).train()

Everything comes from `TrainingArguments`: `learning_rate`, `weight_decay` (on the parameters the
Trainer decays, `get_decay_parameter_names`: not biases, not norms), `adam_beta1`, `adam_beta2`,
`adam_epsilon`, `seed`, `optim_target_modules` (a regex string, "all-linear", or a list whose
items match a module by name, substring or regex, as the Trainer reads them; only `nn.Linear`
weights are projected, and "all-linear" leaves out the LM head) and `optim_args`, the method and
its settings: `method` (`optimizers.METHODS`) and any field of `config.OptimConfig` (`rank`,
`update_proj_gap`, `scale`, `svd_method`, `transition`, `selector`, `stagger_refresh`, ...),
typed and checked as the lab's flags are. `optim` is not read. The Trainer makes the LR
scheduler: `lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}`
is the lab's (and GaLore's) schedule.

For a plain `Trainer`, the same optimizer as an instance (`Trainer(optimizers=(opt, None))`) or
as `optimizer_cls_and_kwargs`: `build_trainer_optimizer(model, "i3s", args=args)` and
`trainer_cls_and_kwargs(model, "galore", args=args)`. Their keywords (`lr=`, `rank=`, ...) may
replace `args` or add to it; a value given both ways and differing is a `ValueError`, and
without `args`, `lr` must be given. Checkpoints and `resume_from_checkpoint` continue
bit-identically: the optimizer state holds only tensors and plain numbers and survives the
Trainer's `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from transformers import Trainer

from .config import OptimConfig
from .optimizers import build_optimizer, class_and_kwargs

# TrainingArguments field -> OptimConfig field
FROM_TRAINING_ARGS = {"learning_rate": "lr", "weight_decay": "weight_decay",
                      "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2",
                      "adam_epsilon": "adam_epsilon"}
_FIELDS = [f.name for f in dataclasses.fields(OptimConfig)]


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """`"method=i3s,rank=128"` (the Trainer's `optim_args` syntax) -> `OptimConfig` values, each
    converted and checked as its command-line flag is."""
    from .args import LabArgumentParser, UsageError

    argv = []
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in _FIELDS:
            raise ValueError(f"optim_args: expected key=value pairs with keys from "
                             f"{', '.join(_FIELDS)}; got {item!r}")
        argv += [f"--{key}", value]
    try:
        ns = LabArgumentParser(OptimConfig, prog="optim_args").parse_args(argv)
    except UsageError as e:
        raise ValueError(f"optim_args: {e}") from None
    return {k: getattr(ns, k) for k in ns.given_keys if k in _FIELDS}


def trainer_target_modules(model: torch.nn.Module, targets) -> str:
    """The Trainer's `optim_target_modules` as our routing's `target_modules`: "all-linear" stays,
    anything else becomes a regex matching exactly the `nn.Linear` modules the Trainer matches."""
    if isinstance(targets, str) and targets.replace("_", "-") == "all-linear":
        return "all-linear"
    from transformers.trainer_utils import check_target_module_exists

    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and check_target_module_exists(targets, n)]
    if not names:
        raise ValueError(f"optim_target_modules {targets!r} matches no nn.Linear module")
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _merge(values: dict, more: dict, here: str, there: str) -> None:
    for k, v in more.items():
        if k in values and values[k] != v:
            raise ValueError(f"{k} is given twice with different values: {values[k]!r} by "
                             f"{there}, {v!r} by {here}; give it once")
        values[k] = v


def optim_config(model: torch.nn.Module, args=None, **options) -> OptimConfig:
    """The `OptimConfig` of `TrainingArguments` `args` (if given) and `options` (`OptimConfig`
    fields; `target_modules` in the lab's syntax), refusing a value given both ways."""
    values: dict[str, Any] = {}
    if args is not None:
        values = {ours: getattr(args, theirs) for theirs, ours in FROM_TRAINING_ARGS.items()}
        if args.optim_target_modules is not None:
            values["target_modules"] = trainer_target_modules(model, args.optim_target_modules)
        _merge(values, parse_optim_args(args.optim_args), "optim_args", "TrainingArguments")
    if "target_modules" in options and "target_modules" in values:
        raise ValueError("target_modules is given twice: by TrainingArguments."
                         "optim_target_modules and by the target_modules keyword; give it once")
    unknown = sorted(set(options) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown optimizer options {unknown}; allowed: {', '.join(_FIELDS)}")
    _merge(values, {k: v for k, v in options.items() if v is not None}, "keyword", "args")
    if "method" not in values:
        raise ValueError("no optimizer method: give optim_args='method=<name>,...' (or the name "
                         "to the helper)")
    if "lr" not in values:
        raise ValueError("no learning rate: pass args=TrainingArguments(...) or lr=")
    return OptimConfig(**values)


def _seed(args, seed: int | None) -> int:
    if args is not None and seed is not None and seed != args.seed:
        raise ValueError(f"seed is given twice with different values: {args.seed} by "
                         f"TrainingArguments, {seed} by keyword; give it once")
    return seed if seed is not None else (args.seed if args is not None else 0)


def build_trainer_optimizer(model: torch.nn.Module, name: str | None = None, *, args=None,
                            seed: int | None = None, nonfinite: str = "error",
                            **options) -> torch.optim.Optimizer:
    """An optimizer instance for `Trainer(optimizers=(opt, None))`; `options`: `OptimConfig`
    fields (lr, rank, update_proj_gap, scale, weight_decay, target_modules, ...)."""
    cfg = optim_config(model, args, method=name, **options)
    return build_optimizer(cfg, model, seed=_seed(args, seed), nonfinite=nonfinite)


def trainer_cls_and_kwargs(model: torch.nn.Module, name: str | None = None, *, args=None,
                           seed: int | None = None, nonfinite: str = "error",
                           **options) -> tuple[type, dict[str, Any]]:
    """`(optimizer class, kwargs)` for `Trainer(optimizer_cls_and_kwargs=...)`; the kwargs carry
    `params` (our param groups), which the Trainer uses instead of its own."""
    cfg = optim_config(model, args, method=name, **options)
    cls, kwargs = class_and_kwargs(cfg, model, seed=_seed(args, seed), nonfinite=nonfinite)
    kwargs["params"] = list(kwargs["params"])
    return cls, kwargs


class SubspaceTrainer(Trainer):
    """A `Trainer` whose optimizer is ours, configured by its `TrainingArguments` (see the module
    docstring)."""

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            cfg = optim_config(opt_model, self.args)
            decay = set(self.get_decay_parameter_names(opt_model))
            self.optimizer = build_optimizer(cfg, opt_model, seed=self.args.seed, decay=decay)
        return self.optimizer
