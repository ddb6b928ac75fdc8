"""`subspace finetune`: prompted fine-tuning with MeZO, SubZero or AdamW (see
`subspace_lab.finetune`); every `FinetuneConfig` field is a flag, and `--config` reads them from a
YAML/JSON file."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    from ..finetune import FinetuneConfig

    p = subparsers.add_parser("finetune", dataclass_types=FinetuneConfig, description=__doc__,
                              help="prompted fine-tuning with MeZO, SubZero or AdamW")
    p.set_defaults(func=run)


def label_words(words: list[str] | None) -> list[str] | None:
    """'no,yes' or ' no' ' yes' -> [' no', ' yes']: the word after the prompt, with its space."""
    if not words:
        return None
    split = [w.strip() for item in words for w in item.split(",") if w.strip()]
    return [" " + w for w in split]


def run(args) -> int:
    from ..args import build
    from ..finetune import FinetuneConfig, finetune

    cfg = build(FinetuneConfig, vars(args))
    cfg.label_words = label_words(cfg.label_words)
    result = finetune(cfg)
    summary = {k: result[k] for k in ("out_dir", "train_forward_passes", "peak_memory_mb",
                                      "train_seconds")}
    summary.update(before=result["before"]["accuracy"], after=result["after"]["accuracy"],
                   loss_before=result["before"]["loss"], loss_after=result["after"]["loss"])
    print(json.dumps(summary, indent=1))
    return 0
