"""Generalised error feedback, after LDAdam ("LDAdam: Adaptive Optimization from Low-Dimensional
Gradient Statistics", Robert et al., arXiv 2410.16103, ICLR 2025; official code IST-DASLab/LDAdam).

What a projected step loses is kept in an error buffer ``xi`` and added to the next gradient: the
gradient-compression error ``a - P P^T a`` and the state-compression error, the momentum mass that a
change of basis drops, ``coef * (P_old m_old - P_new m~)`` (``coef`` = beta1 / (1 - beta1) for Adam,
see ``inner.feedback_coefficient``).

Deliberate deviation from the official code: the buffer lives in the optimizer state
(``state["error_buffer"]``, fp32, the parameter's shape), not in ``p.grad``. So it is saved by
``state_dict`` (a resumed run keeps it), it is not clipped by gradient clipping, ``zero_grad`` is the
ordinary one, and it keeps fp32 precision with bf16 weights. It generalises to every selector,
transition and inner rule; with ``transition="keep"`` the state term is ``coef * (P_old - P_new) m``.
Enabled by the group key ``error_feedback`` (bool); dense parameters lose nothing and have no buffer.
"""

from __future__ import annotations

import torch

BUFFER = "error_buffer"
EXACT_STATE_KEYS = (BUFFER,)


class NoFeedback:
    """The stage when ``error_feedback=False``: the gradient passes through (in fp32), nothing is
    kept."""

    def corrected_gradient(self, state: dict, grad: torch.Tensor, left: bool) -> torch.Tensor:
        """The gradient the projection sees, in left form (k, l), fp32."""
        return grad.to(torch.float32)

    def momentum_mass(self, state: dict, inner, basis: torch.Tensor) -> torch.Tensor | None:
        return None

    def lost_momentum(self, before, state: dict, inner, old: torch.Tensor, new: torch.Tensor, shard=None):
        return None

    def store(self, state: dict, corrected: torch.Tensor, basis: torch.Tensor, reduced: torch.Tensor,
              lost_momentum, coefficient: float, left: bool) -> None:
        pass


class ErrorFeedback(NoFeedback):
    """Generalised error feedback (see the module docstring)."""

    def corrected_gradient(self, state, grad, left):
        """``a = G + xi`` in left form (k, l), fp32; creates a zero buffer (parameter shape)."""
        buffer = state.get(BUFFER)
        if buffer is None:
            shape = grad.shape if left else grad.T.shape
            buffer = state[BUFFER] = torch.zeros(shape, dtype=torch.float32, device=grad.device)
        return grad.to(torch.float32) + (buffer if left else buffer.T)

    def momentum_mass(self, state, inner, basis):
        """``P m`` (k, l) fp32 for the inner rule's first moment, None for a rule without one."""
        if not inner.first_moments:
            return None
        return basis @ state[inner.first_moments[0]].to(torch.float32)

    def lost_momentum(self, before, state, inner, old, new, shard=None):
        """The momentum mass a change of basis dropped: ``P_old m_old - P_new m~`` (None if the
        basis did not change, on every process of a sharded weight, or the rule keeps no momentum)."""
        if before is None or (torch.equal(old, new) if shard is None else shard.all_equal(old, new)):
            return None
        return before - self.momentum_mass(state, inner, new)

    def store(self, state, corrected, basis, reduced, lost_momentum, coefficient, left):
        """``xi <- a - P R + coef * lost_momentum``, with ``R`` the projected gradient exactly as the
        inner rule receives it (after its cast to the state dtype), so nothing is lost to rounding."""
        error = corrected - basis @ reduced.to(torch.float32)  # (k, l)
        if lost_momentum is not None and coefficient != 0:
            error.add_(lost_momentum, alpha=coefficient)
        state[BUFFER].copy_(error if left else error.T)


FEEDBACK_STAGES = {False: NoFeedback(), True: ErrorFeedback()}
