"""The grouped path of an ordinary projected step (``foreach=True``).

Weights of one param group with the same shape, side, rank and dtype that do not refresh this step
are stepped together: one batched matmul projects all their gradients, the inner rule runs as
``torch._foreach_*`` ops over their moments, one batched matmul back-projects; the same arithmetic
as the per-tensor reference (``SubspaceOptimizer._projected_step``), with fewer, larger kernels (what
GPUs want; on CPU torch's foreach ops loop over tensors). Refresh steps, error feedback, sharded
weights and inner rules without a foreach form (``InnerRule.foreach``) take the per-tensor path.
Matched against it in tests (batched and single matmuls may round differently: a relative
tolerance, not bitwise). The rules' foreach forms are the functions below, which ``inner.py`` wires
to its rules.
"""

from __future__ import annotations

import torch

from .functional import apply_update, left_form, step_number


def adam_directions_foreach(grads, exp_avgs, exp_avg_sqs, beta1: float, beta2: float, eps: float,
                            steps, correct_bias: bool = True):
    """``inner.adam_direction`` for lists of tensors: ``(ratios, bias_corrections)``."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    if correct_bias:
        torch._foreach_div_(denoms, [(1 - beta2**s) ** 0.5 for s in steps])
        corrections = [1 - beta1**s for s in steps]
    else:
        corrections = [1.0] * len(steps)
    torch._foreach_add_(denoms, eps)
    return torch._foreach_div(exp_avgs, denoms), corrections


def sgd_directions_foreach(grads, buffers, momentum: float):
    """``inner.sgd_momentum_direction`` for lists of tensors."""
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, grads)
    return list(buffers), [1.0] * len(buffers)


def dense_grouped_step(group: dict, params: list[torch.Tensor], states: list[dict]) -> None:
    """``torch.optim.AdamW``'s foreach step for a group's dense parameters (inner rule ``adam``)."""
    steps = []
    for state in states:
        state["step"] += 1
        steps.append(step_number(state["step"]))
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    torch._foreach_lerp_(exp_avgs, [p.grad for p in params], 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, [p.grad for p in params], [p.grad for p in params], value=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    if group["correct_bias"]:
        torch._foreach_div_(denoms, [(1 - beta2**s) ** 0.5 for s in steps])
        sizes = [-(lr / (1 - beta1**s)) for s in steps]
    else:
        sizes = [-lr] * len(steps)
    torch._foreach_add_(denoms, group["eps"])
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    if sizes and isinstance(sizes[0], torch.Tensor):
        # compiled: 0-dim tensor step sizes, which _foreach_addcdiv_ takes only as a CPU tensor of
        # scalars (not under fake tensors); multiply explicitly, as apply_update does
        ratios = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_mul_(ratios, sizes)
        torch._foreach_add_(params, ratios)
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denoms, sizes)


def bucket_key(group_index: int, p: torch.Tensor, state: dict) -> tuple:
    """Weights that can share batched matmuls: same group, shape, side, rank, dtype and device."""
    return (group_index, tuple(p.shape), state["project_left"], state["projector"].shape[1], p.dtype, p.device)


def grouped_step(group: dict, params: list[torch.Tensor], states: list[dict], inner, state_dtype) -> None:
    """One ordinary step of same-shaped projected weights (see the module docstring)."""
    left = states[0]["project_left"]
    bases = torch.stack([s["projector"] for s in states])  # (B, k, r) fp32
    grads = torch.stack([left_form(p.grad, left).to(torch.float32) for p in params])  # (B, k, l)
    reduced = torch.bmm(bases.transpose(1, 2), grads).to(state_dtype)  # (B, r, l)
    for state in states:
        state["step"] += 1
        state["inner_step"] += 1
    ratios, corrections = inner.directions_foreach(list(reduced.unbind(0)), states, group,
                                                   [s["inner_step"] for s in states])
    directions = torch.stack(ratios).to(torch.float32)  # (B, r, l)
    if left:
        updates = torch.bmm(bases, directions)  # (B, k, l)
    else:  # (P N)^T = N^T P^T, contiguous like the weight
        updates = torch.bmm(directions.transpose(1, 2), bases.transpose(1, 2))
    lr, scale = group["lr"], group["scale"]
    for p, update, correction in zip(params, updates.unbind(0), corrections):
        apply_update(p, update.to(p.dtype), None, lr / correction * scale, lr, group["weight_decay"],
                     inner.decay_after_update)
