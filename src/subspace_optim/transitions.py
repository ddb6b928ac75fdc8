"""Transitions: what happens to the inner optimizer's state when the subspace changes.

``keep`` is GaLore's and I3S's published behaviour (arXiv 2403.03507, 2502.05790): the moments are
left as they are, so right after a refresh they are expressed in the old basis (GaLore issue #54).
``reset`` zeroes them and restarts the bias correction, as if the inner Adam started afresh in the
new subspace. ``rotate`` is LDAdam's projection-aware update ("LDAdam: Adaptive Optimization from
Low-Dimensional Gradient Statistics", arXiv 2410.16103, official code): the first moments are
re-expressed in the new basis by ``C = P_new^T P_old`` and Adam's second moment by LDAdam's variance
rule; it works after any selector (one-word option of GaLore and I3S, which no peer library offers).
"""

from __future__ import annotations

import torch

from .components import Component, Registry
from .sharding import WHOLE, Whole


class Transition(Component):
    """Base class: ``apply`` updates the inner state in place for a change of basis."""

    def apply(self, state: dict, inner, old: torch.Tensor, new: torch.Tensor, group: dict,
              shard: Whole = WHOLE) -> None:
        """Update ``state`` in place for the change of basis ``old`` (k, r) -> ``new`` (k, r); on a
        sharded weight the bases are this process's rows (``sharding.py``)."""
        raise NotImplementedError


class Keep(Transition):
    name = "keep"

    def apply(self, state, inner, old, new, group, shard=WHOLE) -> None:
        pass


class Reset(Transition):
    name = "reset"

    def apply(self, state, inner, old, new, group, shard=WHOLE) -> None:
        for key in inner.state_keys:
            state[key].zero_()
        state["inner_step"] = 0


class Rotate(Transition):
    """Projection-aware state transfer, with ``k`` = completed inner steps and
    ``c1 = 1 - beta1^k``, ``c2 = 1 - beta2^k``:

    1. ``C = P_new^T P_old`` (r, r), in fp32.
    2. Every first moment: ``m~ = C m``.
    3. Adam's second moment (LDAdam, algorithms.md 4(a) step 7): ``var = v / c2 - m^2 / c1^2``;
       ``var' = (C o C) var``; ``v~ = c2 * |var' + m~^2 / c1^2|``, never negative.

    The bitwise identity when the basis does not change (``P_new == P_old``); a no-op before the
    first inner step (all moments are zero). Rotating through a non-orthonormal ``C`` (OSD without
    re-orthonormalisation) is the same formula, applied as is.
    """

    name = "rotate"

    def apply(self, state, inner, old, new, group, shard=WHOLE) -> None:
        steps_done = state["inner_step"]
        if steps_done == 0 or shard.all_equal(old, new):
            return
        c = shard.sum_k(new.T @ old)  # (r, r), fp32
        firsts = {key: state[key].to(torch.float32) for key in inner.first_moments}
        rotated = {key: c @ m for key, m in firsts.items()}
        if inner.second_moments:
            beta1, beta2 = group["betas"]
            c1, c2 = 1 - beta1**steps_done, 1 - beta2**steps_done
            m, m_new = firsts[inner.first_moments[0]], rotated[inner.first_moments[0]]
            for key in inner.second_moments:
                var = state[key].to(torch.float32) / c2 - (m / c1) ** 2
                var = (c * c) @ var
                state[key].copy_((var + (m_new / c1) ** 2).abs_().mul_(c2))
        for key, m_new in rotated.items():
            state[key].copy_(m_new)


TRANSITIONS: Registry[Transition] = Registry("transition", (Keep(), Reset(), Rotate()))


def get_transition(name: str) -> Transition:
    return TRANSITIONS.lookup(name)
