"""The non-finite policy: a step with a NaN or Inf gradient changes nothing (all or nothing).

Eagerly (the reference), every gradient is screened before anything is modified: the policy
``"error"`` raises naming the parameter, ``"skip"`` returns and counts the step. That screen needs a
host synchronisation, which ``torch.compile`` turns into a graph break. Under ``torch.compile`` with
``"skip"``, ordinary steps (no refresh due) therefore take :func:`all_or_nothing` instead: the
updates run unconditionally and every tensor they touched is then put back where a gradient was
non-finite (one ``torch.where`` per tensor, which the compiler fuses into the update: no sync, no
graph break). The skip is counted in a device tensor and folded into ``skipped_steps`` when it is
read or the state is saved. Documented difference: under compile a skipped step still advances the
plain-int counters (step, inner step, refresh schedule) of projected weights. ``"error"`` under
compile keeps the eager screen (one graph break per step); refresh steps always take it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from .sharding import is_dtensor, local


def first_nonfinite(work):
    """``(key, param)`` of the first non-finite gradient in ``work`` (group, key, param), else None.

    Sharded (``DTensor``) gradients are screened on their local shards, then one all-reduce tells
    every process whether any shard was bad and which parameter came first, so all processes take
    the same decision (and name the same parameter).
    """
    if not work:
        return None
    grads = [local(p.grad) for _, _, p in work]
    bad = _any_nonfinite(grads)
    group = next((p.grad.device_mesh.get_group() for _, _, p in work if is_dtensor(p.grad)), None)
    if group is not None:
        bad = _all_reduce_flag(float(bad), dist.ReduceOp.MAX, group, grads[0].device) > 0
    if not bad:
        return None
    first = next((i for i, g in enumerate(grads) if not bool(g.isfinite().all())), len(work))
    if group is not None:
        first = int(_all_reduce_flag(float(first), dist.ReduceOp.MIN, group, grads[0].device))
    if first == len(work):  # a finite sum overflowed: no bad value after all
        return None
    _, key, p = work[first]
    return key, p


def _any_nonfinite(grads) -> bool:
    by_device = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    # Fast screen: a NaN or Inf makes its tensor's sum non-finite, and a sum reads the gradient
    # once without allocating a mask. One synchronisation per device. A non-finite sum (a bad value,
    # or, practically never, a finite overflow) makes the caller search exactly.
    return not all(bool(torch.stack([g.sum(dtype=torch.float32) for g in gs]).isfinite().all())
                   for gs in by_device.values())


def _all_reduce_flag(value: float, op, group, device) -> float:
    flag = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(flag, op=op, group=group)
    return float(flag)


@contextmanager
def all_or_nothing(optimizer, work):
    """Run the body's updates, then undo them (parameters and every state tensor) if any gradient
    in ``work`` is non-finite, without a host synchronisation; counts the skip."""
    device = work[0][2].grad.device
    ok = torch.stack([p.grad.isfinite().all().to(device) for _, _, p in work]).all()
    saved = []
    for _, _, p in work:
        state = optimizer.state.get(p, {})
        tensors = {key: (value, value.clone()) for key, value in state.items() if isinstance(value, torch.Tensor)}
        saved.append((p, p.clone(), state, tensors))
    yield
    for p, old_p, state, tensors in saved:
        p.copy_(torch.where(ok, p, old_p))
        for key, (original, old) in tensors.items():
            now = state[key]
            if now is original:  # updated in place
                now.copy_(torch.where(ok, now, old))
            else:  # replaced by a new tensor
                state[key] = torch.where(ok, now, old)
    optimizer._pending_skips.add((~ok).to(torch.int64))


class PendingSkips:
    """Skips counted on the device by compiled steps, until read (a plain object: dynamo replays
    attribute writes on it, not on the optimizer)."""

    def __init__(self):
        self.count: torch.Tensor | None = None

    def add(self, skipped: torch.Tensor) -> None:
        self.count = skipped if self.count is None else self.count + skipped

    def take(self) -> int:
        count, self.count = self.count, None
        return 0 if count is None else int(count)


def nonfinite_agreed(grad: torch.Tensor) -> bool:
    """Whether one gradient has a NaN or Inf (one sum reads it once; only a non-finite sum pays for
    the exact search); for a sharded (``DTensor``) gradient in any process's shard: each process screens its local shard, then one all-reduce (max) of the flag over the
    shard group gives every process the same answer. Updates inside backward screen each parameter
    with it, so every process skips (or raises) together and enters the same collectives after."""
    g = local(grad)
    bad = _any_nonfinite([g]) and not bool(g.isfinite().all())  # a finite sum may overflow
    if is_dtensor(grad):
        bad = _all_reduce_flag(float(bad), dist.ReduceOp.MAX, grad.device_mesh.get_group(), g.device) > 0
    return bad
