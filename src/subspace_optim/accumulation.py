"""Gradient accumulation in the subspace: micro-batch gradients of a projected weight are summed as
``R = P^T G`` (r, l) instead of as the full (k, l) gradient.

Projection is linear, so ``sum_i P^T G_i = P^T sum_i G_i``: the inner rule sees the same projected
gradient as with ordinary accumulation, up to fp32 rounding (the sum is taken in another order).
It holds only while the basis ``P`` is fixed over the accumulation window and nothing else reads
the full gradient, so a weight accumulates its full gradient instead (:func:`needs_full_gradient`):

- at its first step and whenever its refresh is due (the selector factorises the full gradient);
  with ``stagger_refresh`` only a fraction ``~ n / update_proj_gap`` of the n weights is due per step;
- at every step for selectors that move every step (Online Subspace Descent's online PCA and
  LDAdam's power iteration read the full gradient each step) and with error feedback (the buffer
  keeps ``G + xi - P R``, which needs ``G``): OSD and LDAdam save nothing here;
- dense parameters (embeddings, norms, the LM head) always accumulate their full gradient.

Sharded weights (FSDP2's ``fully_shard``, ``sharding.py``) accumulate on their local shards: a right
projection (the sharded rows are the other side l) sums its local columns ``R_i = Q^T G_i`` (r, l_i),
nothing is communicated; a left projection (the sharded rows are the projected side k) sums its local
partial products ``P_i^T G_i`` (r, l) over the window and all-reduces them once, at the update
(``sum_i`` over shards commutes with the sum over micro-batches), the one all-reduce of the ordinary
step. A full-gradient step (a refresh) takes the ordinary step's sharded code.

Accumulators are fp32, except for bf16 weights, whose projected gradients accumulate in bf16 as
autograd accumulates their full gradients in bf16 (``accumulator_dtype``). They live in the in-backward handle only for
one window: they are not optimizer state and are not saved (save after ``opt.step()``).
"""

from __future__ import annotations

import torch

from .dtypes import state_dtype
from .functional import left_form, project
from .inner import INNER_RULES
from .sharding import local, shards_of
from .state_storage import compute_dtype, decoded, stored_basis


def needs_full_gradient(opt, group: dict, p: torch.Tensor) -> bool:
    """Whether ``p``'s next update reads its full gradient (see the module docstring)."""
    if not opt._is_projected(group, p) or group["error_feedback"]:
        return True
    state = opt.state.get(p)
    return not state or opt._refresh_due(group, state)


def accumulator_dtype(group: dict, p: torch.Tensor, accumulate: int) -> torch.dtype:
    """One micro-batch: the dtype the inner rule computes in (the step casts ``P^T G`` to it, so this
    is bitwise the step's own projection). Several: fp32, or bf16 for bf16 weights, as autograd sums
    their full gradients in bf16 (at 7B shapes, rank 1024, 3.2 GB instead of 6.5 GB)."""
    if accumulate == 1:
        return compute_dtype(group, state_dtype(p))
    return torch.bfloat16 if p.dtype == torch.bfloat16 else torch.float32


def project_gradient(opt, group: dict, p: torch.Tensor, grad: torch.Tensor, accumulate: int) -> torch.Tensor:
    """``P^T G`` (r, l) of one micro-batch gradient ``grad`` of ``p``, computed in fp32 (as the step
    does) and returned in the accumulator dtype. Sharded weights: of the local shards, a local
    partial product for a left projection (summed over processes by :func:`reduced_step`), kept in
    fp32 for one micro-batch as the step sums it across processes in fp32."""
    state = opt.state[p]
    left = state["project_left"]
    basis = stored_basis({k: local(v) for k, v in state.items()})  # (k, r) fp32; bf16 or 8 bits stored
    reduced = project(basis, left_form(local(grad), left).to(torch.float32))
    if accumulate == 1 and left and shards_of(p, left).sharded:
        return reduced
    return reduced.to(accumulator_dtype(group, p, accumulate))


def reduced_step(opt, group: dict, p: torch.Tensor, reduced: torch.Tensor) -> None:
    """One projected step of ``p`` from its accumulated projected gradient (no refresh is due).
    A sharded weight steps on its local shards; a left projection first all-reduces its partial
    products (every process does so for every such weight, in the same order)."""
    with decoded(opt, group, p):
        state = opt.state[p]
        left = state["project_left"]
        shard = shards_of(p, left, opt.communication, "step")
        reduced = shard.sum_k(reduced)
        state["step"] += 1
        state["inner_step"] += 1
        view = {k: local(v) for k, v in state.items()} if shard.sharded else state
        opt._reduced_update(group, p, view, reduced.to(compute_dtype(group, state_dtype(p))), left)
        if shard.sharded:
            opt._store_sharded(state, view, shard, group, INNER_RULES.lookup(group["inner"]))
