"""Typed run configuration for the lab.

One `TrainConfig` describes a pretraining run completely: model, data, optimizer and loop settings.
It round-trips through `to_dict` / `from_dict` (saved in every checkpoint and run directory), and
`cli.py` maps every field onto a command-line flag: the flag name is the field's `flag` metadata
(or its name with dashes), so the config and the CLI cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def _f(default, help: str, flag: str | None = None, choices=None, names=None, **kw):
    """A config field. `names` is a zero-argument function giving the allowed values of a name
    field (listed in the flag's help and checked by `validate`, before any data is built)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                            "names": names}, **kw)


def optimizer_names() -> list[str]:
    from .optimizers import OPTIMIZERS
    return sorted(OPTIMIZERS)


def model_names() -> list[str]:
    from .models import MODEL_SHAPES
    return list(MODEL_SHAPES)


# the byte-level BPE always holds the 256 bytes and the end-of-text token
MIN_BPE_VOCAB = 257


@dataclass
class ModelConfig:
    name: str = _f("tiny", "model size", flag="model", names=model_names)


@dataclass
class DataConfig:
    source: str = _f("kjv", "'kjv' (embedded King James Bible), a .txt/.jsonl file or directory, "
                     "or a Hugging Face dataset name (e.g. allenai/c4)", flag="data")
    data_config: str | None = _f(None, "dataset config name for a Hugging Face dataset (e.g. en)")
    split: str = _f("train", "dataset split to read (Hugging Face datasets)")
    text_field: str = _f("text", "field holding the text in jsonl / Hugging Face records")
    streaming: bool | None = _f(None, "stream the dataset (default: on for hub datasets, "
                                "off for local files)")
    tokenizer: str = _f("bpe", "'bpe' (train and cache a byte-level BPE on the corpus) or a "
                        "Hugging Face tokenizer name/path")
    vocab_size: int = _f(4096, f"vocabulary size of the trained BPE tokenizer (>= {MIN_BPE_VOCAB})")
    seq_len: int = _f(128, "tokens per packed training sequence (>= 2)")
    val_fraction: float = _f(0.02, "fraction of documents held out for validation (by hash)")
    max_docs: int | None = _f(None, "read at most this many documents (streaming: per split)")
    cache_dir: str | None = _f(None, "cache for tokenizers and token arrays "
                               "(default: $SUBSPACE_CACHE or ~/.cache/subspace-optim)")


@dataclass
class OptimConfig:
    name: str = _f("adamw", "optimizer", flag="optimizer", names=optimizer_names)
    lr: float = _f(3e-3, "peak learning rate")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    rank: int = _f(32, "subspace rank (subspace optimizers)")
    update_proj_gap: int = _f(20, "steps between subspace refreshes (subspace optimizers)")
    scale: float = _f(0.25, "update multiplier of the projected update (GaLore's scale)")
    target_modules: str = _f("all-linear", "projected modules: 'all-linear', a comma list of "
                             "substrings (attn,mlp) or a regex")
    state_bits: int = _f(32, "bits per stored optimizer moment (subspace optimizers): 32, 16 (bf16) "
                         "or 8 (block-wise, needs bitsandbytes)", choices=(8, 16, 32))
    projector_bits: int = _f(32, "bits per stored projector entry: 32 or 16 (bf16; math stays fp32)",
                             choices=(16, 32))


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = _f(16, "sequences per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step (alias --accumulate)")
    step_in_backward: bool = _f(False, "update each weight inside backward and free its gradient "
                                "(subspace optimizers); with --grad-accum K > 1 projected weights "
                                "accumulate in the subspace; --clip then clips per parameter and "
                                "needs K = 1")
    steps: int | None = _f(None, "optimizer steps (if unset: from --tokens, else 200); a --resume "
                           "may change it (see --resume)")
    tokens: int | None = _f(None, "token budget; sets steps = ceil(tokens / tokens per step)")
    warmup_fraction: float = _f(0.1, "fraction of steps of linear warmup")
    min_lr_ratio: float = _f(0.1, "cosine decays to this fraction of the peak lr (GaLore: 0.1)")
    clip: float = _f(1.0, "global gradient-norm clip (0 disables)")
    eval_every: int = _f(100, "steps between validation evaluations (0: only at the end)")
    eval_batches: int = _f(8, "validation micro-batches per evaluation")
    log_every: int = _f(10, "steps between train-metric records")
    seed: int = _f(0, "seed for model init, data order and the optimizer")
    nonfinite: str = _f("error", "non-finite loss or grad: 'error' aborts before the update, "
                        "'skip' skips the update and counts it", choices=("error", "skip"))
    checkpoint_every: int = _f(0, "steps between checkpoints (0: none)")
    keep_last_k: int = _f(2, "checkpoints kept (older ones are purged after a new one commits)")
    out_dir: str = _f("runs/pretrain", "run directory (metrics.jsonl, checkpoints/)")
    device: str = _f("auto", "auto, cpu or cuda")
    threads: int = _f(0, "CPU threads for torch (0: torch's default; 1 is much faster on a "
                      "machine busy with other jobs)")
    resume: bool = _f(False, "resume from the latest valid checkpoint in out_dir. Refuses when "
                      "there is none, or when the model, data, optimizer, batch or schedule-shape "
                      "settings differ from the checkpoint's. --steps/--tokens may change (extend "
                      "a finished run): the warmup+cosine is recomputed over the new total, so "
                      "after the resume point the LR is that of an uninterrupted run of the new "
                      "length, while the steps before it kept the old schedule's LR")
    stop_at: int | None = _f(None, "checkpoint and stop after this step; the schedule still "
                             "follows --steps (time-sliced jobs, resume tests)")
    progress: bool = _f(True, "show a tqdm progress bar")

    # ---- derived values -------------------------------------------------------------------
    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size * self.data.seq_len

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / self.tokens_per_step(world_size)))
        return 200

    def validate(self) -> "TrainConfig":
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"config: {name} (--{_FLAGS[name]}) must be {rule}, "
                                 f"got {_get(self, name)!r}")
        for dotted, f in iter_fields():
            allowed = f.metadata.get("names")
            if allowed is not None and _get(self, dotted) not in allowed():
                kind = f.metadata["flag"] or dotted
                raise ValueError(f"unknown {kind} {_get(self, dotted)!r}; allowed: "
                                 f"{', '.join(allowed())} (--{_FLAGS[dotted]})")
        for name in ("batch_size", "grad_accum", "data.seq_len", "data.vocab_size", "optim.rank",
                     "optim.update_proj_gap", "eval_batches", "log_every", "keep_last_k"):
            v = _get(self, name)
            check(isinstance(v, int) and v >= 1, name, "an integer >= 1")
        for name in ("eval_every", "checkpoint_every", "threads"):
            check(isinstance(_get(self, name), int) and _get(self, name) >= 0, name, "an int >= 0")
        check(self.data.seq_len >= 2, "data.seq_len", ">= 2 (a sequence predicts its next tokens)")
        check(self.data.tokenizer != "bpe" or self.data.vocab_size >= MIN_BPE_VOCAB,
              "data.vocab_size", f">= {MIN_BPE_VOCAB} for the byte-level BPE (256 bytes and the "
              f"end-of-text token)")
        check(self.data.max_docs is None or self.data.max_docs >= 1, "data.max_docs", ">= 1")
        check(self.steps is None or self.steps >= 1, "steps", ">= 1")
        check(self.stop_at is None or self.stop_at >= 1, "stop_at", ">= 1")
        check(self.tokens is None or self.tokens >= 1, "tokens", ">= 1")
        check(self.optim.lr > 0, "optim.lr", "> 0")
        check(self.optim.weight_decay >= 0, "optim.weight_decay", ">= 0")
        check(self.optim.scale > 0, "optim.scale", "> 0")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", "in [0, 1)")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        check(self.clip >= 0, "clip", ">= 0")
        check(0 <= self.data.val_fraction < 1, "data.val_fraction", "in [0, 1)")
        check(self.nonfinite in ("error", "skip"), "nonfinite", "'error' or 'skip'")
        check(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda")
        check(self.optim.state_bits in (8, 16, 32), "optim.state_bits", "8, 16 or 32")
        check(self.optim.projector_bits in (16, 32), "optim.projector_bits", "16 or 32")
        if self.step_in_backward and self.grad_accum > 1 and self.clip > 0:
            raise ValueError("config: step_in_backward with grad_accum > 1 cannot clip (the accumulated "
                             f"full gradient is never formed); pass --clip 0, got clip={self.clip}")
        return self

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d)


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _from_dict(cls, d: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        f = fields[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        kwargs[name] = _from_dict(sub, value) if sub is not None and dataclasses.is_dataclass(sub) \
            else value
    return cls(**kwargs)


def iter_fields(cfg_cls=TrainConfig, prefix: str = ""):
    """Yield (dotted_name, dataclasses.Field) for every leaf field, nested configs flattened."""
    for f in dataclasses.fields(cfg_cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from iter_fields(f.default_factory, prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def flag_name(dotted: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or dotted.rsplit(".", 1)[-1].replace("_", "-")


_FLAGS = {dotted: flag_name(dotted, f) for dotted, f in iter_fields()}


def set_dotted(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        cfg = getattr(cfg, p)
    setattr(cfg, leaf, value)


# ---- command-line flags ------------------------------------------------------------------
_PARSERS = {"int": int, "float": float, "str": str}


def _leaf_type(f: dataclasses.Field) -> tuple[str, bool]:
    """('int' | 'float' | 'str' | 'bool', optional) from the (string) annotation."""
    t = str(f.type).replace(" ", "")
    optional = t.endswith("|None")
    return t.removesuffix("|None"), optional


def add_config_args(parser, exclude: tuple[str, ...] = (), defaults: TrainConfig | None = None,
                    helps: dict[str, str] | None = None) -> None:
    """Add one flag per `TrainConfig` leaf field (defaults suppressed: only given flags apply).
    `defaults` is the config the command starts from (shown in the help); `helps` replaces the
    help text of some fields (dotted name -> text)."""
    import argparse

    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="JSON file with a TrainConfig dict (flags override it)")
    defaults = defaults or TrainConfig()
    for dotted, f in iter_fields():
        flag = flag_name(dotted, f)
        if dotted in exclude or flag in exclude:
            continue
        kind, optional = _leaf_type(f)
        text = (helps or {}).get(dotted, f.metadata.get("help", ""))
        if f.metadata.get("names"):
            text += ": " + ", ".join(f.metadata["names"]())
        help_ = f"{text} (default: {_get(defaults, dotted)})".replace("%", "%%")
        kw = dict(dest=dotted, default=argparse.SUPPRESS, help=help_)
        if kind == "bool":
            parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(f"--{flag}", type=_PARSERS[kind], choices=f.metadata.get("choices"),
                                metavar=kind.upper(), **kw)


def config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    """`base` (or defaults), then `--config FILE`, then every flag given on the command line."""
    import json

    cfg = base or TrainConfig()
    values = vars(args)
    if "config" in values:
        with open(values["config"]) as fh:
            cfg = TrainConfig.from_dict(json.load(fh))
    for dotted, _ in iter_fields():
        if dotted in values:
            set_dotted(cfg, dotted, values[dotted])
    if "tokens" in values and "steps" not in values:  # a token budget replaces a base's steps
        cfg.steps = None
    return cfg.validate()
