"""The back-projected update ``W <- (1 - lr wd) W - step_size * P N`` applied without materialising
the whole fp32 update of a low-precision weight.

The reference (fp32 weights, and any weight when ``block_bytes`` is None) forms ``U = P N`` in the
weight's layout (``functional.back_project``) and applies it at once. For a bf16 weight ``U`` is an
fp32 (m, n) temporary twice the weight's size, the largest allocation of its step (a 7B MLP weight:
180 MB); here it is formed and applied row block by row block (each block's rows of ``P N`` are the
same dot products over ``r``), so at most ``block_bytes`` of it exist at once. Lion's sign is taken
element-wise, per block.
"""

from __future__ import annotations

import torch

from .functional import apply_update, back_project, lion_sign

BLOCK_BYTES = 1 << 24


def back_project_and_apply(param: torch.Tensor, basis: torch.Tensor, direction: torch.Tensor, left: bool,
                           step_size, lr: float, weight_decay: float, sign: bool,
                           block_bytes: int | None = BLOCK_BYTES, right: torch.Tensor | None = None,
                           decay_after_update: bool = False) -> None:
    """``param`` (m, n) in place; ``basis`` (k, r) fp32, ``direction`` N (r, l) fp32, or (r, r) with
    a two-sided projection's ``right`` basis (l, r) (see ``functional.back_project`` for the layouts)."""
    if param.dtype == torch.float32 or block_bytes is None or not param.is_contiguous():
        update = back_project(basis, direction, left, right)
        apply_update(param, lion_sign(update, sign), None, step_size, lr, weight_decay,
                     decay_after_update)
        return
    rows = max(1, block_bytes // (4 * max(param.shape[1], 1)))
    for i in range(0, param.shape[0], rows):
        j = min(param.shape[0], i + rows)
        if right is not None:
            part = basis[i:j] @ direction @ right.T  # rows i:j of P N Q^T
        else:
            part = basis[i:j] @ direction if left else direction[:, i:j].T @ basis.T  # rows i:j of P N
        apply_update(param[i:j], lion_sign(part, sign), None, step_size, lr, weight_decay,
                     decay_after_update)
