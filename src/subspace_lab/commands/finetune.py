"""`subspace finetune`: prompted fine-tuning with MeZO, SubZero or AdamW (see subspace_lab.finetune)."""
from __future__ import annotations

from ..finetune import add_parser, run

__all__ = ["add_parser", "run"]
