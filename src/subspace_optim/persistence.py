"""What a ``SubspaceOptimizer`` saves and restores: pickling (``__getstate__`` / ``__setstate__``),
``load_state_dict`` with its checks (``state_checks.py``) and the state keys that keep their saved
dtype (``exact_state.py``), and the skip counter that compiled steps keep on the device until it is
read or saved (``nonfinite.py``). Mixed into the optimizer (``optimizer.py``).
"""

from __future__ import annotations

import torch

from . import error_feedback
from .dtypes import state_dtype
from .exact_state import ExactStateMixin
from .inner import INNER_RULES
from .nonfinite import PendingSkips
from .selectors import SELECTORS
from .state_checks import prepare_loaded_state
from .state_storage import STORAGE, compute_dtype
from .transitions import TRANSITIONS

# State that torch's load_state_dict would cast to the parameter dtype (it spares only "step"):
# kept at its saved dtype instead. Components add their own through ``exact_state_keys``.
BASE_EXACT_STATE_KEYS = ("step", "projector", "projector_right")


class PersistenceMixin(ExactStateMixin):
    """Mix into a ``torch.optim.Optimizer`` (before it in the bases)."""

    def __getstate__(self) -> dict:
        # torch's pickles only defaults, state and param_groups; keep the per-optimizer settings too.
        self._fold_pending_skips()
        return {**super().__getstate__(), "nonfinite": self.nonfinite, "_default_subspace": self._default_subspace,
                "_warned_full_rank": self._warned_full_rank, "_pending_skips": PendingSkips()}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("nonfinite", "error")
        state.setdefault("_default_subspace", None)
        state.setdefault("_warned_full_rank", False)
        state.setdefault("_pending_skips", PendingSkips())
        state.setdefault("communication", {})
        super().__setstate__(state)
        self.register_state_dict_pre_hook(PersistenceMixin._fold_pending_skips)
        for group in self.param_groups:  # dicts saved by older versions lack newer keys
            group.setdefault("subspace", False)
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict, *, allow_method_change: bool = False) -> None:
        """torch's ``load_state_dict``, after checking everything it would load (``state_checks.py``):
        bad values or missing, misshapen or non-finite state raise ``ValueError`` and change nothing.
        Loading a state saved with another method (selector, transition, inner rule, error feedback,
        side, rank, projection on or off) needs ``allow_method_change=True``."""
        self._allow_method_change = allow_method_change
        try:
            super().load_state_dict(state_dict)
        finally:
            del self._allow_method_change

    def _prepare_loaded_state(self, state_dict: dict) -> dict:
        return prepare_loaded_state(self, state_dict, getattr(self, "_allow_method_change", False))

    def _moment_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        """The dtype this optimizer keeps ``p``'s (uncompressed) moments in."""
        return compute_dtype(group, state_dtype(p)) if self._is_projected(group, p) else p.dtype

    def _exact_state_keys(self) -> set[str]:
        """``step``, fp32 projectors, error buffers, the inner rules' moments (given their dtype by
        ``state_checks``) and the components' own fp32/integer state."""
        keys = set(BASE_EXACT_STATE_KEYS) | set(error_feedback.EXACT_STATE_KEYS)
        keys |= {key for rule in INNER_RULES.values() for key in rule.state_keys}
        for registry in (SELECTORS, TRANSITIONS, INNER_RULES, STORAGE):
            keys |= registry.exact_state_keys()
        return keys

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``nonfinite="skip"``."""
        self._fold_pending_skips()
        return self.param_groups[0]["skipped_steps"] if self.param_groups else 0

    def _fold_pending_skips(self, *_) -> None:
        """Add the skips counted on the device by compiled steps (``nonfinite.py``) to the groups."""
        pending = self._pending_skips.take()
        if pending:
            for group in self.param_groups:
                group["skipped_steps"] += pending
