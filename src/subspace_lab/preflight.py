"""Checks that cost (almost) nothing, run before a corpus is read or a tokenizer trained: a bad
run directory, device, tracker or optimizer setting is reported in one line at once, not after
minutes of data preparation or as a traceback from deep inside torch. (Names of models and
optimizers and value ranges are checked by `TrainConfig.validate`; the optimizer's own settings
by the library, building the optimizer for the model on the meta device.) `rank_warning` says
when the rank leaves nothing to project.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .config import TrainConfig


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise ValueError(f"--device cuda: no CUDA device is available (torch {torch.__version__} "
                         f"with {build}); use --device cpu or auto")


def prepare_out_dir(path: str | Path) -> Path:
    """Create the run directory and prove it is writable, or say in one line why not."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--out-dir {out}: a parent of it is a file, not a directory") from None
    except OSError as e:
        raise ValueError(f"--out-dir {out} cannot be created: {e.strerror or e}") from None
    probe = out / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out-dir {out} is not writable: {e.strerror or e}") from None
    return out


def preflight(cfg: TrainConfig) -> None:
    """Everything cheap that can be wrong with a run's settings, before any data is built."""
    from .trackers import check_available

    cfg.validate()
    check_device(cfg.device)
    check_available(cfg.report_to)
    check_optimizer(cfg)


def meta_model(cfg: TrainConfig):
    """The configured model on the meta device: shapes and names, no memory, no init."""
    from transformers import LlamaForCausalLM

    from .models import llama_config

    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return LlamaForCausalLM(llama_config(cfg.model, cfg.data.vocab_size, cfg.data.seq_len))


def check_optimizer(cfg: TrainConfig) -> None:
    """Build the optimizer for the meta model: the library checks every setting (ranges, names
    of selectors and transitions, a preset's fixed choices) in its own words."""
    from .optimizers import build_optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank warnings: `rank_warning` says it once, clearly
        try:
            build_optimizer(cfg.optim, meta_model(cfg), seed=cfg.seed, nonfinite=cfg.nonfinite)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--optimizer {cfg.optim.method}: {e}") from None


def projected_shapes(cfg: TrainConfig) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of every weight a subspace optimizer projects in the configured model,
    from the library's own routing applied to the meta model."""
    import subspace_optim as so

    from .optimizers import parse_target_modules

    groups = so.subspace_param_groups(meta_model(cfg), parse_target_modules(cfg.optim.target_modules))
    return [(n, tuple(p.shape)) for g in groups if g["subspace"] for n, p in g["params"]]


def rank_warning(cfg: TrainConfig, optimizers: list[str]) -> str | None:
    """One line when `--rank` is at or above the smaller dimension of projected weights: the
    subspace optimizers then project nothing there and train those weights as full-rank Adam
    (the same losses as AdamW, no memory saved). None when nothing is affected."""
    from .optimizers import METHODS

    subspace = [o for o in optimizers if METHODS[o].projects]
    if not subspace:
        return None
    shapes = projected_shapes(cfg)
    rank = cfg.optim.rank
    full = [(n, s) for n, s in shapes if rank >= min(s)]
    if not full:
        return None
    name, (m, n) = full[0]
    smallest = min(min(s) for _, s in shapes)
    return (f"warning: --rank {rank} is >= the smaller dimension of {len(full)} of the "
            f"{len(shapes)} projected weights of model {cfg.model!r} (e.g. {name}, {m}x{n}): "
            f"{', '.join(subspace)} project{'s' if len(subspace) == 1 else ''} nothing there and "
            f"train{'s' if len(subspace) == 1 else ''} them as full-rank Adam; "
            f"use --rank < {smallest} for a real subspace")
