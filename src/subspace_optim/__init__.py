"""subspace_optim: memory-efficient subspace optimizers for LLM training (GaLore, I3S, Online
Subspace Descent, LDAdam) and zeroth-order fine-tuning (MeZO, SubZero)."""

from .diagnostics import optimizer_state_bytes, subspace_diagnostics
from .optimizer import SubspaceOptimizer
from .presets import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW
from .routing import subspace_param_groups
from .zeroth_order import MeZO, SubZero

__version__ = "0.1.0"

__all__ = [
    "GaLoreAdamW",
    "I3SAdamW",
    "LDAdamW",
    "MeZO",
    "OnlineSubspaceAdamW",
    "SubZero",
    "SubspaceOptimizer",
    "optimizer_state_bytes",
    "subspace_diagnostics",
    "subspace_param_groups",
]
