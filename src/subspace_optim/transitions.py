"""Transitions: what happens to the inner optimizer's state when the subspace changes.

``keep`` is GaLore's and I3S's published behaviour (arXiv 2403.03507, 2502.05790): the moments are
left as they are, so right after a refresh they are expressed in the old basis (GaLore issue #54).
``reset`` zeroes them and restarts the bias correction, as if the inner Adam started afresh in the
new subspace.
"""

from __future__ import annotations

import torch


class Transition:
    name = "base"
    exact_state_keys: tuple[str, ...] = ()

    def apply(self, state: dict, inner, old: torch.Tensor, new: torch.Tensor) -> None:
        """Update ``state`` in place for the change of basis ``old`` (k, r) -> ``new`` (k, r)."""
        raise NotImplementedError


class Keep(Transition):
    name = "keep"

    def apply(self, state, inner, old, new) -> None:
        pass


class Reset(Transition):
    name = "reset"

    def apply(self, state, inner, old, new) -> None:
        for key in (*inner.first_moments, *inner.second_moments):
            state[key].zero_()
        state["inner_step"] = 0


TRANSITIONS: dict[str, Transition] = {t.name: t for t in (Keep(), Reset())}


def get_transition(name: str) -> Transition:
    try:
        return TRANSITIONS[name]
    except KeyError:
        raise ValueError(f"transition: unknown transition {name!r}; allowed: {sorted(TRANSITIONS)}") from None
