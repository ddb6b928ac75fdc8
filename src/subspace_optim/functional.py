"""The arithmetic of one projected step, as pure functions over tensors and numbers.

The optimizer (``optimizer.py``) does the bookkeeping (state set-up, the side rule, when to refresh)
and calls these, as ``torch.optim.Adam`` calls its free ``adam()`` function. They take tensors and
numbers only (no dicts, no ``.item()``): that is what ``torch.compile``, the grouped path and
DTensors need. A weight W (m, n) is handled in *left form* G (k, l): G itself for a left projection,
G^T for a right one, so that every basis is (k, r) with orthonormal columns.
"""

from __future__ import annotations

import torch


def step_number(step: torch.Tensor):
    """A ``step`` count tensor as the number the bias corrections take: eagerly a Python float
    (torch.optim's arithmetic, bit for bit); under ``torch.compile`` the tensor itself, as torch.optim
    keeps it (``.item()`` would break the graph), in float64 so that the corrections round as they
    do from the eager float."""
    return step.to(torch.float64) if torch.compiler.is_compiling() else step.item()


def left_form(matrix: torch.Tensor, left: bool) -> torch.Tensor:
    """``matrix`` (m, n) as (k, l): itself for a left projection, its transpose (a view) otherwise."""
    return matrix if left else matrix.T


def project(basis: torch.Tensor, grad: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
    """``R = P^T G``: (k, r) x (k, l) -> (r, l); two-sided with a right basis Q (l, r):
    ``P^T G Q`` (r, r)."""
    reduced = basis.T @ grad
    return reduced if right is None else reduced @ right


def back_project(basis: torch.Tensor, direction: torch.Tensor, left: bool,
                 right: torch.Tensor | None = None) -> torch.Tensor:
    """``P N`` in the weight's own layout: (k, l) for a left projection, (l, k) = (P N)^T for a right
    one, computed as ``N^T P^T`` so that the update is contiguous like the weight; two-sided
    (always in left form): ``P N Q^T``."""
    if right is not None:
        return basis @ direction @ right.T
    return basis @ direction if left else direction.T @ basis.T


def lion_sign(update: torch.Tensor, sign: bool) -> torch.Tensor:
    """The update as applied: Lion's ``sign(update)`` when ``sign`` (the inner rule's
    ``sign_after_backprojection``), taken on the back-projected, full-space update (in a subspace
    after back-projection, as Online Subspace Descent's GaLore-Lion does; on a dense weight on the
    direction itself), else ``update`` unchanged. Element-wise, so a block of rows may take it alone."""
    return update.sign() if sign else update


def apply_update(param: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor | None,
                 step_size, lr: float, weight_decay: float, decay_after_update: bool = False) -> None:
    """``W <- (1 - lr * wd) W - step_size * numerator / denominator``, in place.

    Decoupled weight decay first, as ``torch.optim.AdamW``, or after the update as transformers' and
    galore-torch's AdamW do (``decay_after_update``); with a float ``step_size`` the update is one
    fused ``addcdiv_`` / ``add_`` (torch's exact arithmetic). Under ``torch.compile`` the bias
    correction, hence ``step_size``, may be a 0-dim tensor, which those fused ops do not take; and
    inductor (CPU, torch 2.13) drops the ``alpha`` of ``p.add_(A @ B, alpha=c)`` (it rewrites the
    pair into an ``addmm`` without it), so compiled steps multiply explicitly.
    """
    if weight_decay != 0 and not decay_after_update:
        param.mul_(1 - lr * weight_decay)
    if isinstance(step_size, torch.Tensor) or torch.compiler.is_compiling():
        ratio = numerator if denominator is None else numerator / denominator
        if isinstance(step_size, torch.Tensor):
            step_size = step_size.to(ratio.dtype)
        param.sub_(ratio * step_size)
    elif denominator is None:
        param.add_(numerator, alpha=-step_size)
    else:
        param.addcdiv_(numerator, denominator, value=-step_size)
    if weight_decay != 0 and decay_after_update:
        param.add_(param, alpha=-lr * weight_decay)
