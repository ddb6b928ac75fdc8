"""Checks that cost (almost) nothing, run before a corpus is read or a tokenizer trained: a bad
run directory or device is reported in one line at once, not after minutes of data preparation
or as a traceback from deep inside torch. (Names of models and optimizers are checked by
`TrainConfig.validate`.) `rank_warning` says when the rank leaves nothing to project.
"""
from __future__ import annotations

import os
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
    cfg.validate()
    check_device(cfg.device)


def projected_shapes(cfg: TrainConfig) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of every weight a subspace optimizer projects in the configured model,
    from the library's own routing applied to the model built on the meta device (no memory,
    no weights initialised)."""
    import subspace_optim as so
    from transformers import LlamaForCausalLM

    from .models import llama_config
    from .optimizers import parse_target_modules

    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(llama_config(cfg.model.name, cfg.data.vocab_size,
                                              cfg.data.seq_len))
    groups = so.subspace_param_groups(model, parse_target_modules(cfg.optim.target_modules))
    return [(n, tuple(p.shape)) for g in groups if g["subspace"] for n, p in g["params"]]


def rank_warning(cfg: TrainConfig, optimizers: list[str]) -> str | None:
    """One line when `--rank` is at or above the smaller dimension of projected weights: the
    subspace optimizers then project nothing there and train those weights as full-rank Adam
    (the same losses as AdamW, no memory saved). None when nothing is affected."""
    from .optimizers import OPTIMIZERS

    subspace = [o for o in optimizers if hasattr(OPTIMIZERS.get(o), "class_and_kwargs")]
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
            f"{len(shapes)} projected weights of model {cfg.model.name!r} (e.g. {name}, {m}x{n}): "
            f"{', '.join(subspace)} project{'s' if len(subspace) == 1 else ''} nothing there and "
            f"train{'s' if len(subspace) == 1 else ''} them as full-rank Adam; "
            f"use --rank < {smallest} for a real subspace")
