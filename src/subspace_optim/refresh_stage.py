"""The refresh stage of a projected step: when a weight's basis is due for a new one, the selection
(``selectors/``), the transition of the inner state to the new basis (``transitions.py``) and what
error feedback needs of it; and, for FSDP2-sharded weights, writing the local step back as
``DTensor``s (``sharding.py``). Mixed into the optimizer (``optimizer.py``).

With the group option ``batch_refresh``, an ordinary ``step()`` first computes the new bases of the
due weights that share a ``batch_key`` with another, one ``refresh_batch`` call per key
(``batched_refresh.py``; :meth:`RefreshMixin._batched_selections`); each weight's refresh then takes
its precomputed basis instead of calling the selector, and does everything else (transition, overlap,
error feedback, counters) as usual. Sharded weights, compiled steps and updates inside backward
(``in_backward.py``, which never reaches ``_update_all``) keep the per-weight selection.
"""

from __future__ import annotations

import torch

from . import batched_refresh, error_feedback
from .dtypes import state_dtype
from .functional import left_form
from .inner import INNER_RULES
from .selectors import SELECTORS, SelectionContext
from .sharding import WHOLE, is_dtensor, local, shards_of
from .sides import two_sided
from .state_storage import compute_dtype, stored_basis
from .transitions import TRANSITIONS

# A batched selection that returned the weight's previous basis (an all-zero gradient): the refresh
# keeps the basis it holds, as the per-weight path does (the object itself, so that 8-bit codes are
# put back rather than quantised again).
KEEP_PREVIOUS = object()


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

    @staticmethod
    def _initial_state(group: dict, left: bool, phase: int) -> dict:
        """A projected weight's state before its first step (plain ints: the refresh schedule reads
        them without a host sync, for torch.compile)."""
        return dict(step=0, inner_step=0, refresh_count=0, project_left=left, refresh_phase=phase)

    def _batched_selections(self, work) -> dict[int, dict]:
        """``{id(p): {"left": basis, "right": basis}}`` for the weights due for a refresh in groups
        with ``batch_refresh`` whose selection shares a ``batch_key`` with another's: each key's
        weights factorised by one ``refresh_batch`` call, before any weight is modified. A weight
        alone under its key, with no key (non-spectral and every-step selectors) or sharded is left
        out and selects on its own. Nothing in the state is modified here: each weight is seen as its
        step will see it (its error-feedback-corrected left-form gradient, its decoded previous basis,
        its refresh counter, at a first step the initial state). Compiled steps batch nothing."""
        if torch.compiler.is_compiling():
            return {}
        buckets: dict[tuple, list] = {}
        for group, key, p in work:
            if not group.get("batch_refresh", False) or not self._is_projected(group, p) or is_dtensor(p):
                continue
            state = self.state.get(p)
            if not self._refresh_due(group, state):
                continue
            selector = SELECTORS.lookup(group["selector"])
            left, rank, _ = self._layout(group, p)
            k, l = p.shape if left else p.shape[::-1]
            sides = (("left", (k, l)), ("right", (l, k))) if two_sided(group["side"]) else (("left", (k, l)),)
            for side, shape in sides:
                # the key needs only the fp32 gradient's shape and device: a zero-stride stand-in
                stand_in = torch.zeros((), dtype=torch.float32, device=p.device).expand(shape)
                bkey = batched_refresh.batch_key(selector, stand_in, rank, group)
                if bkey is not None:
                    buckets.setdefault(bkey, []).append((group, key, p, side, selector))
        chosen: dict[int, dict] = {}
        for members in buckets.values():
            if len(members) < 2:
                continue
            grads, previous, ranks, contexts = [], [], [], []
            for group, key, p, side, _ in members:
                state = self.state.get(p)
                left, rank, _ = self._layout(group, p)
                # a copy: error feedback creates its buffer in the state it is given
                view = dict(state) if state else self._initial_state(group, left, self._refresh_phase(group, p))
                feedback = error_feedback.FEEDBACK_STAGES[group["error_feedback"]]
                grad = feedback.corrected_gradient(view, left_form(p.grad, left), left)
                inner = INNER_RULES.lookup(group["inner"])
                if side == "left":
                    grads.append(grad)
                    previous.append(stored_basis(view) if "projector" in view else None)
                    contexts.append(SelectionContext(view, group, key, view["refresh_count"], inner, WHOLE))
                else:
                    grads.append(grad.T)
                    previous.append(view.get("projector_right"))
                    contexts.append(SelectionContext(view, group, key + "/right", view["refresh_count"],
                                                     inner, WHOLE))
                ranks.append(rank)
            bases = batched_refresh.refresh_batch(members[0][4], grads, previous, ranks, contexts)
            del grads
            for (_, _, p, side, _), basis, prev in zip(members, bases, previous):
                chosen.setdefault(id(p), {})[side] = KEEP_PREVIOUS if basis is prev else basis
        return chosen

    @staticmethod
    def _select(selector, grad, previous, rank, ctx, chosen: dict | None, side: str) -> torch.Tensor:
        """The new basis: the one the batched refresh chose for this side, else the selector's."""
        if chosen is not None and side in chosen:
            return previous if chosen[side] is KEEP_PREVIOUS else chosen[side]
        return selector.select(grad, previous, rank, ctx)

    def _refresh_if_due(self, group, key, p, state, grad, rank, inner, feedback, shard, chosen=None):
        """Select a new basis when due and move the inner state to it; returns the momentum mass the
        change of basis lost (for error feedback), else None. ``chosen``: this weight's bases from
        :meth:`_batched_selections`, used instead of selecting (the same bases, bitwise on CPU)."""
        if not self._refresh_due(group, state):
            return None
        selector = SELECTORS.lookup(group["selector"])
        previous = state.get("projector")
        ctx = SelectionContext(state, group, key, state["refresh_count"], inner, shard)
        basis = self._select(selector, grad, previous, rank, ctx, chosen, "left")
        if two_sided(group["side"]):  # the right basis: the same selector on G^T, its own random stream
            right_shard = shards_of(p, False, self.communication, "refresh")
            right_ctx = SelectionContext(state, group, key + "/right", state["refresh_count"], inner, right_shard)
            state["projector_right"] = self._select(selector, grad.T, state.get("projector_right"), rank,
                                                    right_ctx, chosen, "right")
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
