"""The refresh stage of a projected step: when a weight's basis is due for a new one, the selection
(``selectors/``), the transition of the inner state to the new basis (``transitions.py``) and what
error feedback needs of it; and, for FSDP2-sharded weights, writing the local step back as
``DTensor``s (``sharding.py``). Mixed into the optimizer (``optimizer.py``).
"""

from __future__ import annotations

import torch

from . import error_feedback
from .dtypes import state_dtype
from .selectors import SELECTORS, SelectionContext
from .sharding import local, shards_of
from .sides import two_sided
from .state_storage import compute_dtype
from .transitions import TRANSITIONS


class RefreshMixin:
    """Mix into ``SubspaceOptimizer``; uses its ``state``, ``communication`` and ``_is_projected``."""

    def _any_refresh_due(self, work) -> bool:
        return any(self._is_projected(group, p) and self._refresh_due(group, self.state.get(p))
                   for group, _, p in work)

    def _refresh_due(self, group: dict, state: dict | None) -> bool:
        """A first step, an every-step selector, or the weight's step count (minus its phase) at a
        multiple of ``update_proj_gap``; plain ints only, so no host sync."""
        if not state or "projector" not in state:
            return True
        if SELECTORS.lookup(group["selector"]).every_step:
            return True
        return (state["step"] - state["refresh_phase"]) % group["update_proj_gap"] == 0

    @staticmethod
    def _store_sharded(state: dict, view: dict, shard, group: dict, inner) -> None:
        """Write a sharded weight's local step back: plain values as they are, new local tensors as
        ``DTensor``s placed like what they describe (``sharding.py``); tensors updated in place are
        the DTensors' own shards already."""
        basis_keys = {"projector", *SELECTORS.lookup(group["selector"]).basis_state_keys}
        for key, value in view.items():
            if not isinstance(value, torch.Tensor):
                state[key] = value
            elif key not in state or local(state[key]) is not value:
                role = ("basis" if key in basis_keys else "moments" if key in inner.state_keys
                        else "param" if key == error_feedback.BUFFER else "replicated")
                state[key] = shard.wrap(value, role)

    def _refresh_phase(self, group: dict, p: torch.Tensor) -> int:
        """0, or with ``stagger_refresh`` this weight's share ``i * gap // n`` of the refresh gap."""
        if not group["stagger_refresh"]:
            return 0
        projected = [q for q in group["params"] if self._is_projected(group, q)]
        index = next(i for i, q in enumerate(projected) if q is p)
        return index * group["update_proj_gap"] // len(projected)

    def _refresh_if_due(self, group, key, p, state, grad, rank, inner, feedback, shard):
        """Select a new basis when due and move the inner state to it; returns the momentum mass the
        change of basis lost (for error feedback), else None."""
        if not self._refresh_due(group, state):
            return None
        selector = SELECTORS.lookup(group["selector"])
        previous = state.get("projector")
        ctx = SelectionContext(state, group, key, state["refresh_count"], inner, shard)
        basis = selector.select(grad, previous, rank, ctx)
        if two_sided(group["side"]):  # the right basis: the same selector on G^T, its own random stream
            right_shard = shards_of(p, False, self.communication, "refresh")
            right_ctx = SelectionContext(state, group, key + "/right", state["refresh_count"], inner, right_shard)
            state["projector_right"] = selector.select(grad.T, state.get("projector_right"), rank, right_ctx)
        lost = None
        if previous is None:
            cols = rank if two_sided(group["side"]) else grad.shape[1]
            dtype = compute_dtype(group, state_dtype(p))
            inner.init_state(state, torch.empty((rank, cols), dtype=dtype, device=grad.device))
        else:
            state["overlap"] = shard.overlap(previous, basis)
            before = feedback.momentum_mass(state, inner, previous)
            TRANSITIONS.lookup(group["transition"]).apply(state, inner, previous, basis, group, shard)
            lost = feedback.lost_momentum(before, state, inner, previous, basis, shard)
        state["projector"] = basis
        state["refresh_count"] += 1
        return lost
