"""Inner rules: the small optimizer that runs on the projected gradient (or the full one, dense).

Each rule owns its state keys, creates them, and turns a gradient into an update direction. The
direction is returned as ``(numerator, denominator, step_divisor)`` so that the dense path can apply
it with one fused ``addcdiv_`` exactly as ``torch.optim.AdamW`` does (0-ulp parity), while the
subspace path back-projects ``numerator / denominator`` first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Direction:
    """An update direction ``numerator / denominator / step_divisor`` (denominator None means 1).

    ``step_divisor`` is Adam's first bias correction; it stays a separate scalar so that the update
    can use torch's exact ``lr / bias_correction1``.
    """

    numerator: torch.Tensor
    denominator: torch.Tensor | None
    step_divisor: float

    def dense(self) -> torch.Tensor:
        """``numerator / denominator`` as one tensor (``step_divisor`` not applied)."""
        if self.denominator is None:
            return self.numerator
        return self.numerator / self.denominator


class Adam:
    """Adam moments (``exp_avg``, ``exp_avg_sq``), arithmetic identical to torch's for-loop AdamW.

    Bias corrections use the parameter's own step counter ``step`` (1 on the first update).
    """

    name = "adam"
    first_moments = ("exp_avg",)
    second_moments = ("exp_avg_sq",)
    sign_after_backprojection = False

    exact_state_keys: tuple[str, ...] = ()

    def init_state(self, state: dict, template: torch.Tensor) -> None:
        """Zero moments shaped, typed and laid out like ``template``."""
        state["exp_avg"] = torch.zeros_like(template, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(template, memory_format=torch.preserve_format)

    def direction(self, grad: torch.Tensor, state: dict, group: dict, step: float) -> Direction:
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"])
        return Direction(exp_avg, denom, bias_correction1)


INNER_RULES: dict[str, object] = {"adam": Adam()}


def get_inner(name: str):
    try:
        return INNER_RULES[name]
    except KeyError:
        raise ValueError(f"inner: unknown inner rule {name!r}; allowed: {sorted(INNER_RULES)}") from None
