"""The registry of first-order optimizers under test: every entry gets the generic (G*) and subspace
(S*) property tests for free. Add a preset by appending one ``OptimInfo``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from subspace_optim import GaLoreAdamW, I3SAdamW, SubspaceOptimizer


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: Callable  # (params, **kwargs) -> torch.optim.Optimizer
    kwargs: dict = field(default_factory=dict)  # small-problem settings, merged under test overrides
    random: bool = False  # the basis depends on the seed
    # False for selectors that move every step (OSD, power iteration): no "fixed within a window" tests
    windowed: bool = True
    # the update lies in span(P) (False with error feedback, which adds back what P lost)
    update_in_subspace: bool = True

    def make(self, params, **overrides):
        return self.cls(params, **{**self.kwargs, **overrides})


SMALL = dict(rank=2, update_proj_gap=3, lr=1e-2)

OPTIMIZERS = [
    OptimInfo("galore", GaLoreAdamW, dict(SMALL)),
    OptimInfo("i3s", I3SAdamW, dict(SMALL), random=True),
    OptimInfo("i3s_reset", I3SAdamW, dict(SMALL, transition="reset"), random=True),
    OptimInfo("random", SubspaceOptimizer, dict(SMALL, selector="random"), random=True),
]

BY_NAME = {info.name: info for info in OPTIMIZERS}
