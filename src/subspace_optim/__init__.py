"""subspace_optim: memory-efficient subspace optimizers for LLM training (GaLore, I3S, Online
Subspace Descent, LDAdam, ...)."""

from .diagnostics import optimizer_state_bytes, subspace_diagnostics
from .optimizer import SubspaceOptimizer
from .presets import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW
from .routing import subspace_param_groups

__version__ = "0.1.0"

__all__ = [
    "GaLoreAdamW",
    "I3SAdamW",
    "LDAdamW",
    "OnlineSubspaceAdamW",
    "SubspaceOptimizer",
    "optimizer_state_bytes",
    "subspace_diagnostics",
    "subspace_param_groups",
]
