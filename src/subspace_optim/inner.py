"""Inner rules: the small optimizer that runs on the projected gradient (or the full one, dense).

Each rule owns its state keys, creates them, and turns a gradient into an update direction. The
direction is returned as ``(numerator, denominator, step_divisor)`` so that the dense path can apply
it with one fused ``addcdiv_`` exactly as ``torch.optim.AdamW`` does (0-ulp parity), while the
subspace path back-projects ``numerator / denominator`` first.

Rules (group key ``inner``), all with decoupled weight decay ``p <- (1 - lr * wd) p`` applied by the
optimizer:

- ``adam``: torch's AdamW arithmetic; keys ``betas``, ``eps``.
- ``lion``: Lion ("Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675), keys ``betas``
  = (beta1, beta2), Lion's paper default (0.9, 0.99). ``sign_after_backprojection``: in a subspace
  the interpolation is back-projected first and the sign taken on the full matrix, as Online
  Subspace Descent's GaLore-Lion code does (arXiv 2408.12857), so ``scale`` has no effect.
- ``sgd``: SGD with heavy-ball momentum as ``torch.optim.SGD`` (dampening 0, no Nesterov), key
  ``momentum`` in [0, 1) (default 0.9). A buffer is kept even with ``momentum=0`` so that the state
  layout does not depend on a runtime value. Deviation from ``torch.optim.SGD``: weight decay is
  decoupled, as for every rule here.

Besides ``direction``, each rule tells the subspace machinery how to read its state:
``first_moments`` / ``second_moments`` (rotated by transitions), ``momentum_estimate`` (the momentum
in gradient units, used by LDAdam's power selector) and ``feedback_coefficient`` (the weight of the
state-compression term of generalised error feedback, LDAdam's beta1 / (1 - beta1) for Adam).
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


    def momentum_estimate(self, state: dict, group: dict, steps_done: int) -> torch.Tensor | None:
        """Bias-corrected first moment ``m / (1 - beta1^k)`` after ``k`` steps (None when k = 0)."""
        if steps_done == 0:
            return None
        return state["exp_avg"].to(torch.float32) / (1 - group["betas"][0] ** steps_done)

    def feedback_coefficient(self, group: dict) -> float:
        # m_next = beta1 * m + (1 - beta1) * g: mass lost from m re-enters through g scaled this way.
        beta1 = group["betas"][0]
        return beta1 / (1 - beta1)


class Lion:
    """Lion: ``c = beta1 * m + (1 - beta1) * g``; update ``sign(c)``; then
    ``m <- beta2 * m + (1 - beta2) * g``. The direction returned is ``c`` (no sign): the optimizer
    takes the sign after back-projection (on the dense path back-projection is the identity)."""

    name = "lion"
    first_moments = ("exp_avg",)
    second_moments = ()
    sign_after_backprojection = True

    exact_state_keys: tuple[str, ...] = ()

    def init_state(self, state: dict, template: torch.Tensor) -> None:
        state["exp_avg"] = torch.zeros_like(template, memory_format=torch.preserve_format)

    def direction(self, grad: torch.Tensor, state: dict, group: dict, step: float) -> Direction:
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        interpolation = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
        exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return Direction(interpolation, None, 1.0)

    def momentum_estimate(self, state: dict, group: dict, steps_done: int) -> torch.Tensor | None:
        if steps_done == 0:
            return None
        return state["exp_avg"].to(torch.float32) / (1 - group["betas"][1] ** steps_done)

    def feedback_coefficient(self, group: dict) -> float:
        beta2 = group["betas"][1]
        return beta2 / (1 - beta2)


class SGDMomentum:
    """Heavy-ball SGD as ``torch.optim.SGD(momentum=mu)``: ``b <- mu * b + g``; direction ``b``."""

    name = "sgd"
    first_moments = ("momentum_buffer",)
    second_moments = ()
    sign_after_backprojection = False

    exact_state_keys: tuple[str, ...] = ()

    def init_state(self, state: dict, template: torch.Tensor) -> None:
        state["momentum_buffer"] = torch.zeros_like(template, memory_format=torch.preserve_format)

    def direction(self, grad: torch.Tensor, state: dict, group: dict, step: float) -> Direction:
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        return Direction(buf, None, 1.0)

    def momentum_estimate(self, state: dict, group: dict, steps_done: int) -> torch.Tensor | None:
        """The buffer as a weighted mean of past gradients: ``b (1 - mu) / (1 - mu^k)``."""
        if steps_done == 0:
            return None
        mu = group["momentum"]
        return state["momentum_buffer"].to(torch.float32) * ((1 - mu) / (1 - mu**steps_done))

    def feedback_coefficient(self, group: dict) -> float:
        # b_next = mu * b + g: mass lost from b re-enters through g with weight mu.
        return float(group["momentum"])


INNER_RULES: dict[str, object] = {rule.name: rule for rule in (Adam(), Lion(), SGDMomentum())}


def get_inner(name: str):
    try:
        return INNER_RULES[name]
    except KeyError:
        raise ValueError(f"inner: unknown inner rule {name!r}; allowed: {sorted(INNER_RULES)}") from None
