"""The lab's optimizer methods: `name -> Method` (a library class and the method's own defaults).

Every method is built from one `config.OptimConfig` by `build_optimizer`, and every subspace
method routes parameters the same way (2-D weights of the target linear layers projected;
embeddings, LM head, norms dense), which is what a fair comparison needs. An option left at None
in the config takes the method's value here, else `SHARED_DEFAULTS`, else the library's default;
an option the user sets always wins (a preset that fixes it, such as GaLore's selector, refuses a
different value in the library's words). Adding a method is one line in `METHODS`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import OptimConfig

# the lab's values where the library's defaults are the papers' (eps 1e-6: galore-torch's, used
# for AdamW too so that only the method differs between runs)
SHARED_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-6, "scale": 0.25}
GROUP_KEYS = ("rank", "update_proj_gap", "scale")  # GaLore's keys: they go into the projected group
_RENAMED = {"adam_epsilon": "eps"}  # OptimConfig field -> library keyword (betas are joined)


@dataclass(frozen=True)
class Method:
    class_name: str | None  # a `subspace_optim` class; None: torch.optim.AdamW, nothing projected
    defaults: dict = field(default_factory=dict)  # OptimConfig fields this method sets otherwise

    @property
    def projects(self) -> bool:
        return self.class_name is not None


METHODS: dict[str, Method] = {
    "adamw": Method(None),
    "galore": Method("GaLoreAdamW"),
    "i3s": Method("I3SAdamW"),
    "i3s-rotate": Method("I3SAdamW", {"transition": "rotate"}),
    "random": Method("SubspaceOptimizer", {"selector": "random"}),
    "osd": Method("OnlineSubspaceAdamW"),
    "ldadam": Method("LDAdamW", {"adam_beta1": 0.908, "adam_beta2": 0.99, "adam_epsilon": 1e-8,
                                 "scale": 1.0}),
    "subspace": Method("SubspaceOptimizer"),  # every choice from the options
}


def check_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(METHODS)} (--optimizer)")
    return METHODS[name]


def subspace_only_options(cfg: "OptimConfig") -> list[str]:
    """The options given (not None) that only a subspace method uses."""
    return sorted(k for k, v in dataclasses.asdict(cfg).items() if v is not None and k not in
                  {"method", "lr", "dense_lr", "weight_decay", "target_modules", *SHARED_DEFAULTS,
                   *GROUP_KEYS})


def without_subspace_options(cfg: "OptimConfig") -> "OptimConfig":
    """`cfg` for a method that projects nothing: compare's AdamW run of a `--svd-method gram`
    comparison (a single run refuses such options instead)."""
    return dataclasses.replace(cfg, **{k: None for k in subspace_only_options(cfg)})


def parse_target_modules(spec: str | list[str]) -> str | list[str]:
    """'all-linear' and regexes stay strings; 'attn,mlp' becomes a substring list."""
    if not isinstance(spec, str) or spec == "all-linear" or "," not in spec:
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]


def resolved_options(cfg: "OptimConfig") -> dict:
    """Every option that has a value: the config's, else the method's, else the shared default."""
    given = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    return {**SHARED_DEFAULTS, **check_method(cfg.method).defaults, **given}


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """The parameters the Hugging Face Trainer applies weight decay to: not biases, not norms."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # it reads only the model


def _split_by_decay(groups: list[dict], weight_decay: float, decay: set[str]) -> list[dict]:
    """Each group as its decayed part (`weight_decay`) and the rest (0); empty parts dropped."""
    out = []
    for g in groups:
        for wd, keep in ((weight_decay, True), (0.0, False)):
            params = [(n, p) for n, p in g["params"] if (n in decay) == keep]
            if params:
                out.append({**g, "params": params, "weight_decay": wd})
    return out


def class_and_kwargs(cfg: "OptimConfig", model: torch.nn.Module, *, seed: int = 0,
                     nonfinite: str = "error", decay: set[str] | None = None) -> tuple[type, dict]:
    """(optimizer class, kwargs with `params`) for `cfg` on `model`. `decay` names the parameters
    that take weight decay (default: `decay_parameter_names(model)`, read only when it matters)."""
    o = resolved_options(cfg)
    if cfg.weight_decay and decay is None:
        decay = decay_parameter_names(model)
    betas = (o.pop("adam_beta1"), o.pop("adam_beta2"))
    lr, wd, name = o.pop("lr"), o.pop("weight_decay"), o.pop("method")
    dense_lr = o.pop("dense_lr", None)
    targets = parse_target_modules(o.pop("target_modules"))
    import subspace_optim as so

    if not METHODS[name].projects:
        if subspace_only_options(cfg):
            raise ValueError(f"optimizer {name!r} projects nothing: "
                             f"{', '.join(subspace_only_options(cfg))} apply only to the "
                             f"subspace optimizers")
        if dense_lr is None:
            named = [{"params": list(model.named_parameters())}]
        else:  # the subspace methods' routing: target matrices at lr, the rest at dense_lr
            named = [{"params": g["params"], **({} if g["subspace"] else {"lr": dense_lr})}
                     for g in so.subspace_param_groups(model, target_modules=targets)]
        params = _split_by_decay(named, wd, decay) if wd else named
        # torch's AdamW wants plain tensors in groups given as dicts
        params = [{**g, "params": [p for _, p in g["params"]]} for g in params]
        return torch.optim.AdamW, dict(params=params, lr=lr, betas=betas, eps=o["adam_epsilon"],
                                       weight_decay=wd)
    groups = so.subspace_param_groups(model, target_modules=targets,
                                      dense_options=None if dense_lr is None else {"lr": dense_lr},
                                      **{k: o.pop(k) for k in GROUP_KEYS})
    if wd:
        groups = _split_by_decay(groups, wd, decay)
    kwargs = {_RENAMED.get(k, k): v for k, v in o.items()}
    return getattr(so, METHODS[name].class_name), dict(
        params=groups, lr=lr, betas=betas, weight_decay=wd, seed=seed, nonfinite=nonfinite, **kwargs)


def build_optimizer(cfg: "OptimConfig", model: torch.nn.Module, **kw) -> torch.optim.Optimizer:
    """The optimizer `cfg` describes, for `model` (keywords as in `class_and_kwargs`)."""
    cls, kwargs = class_and_kwargs(cfg, model, **kw)
    return cls(**kwargs)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in `opt.state_dict()["state"]` (the library's definition)."""
    from subspace_optim import optimizer_state_bytes

    return int(optimizer_state_bytes(opt))
