"""Typed run configuration for the lab.

One `TrainConfig` describes a pretraining run completely: model, data (`DataConfig`), optimizer
(`OptimConfig`) and loop settings. Each field is one command-line flag, made by
`transformers.HfArgumentParser` from the field's type and `metadata` (`help`, and `aliases` for
an extra flag name), so the config and the CLI cannot drift apart; `args.LabArgumentParser`
flattens the sections, which is why a leaf name is unique across all of them. A config file
(YAML or JSON, `--config`) holds the same names, flat or in sections like `to_dict()`.

`OptimConfig` is the one optimizer configuration: the lab's CLI, `optimizers.build_optimizer` and
the Hugging Face Trainer hookup (`optim_args`) all use it. A field left at None takes the method's
own value (`optimizers.METHODS`) or, failing that, the library's default for its component.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from subspace_optim.checks import NONFINITE_POLICIES

from .models import MODEL_SHAPES
from .optimizers import METHODS, SHARED_DEFAULTS

# the byte-level BPE always holds the 256 bytes and the end-of-text token
MIN_BPE_VOCAB = 257
DEVICES = ("auto", "cpu", "cuda")
TRACKERS = ("none", "tensorboard", "trackio")


def _f(default, help: str, **kw):
    """A config field; `kw` goes to `argparse.add_argument` (`aliases`, `choices`)."""
    return field(default=default, metadata={"help": help, **kw})


def _method_default(key: str) -> str:
    special = ", ".join(f"{n} {m.defaults[key]}" for n, m in METHODS.items() if key in m.defaults)
    return f"default {SHARED_DEFAULTS[key]}" + (f"; {special}" if special else "")


@dataclass
class DataConfig:
    source: str = _f("kjv", "'kjv' (embedded King James Bible), a .txt/.jsonl file or directory, "
                     "or a Hugging Face dataset name (e.g. allenai/c4)", aliases=["--data"])
    data_config: str | None = _f(None, "dataset config name for a Hugging Face dataset (e.g. en)")
    split: str = _f("train", "dataset split to read (Hugging Face datasets)")
    text_field: str = _f("text", "field holding the text in jsonl / Hugging Face records")
    streaming: bool | None = _f(None, "stream the dataset: true or false (default: true for hub "
                                "datasets, false for local files)")
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
    """An optimizer option is one field here. Its name is the keyword of `SubspaceOptimizer` (or
    of a component's `defaults`) it sets; None means "the method's or the library's default"."""

    method: str = _f("adamw", "optimizer: " + ", ".join(METHODS), aliases=["--optimizer"])
    lr: float = _f(3e-3, "peak learning rate", aliases=["--learning-rate", "--learning_rate"])
    dense_lr: float | None = _f(None, "peak learning rate of the parameters outside --target-modules "
                                "(embeddings, LM head, norms), for every method, AdamW included "
                                "(default: --lr); the schedule scales both alike")
    weight_decay: float = _f(0.0, "decoupled weight decay, on the weights the Hugging Face "
                             "Trainer decays (not biases, not norms)")
    adam_beta1: float | None = _f(None, "Adam beta1 (" + _method_default("adam_beta1") + ")")
    adam_beta2: float | None = _f(None, "Adam beta2 (" + _method_default("adam_beta2") + ")")
    adam_epsilon: float | None = _f(None, "Adam epsilon (" + _method_default("adam_epsilon") + ")")
    rank: int = _f(32, "subspace rank (subspace optimizers)")
    update_proj_gap: int = _f(20, "steps between subspace refreshes (subspace optimizers)")
    scale: float | None = _f(None, "multiplier of the projected update, GaLore's alpha ("
                             + _method_default("scale") + ")")
    target_modules: str = _f("all-linear", "projected modules: 'all-linear', a comma list of "
                             "substrings (attn,mlp) or a regex")
    selector: str | None = _f(None, "subspace selector: dominant, importance, random, coordinate, "
                              "online_pca, power (presets fix theirs; free with --optimizer subspace)")
    transition: str | None = _f(None, "what the moments do when the subspace changes: keep, reset, "
                                "rotate")
    inner: str | None = _f(None, "the optimizer inside the subspace: adam, lion, sgd")
    side: str | None = _f(None, "which side is projected: galore, ldadam, min_state, left, right")
    svd_method: str | None = _f(None, "factorisation at a refresh: svd (reference), gram (eigh "
                                "of the Gram matrix, exact, faster), randomized, auto (per shape) "
                                "or lapack (galore-torch's signs; docs/refresh.md)")
    stagger_refresh: bool | None = _f(None, "true: spread the weights' refreshes evenly over "
                                      "the gap instead of all on one step")
    batch_refresh: bool | None = _f(None, "true: refresh weights of one shape with one batched "
                                    "linalg call (docs/refresh.md)")
    error_feedback: bool | None = _f(None, "true: keep what the projection loses and add it to "
                                     "the next gradient (LDAdam's)")
    momentum: float | None = _f(None, "momentum of --inner sgd")
    correct_bias: bool | None = _f(None, "Adam bias correction of --inner adam (true/false)")
    rho: float | None = _f(None, "LDAdam's power-iteration mixing (--selector power)")
    osd_variant: str | None = _f(None, "Online Subspace Descent variant: paper or code")
    osd_alpha: float | None = _f(None, "Online Subspace Descent: P learning rate / lr (paper)")
    osd_p_optimizer: str | None = _f(None, "Online Subspace Descent: optimizer of P (adam, sgd)")
    osd_orthonormalize: bool | None = _f(None, "Online Subspace Descent: re-orthonormalise P")
    rsvd_oversampling: float | None = _f(None, "--svd-method randomized: extra sketch columns, a "
                                         "fraction of the rank (0.5)")
    rsvd_power_iters: int | None = _f(None, "--svd-method randomized: power iterations (1)")
    importance_pool: float | None = _f(None, "I3S with --svd-method randomized: sample among the top "
                                       "pool x rank triplets only (a different law; default: the "
                                       "whole spectrum)")
    state_bits: int | None = _f(None, "bits per stored optimizer moment: 32, 16 (bf16) or 8 "
                                "(block-wise, needs bitsandbytes)")
    projector_bits: int | None = _f(None, "bits per stored projector entry: 32, 16 (bf16) or 8 "
                                    "(block-wise linear map, needs bitsandbytes); the math stays fp32")
    foreach: bool | None = _f(None, "true: the grouped path (batched projections, foreach moments) "
                              "for ordinary steps; default: on for CUDA")


@dataclass
class TrainConfig:
    model: str = _f("tiny", "model size: " + ", ".join(MODEL_SHAPES))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = _f(16, "sequences per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step",
                         aliases=["--accumulate"])
    step_in_backward: bool = _f(False, "update each weight inside backward and free its gradient "
                                "(subspace optimizers); with --grad-accum K > 1 projected weights "
                                "accumulate in the subspace; --clip then clips per parameter and "
                                "needs K = 1")
    fsdp: bool = _f(False, "shard weights, gradients and optimizer state with FSDP2 (fully_shard per "
                    "decoder block, then the root) instead of DDP; under torchrun only (docs/fsdp.md)")
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
                        "'skip' skips the update and counts it", choices=NONFINITE_POLICIES)
    checkpoint_every: int = _f(0, "steps between checkpoints (0: none)")
    keep_last_k: int = _f(2, "checkpoints kept (older ones are purged after a new one commits)")
    out_dir: str = _f("runs/pretrain", "run directory (metrics.jsonl, checkpoints/)")
    report_to: str = _f("none", "also log metrics to a local tracker (metrics.jsonl stays the "
                        "record)", choices=TRACKERS)
    device: str = _f("auto", "where to train", choices=DEVICES)
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
        """Ranges and names, before anything is built; the optimizer's own settings are checked by
        the library itself (`preflight.check_optimizer`)."""
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"config: {name} ({flag(name)}) must be {rule}, "
                                 f"got {_get(self, name)!r}")
        from .optimizers import check_method
        if self.model not in MODEL_SHAPES:
            raise ValueError(f"unknown model {self.model!r}; allowed: {', '.join(MODEL_SHAPES)} "
                             f"(--model)")
        check_method(self.optim.method)
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
        check(self.optim.dense_lr is None or self.optim.dense_lr > 0, "optim.dense_lr", "> 0")
        check(self.optim.weight_decay >= 0, "optim.weight_decay", ">= 0")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", "in [0, 1)")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        check(self.clip >= 0, "clip", ">= 0")
        check(0 <= self.data.val_fraction < 1, "data.val_fraction", "in [0, 1)")
        check(self.nonfinite in NONFINITE_POLICIES, "nonfinite", " or ".join(NONFINITE_POLICIES))
        check(self.device in DEVICES, "device", ", ".join(DEVICES))
        check(self.report_to in TRACKERS, "report_to", ", ".join(TRACKERS))
        if self.fsdp:
            _check_fsdp(self)
        if self.step_in_backward and self.grad_accum > 1 and self.clip > 0:
            raise ValueError("config: --step-in-backward with --grad-accum > 1 cannot clip (the "
                             f"accumulated full gradient is never formed); pass --clip 0, got {self.clip}")
        return self

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From `to_dict()`'s nested form, or flat leaf names, or a mix; missing keys keep their
        defaults, so a config saved before a field existed still loads."""
        return apply_values(cls(), d)


# ---- leaf names: one flat namespace over the sections -----------------------------------------
def sections(cls=TrainConfig) -> dict[str, type]:
    """Section field name -> its dataclass (`data`, `optim`)."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls)
            if f.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(f.default_factory)}


def leaves(cls=TrainConfig) -> dict[str, str]:
    """Leaf name -> dotted path (`lr` -> `optim.lr`, `batch_size` -> `batch_size`)."""
    subs = sections(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in subs:
            out.update({k: f"{f.name}.{v}" for k, v in leaves(subs[f.name]).items()})
        else:
            out[f.name] = f.name
    return out


def _check_fsdp(cfg: TrainConfig) -> None:
    """What --fsdp does not combine with, before anything is built."""
    for name in ("state_bits", "projector_bits"):
        bits = getattr(cfg.optim, name)
        if bits is not None and bits < 32:
            raise ValueError(f"config: --fsdp needs --{name.replace('_', '-')} 32 (compressed "
                             f"optimizer state is not supported for sharded weights), got {bits}")


# the flags users know these fields by (each field also has its own name as a flag)
_HABITUAL_FLAGS = {"data.source": "--data", "optim.method": "--optimizer"}


def flag(dotted: str) -> str:
    """The command-line flag of a dotted field name, for messages."""
    return _HABITUAL_FLAGS.get(dotted) or "--" + dotted.rsplit(".", 1)[-1].replace("_", "-")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        cfg = getattr(cfg, p)
    setattr(cfg, leaf, value)


def flatten(d: dict[str, Any], cls=TrainConfig, where: str = "config") -> dict[str, Any]:
    """Leaf name -> value from a nested (`to_dict`) or flat dict; unknown keys are an error."""
    subs, names = sections(cls), leaves(cls)
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in subs:
            out.update(flatten(value, subs[key], f"{where}.{key}"))
        elif key in names and not isinstance(value, dict):
            out[key] = value
        elif key == "model" and isinstance(value, dict) and set(value) == {"name"}:
            out["model"] = value["name"]  # saved before the model was one field
        elif key == "name" and cls is OptimConfig:
            out["method"] = value  # saved before the method was called so
        else:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(names))}")
    return out


def apply_values(cfg, d: dict[str, Any]):
    """Set the leaves named in `d` (nested or flat) on a copy of `cfg`."""
    cfg = dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k))
                                      for k in sections(type(cfg))})
    paths = leaves(type(cfg))
    for key, value in flatten(d, type(cfg)).items():
        _set(cfg, paths[key], value)
    return cfg
