"""The registry of first-order optimizers under test: every entry gets the generic (G*) and subspace
(S*) property tests for free. Add a preset by appending one ``OptimInfo``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW, SubspaceOptimizer


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: Callable  # (params, **kwargs) -> torch.optim.Optimizer
    kwargs: dict = field(default_factory=dict)  # small-problem settings, merged under test overrides
    random: bool = False  # the basis depends on the seed
    # False for selectors that move every step (OSD, power iteration): no "fixed within a window" tests
    windowed: bool = True
    # the update lies in span(P) (False with error feedback, which adds back what P lost, and with
    # Lion, whose sign is taken after back-projection)
    update_in_subspace: bool = True
    # optimizer-state bytes beyond the inner rule's moments, the fp32 projector and the step, per
    # projected (k, l) matrix at rank r (OSD's P optimizer, LDAdam's error buffer)
    extra_state_bytes: Callable[[int, int, int], int] = lambda k, l, r: 0

    @property
    def inner(self) -> str:
        return self.kwargs.get("inner", "adam")

    def make(self, params, **overrides):
        return self.cls(params, **{**self.kwargs, **overrides})


SMALL = dict(rank=2, update_proj_gap=3, lr=1e-2)

OPTIMIZERS = [
    OptimInfo("galore", GaLoreAdamW, dict(SMALL)),
    OptimInfo("i3s", I3SAdamW, dict(SMALL), random=True),
    OptimInfo("i3s_reset", I3SAdamW, dict(SMALL, transition="reset"), random=True),
    OptimInfo("i3s_gram", I3SAdamW, dict(SMALL, svd_method="gram"), random=True),
    OptimInfo("random", SubspaceOptimizer, dict(SMALL, selector="random"), random=True),
    # Online Subspace Descent (paper and official-code variants) and LDAdam move every step
    OptimInfo("osd_paper", OnlineSubspaceAdamW, dict(SMALL), windowed=False,
              extra_state_bytes=lambda k, l, r: 2 * k * r * 4),  # P's Adam moments, fp32
    OptimInfo("osd_code", OnlineSubspaceAdamW, dict(SMALL, osd_variant="code"), windowed=False,
              extra_state_bytes=lambda k, l, r: 2 * k * r * 4),
    OptimInfo("osd_lion_sgd_p", OnlineSubspaceAdamW, dict(SMALL, inner="lion", osd_p_optimizer="sgd"),
              windowed=False, update_in_subspace=False, extra_state_bytes=lambda k, l, r: k * r * 4),
    OptimInfo("ldadam", LDAdamW, dict(SMALL), windowed=False, update_in_subspace=False,
              extra_state_bytes=lambda k, l, r: k * l * 4),  # the fp32 error buffer
    OptimInfo("i3s_rotate", I3SAdamW, dict(SMALL, transition="rotate"), random=True),
    OptimInfo("galore_lion", GaLoreAdamW, dict(SMALL, inner="lion", betas=(0.9, 0.99)),
              update_in_subspace=False),
    OptimInfo("galore_sgd", GaLoreAdamW, dict(SMALL, inner="sgd", momentum=0.9)),
]

BY_NAME = {info.name: info for info in OPTIMIZERS}
