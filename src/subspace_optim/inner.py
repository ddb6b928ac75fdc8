"""Inner rules: the small optimizer that runs on the projected gradient (or the full one, dense).

Each rule is a :class:`~subspace_optim.components.Component`: it owns its group keys, creates its
state and turns a gradient into an update direction through a pure function over tensors (the
``*_direction`` functions below, which take tensors and numbers only, as ``torch.compile``, grouped
paths and DTensors need). The direction is returned as ``numerator / denominator / bias_correction``
so that the dense path can apply it with one fused ``addcdiv_`` exactly as ``torch.optim.AdamW``
does (0-ulp parity), while the subspace path back-projects ``numerator / denominator`` first.

Rules (group key ``inner``), all with decoupled weight decay applied by the optimizer:

- ``adam``: torch's AdamW arithmetic; keys ``betas``, ``eps`` and ``correct_bias`` (galore-torch's
  flag: False drops both bias corrections).
- ``lion``: Lion ("Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675), ``betas`` =
  (beta1, beta2), the paper's default (0.9, 0.99). ``sign_after_backprojection``: in a subspace the
  interpolation is back-projected first and the sign taken on the full matrix, as Online Subspace
  Descent's GaLore-Lion code does (arXiv 2408.12857), so ``scale`` has no effect.
- ``adamw_hf``: the arithmetic of transformers' (deprecated) ``AdamW``, on which galore-torch's
  ``GaLoreAdamW`` is built: epsilon added before the bias correction, the step size
  ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, weight decay applied after the update. With
  ``svd_method="lapack"`` it reproduces a galore-torch run (see the README's galore-torch note: by
  default our singular-vector signs are canonical, galore-torch keeps LAPACK's).
- ``sgd``: heavy-ball momentum as ``torch.optim.SGD`` (dampening 0, no Nesterov), key ``momentum``
  in [0, 1) (default 0.9). A buffer is kept even with ``momentum=0`` so that the state layout does
  not depend on a runtime value. Deviation from ``torch.optim.SGD``: weight decay is decoupled.

A rule with a foreach form (``foreach``: Adam, SGD) also runs over lists of same-shaped tensors,
which the grouped path of ordinary projected steps uses (``grouped.py``); ``foreach_dense``: it has a
grouped step for dense parameters too (Adam: ``torch.optim.AdamW``'s foreach step, bit for bit).

Besides the direction, each rule tells the subspace machinery how to read its state:
``first_moments`` / ``second_moments`` (rotated by transitions), ``momentum_estimate`` (the momentum
in gradient units, used by LDAdam's power selector) and ``feedback_coefficient`` (the weight of the
state-compression term of generalised error feedback, LDAdam's beta1 / (1 - beta1) for Adam).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_bool, check_real
from .components import Component, Registry
from .grouped import adam_directions_foreach, dense_grouped_step, sgd_directions_foreach


@dataclass(frozen=True)
class Direction:
    """An update direction ``numerator / denominator / bias_correction`` (denominator None means 1).

    ``bias_correction`` is Adam's first bias correction; it stays a separate scalar (a float, or a
    0-dim tensor under ``torch.compile``) so that the update can use torch's exact
    ``lr / bias_correction1``.
    """

    numerator: torch.Tensor
    denominator: torch.Tensor | None
    bias_correction: float | torch.Tensor
    lr_factor: float | None = None  # transformers' AdamW multiplies lr by sqrt(1 - beta2^t) first

    def step_size(self, lr: float):
        """``lr / bias_correction`` (torch's exact expression), or ``lr * lr_factor / bias_correction``."""
        if self.lr_factor is None:
            return lr / self.bias_correction
        return lr * self.lr_factor / self.bias_correction

    def ratio(self) -> torch.Tensor:
        """``numerator / denominator`` as one tensor (``bias_correction`` not applied)."""
        if self.denominator is None:
            return self.numerator
        return self.numerator / self.denominator


# ------------------------------------------------------------------------------- pure functions
def adam_direction(grad, exp_avg, exp_avg_sq, beta1: float, beta2: float, eps: float, step,
                   correct_bias: bool = True) -> Direction:
    """Update ``exp_avg``, ``exp_avg_sq`` in place with ``grad`` and return Adam's direction.

    ``step`` (1 on the first update) is a number or a 0-dim tensor; the arithmetic is torch's
    single-tensor AdamW, so the dense path matches it bit for bit.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if not correct_bias:
        return Direction(exp_avg, exp_avg_sq.sqrt().add_(eps), 1.0)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    return Direction(exp_avg, denom, bias_correction1)


def adamw_hf_direction(grad, exp_avg, exp_avg_sq, beta1: float, beta2: float, eps: float, step,
                       correct_bias: bool = True) -> Direction:
    """transformers' ``AdamW`` arithmetic (galore-torch's): ``m / (sqrt(v) + eps)`` with step size
    ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``; updates the moments in place."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    if not correct_bias:
        return Direction(exp_avg, denom, 1.0)
    return Direction(exp_avg, denom, 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5)


def lion_direction(grad, exp_avg, beta1: float, beta2: float) -> Direction:
    """Lion's interpolation ``beta1 m + (1 - beta1) g`` (its sign is taken by the optimizer); then
    ``m <- beta2 m + (1 - beta2) g`` in place."""
    interpolation = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
    return Direction(interpolation, None, 1.0)


def sgd_momentum_direction(grad, buffer, momentum: float) -> Direction:
    """``b <- momentum * b + g`` in place; the direction is ``b``."""
    buffer.mul_(momentum).add_(grad)
    return Direction(buffer, None, 1.0)


# ------------------------------------------------------------------------------------ the rules
class InnerRule(Component):
    """Base class of inner rules.

    Attributes:
        first_moments, second_moments: state keys holding first / second moments (transitions
            rotate or reset them).
        sign_after_backprojection: the update is the sign of the back-projected direction (Lion).
        foreach: :meth:`directions_foreach` exists (the grouped path of projected weights).
        foreach_dense: :meth:`dense_step_foreach` exists (the grouped path of dense parameters).
    """

    first_moments: tuple[str, ...] = ()
    second_moments: tuple[str, ...] = ()
    sign_after_backprojection = False
    decay_after_update = False  # weight decay after the update (transformers' AdamW), not before
    foreach = False
    foreach_dense = False

    @property
    def state_keys(self) -> tuple[str, ...]:
        return (*self.first_moments, *self.second_moments)

    def init_state(self, state: dict, template: torch.Tensor) -> None:
        """Zero moments shaped, typed and laid out like ``template``."""
        for key in self.state_keys:
            state[key] = torch.zeros_like(template, memory_format=torch.preserve_format)

    def direction(self, grad: torch.Tensor, state: dict, group: dict, step) -> Direction:
        raise NotImplementedError

    def directions_foreach(self, grads: list, states: list[dict], group: dict, steps: list) -> tuple[list, list]:
        """:meth:`direction` over lists of same-shaped tensors with ``torch._foreach_*`` ops:
        ``(ratios, bias_corrections)``, each ratio ``numerator / denominator``; rules with ``foreach``."""
        raise NotImplementedError

    def dense_step_foreach(self, group: dict, params: list, states: list[dict]) -> None:
        """One ordinary step of a group's dense parameters, all at once; rules with ``foreach_dense``."""
        raise NotImplementedError

    def momentum_estimate(self, state: dict, group: dict, steps_done: int) -> torch.Tensor | None:
        """The first moment in gradient units after ``steps_done`` steps (None when 0), fp32."""
        raise NotImplementedError

    def feedback_coefficient(self, group: dict) -> float:
        raise NotImplementedError


class Adam(InnerRule):
    """Adam moments (``exp_avg``, ``exp_avg_sq``), arithmetic identical to torch's for-loop AdamW.
    Bias corrections use the parameter's own inner step counter (1 on the first update)."""

    name = "adam"
    defaults = {"correct_bias": True}
    first_moments = ("exp_avg",)
    second_moments = ("exp_avg_sq",)

    def validate(self, group: dict) -> None:
        check_bool("correct_bias", group["correct_bias"])

    def direction(self, grad, state, group, step) -> Direction:
        beta1, beta2 = group["betas"]
        return adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"],
                              step, group["correct_bias"])

    foreach = True
    foreach_dense = True

    def directions_foreach(self, grads, states, group, steps):
        beta1, beta2 = group["betas"]
        return adam_directions_foreach(grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                       beta1, beta2, group["eps"], steps, group["correct_bias"])

    def dense_step_foreach(self, group, params, states):
        dense_grouped_step(group, params, states)

    def momentum_estimate(self, state, group, steps_done):
        """Bias-corrected first moment ``m / (1 - beta1^k)`` after ``k`` steps."""
        if steps_done == 0:
            return None
        correction = 1 - group["betas"][0] ** steps_done if group["correct_bias"] else 1.0
        return state["exp_avg"].to(torch.float32) / correction

    def feedback_coefficient(self, group):
        # m_next = beta1 * m + (1 - beta1) * g: mass lost from m re-enters through g scaled this way.
        beta1 = group["betas"][0]
        return beta1 / (1 - beta1)


class AdamWHF(Adam):
    """transformers' / galore-torch's AdamW arithmetic (see the module docstring); same state and
    options as ``adam``."""

    name = "adamw_hf"
    defaults: dict = {}  # shares Adam's correct_bias
    decay_after_update = True
    foreach = foreach_dense = False  # other arithmetic than Adam's foreach forms: per tensor only

    def direction(self, grad, state, group, step) -> Direction:
        beta1, beta2 = group["betas"]
        return adamw_hf_direction(grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"],
                                  step, group["correct_bias"])


class Lion(InnerRule):
    """Lion: ``c = beta1 * m + (1 - beta1) * g``; update ``sign(c)``; then
    ``m <- beta2 * m + (1 - beta2) * g``."""

    name = "lion"
    first_moments = ("exp_avg",)
    sign_after_backprojection = True

    def direction(self, grad, state, group, step) -> Direction:
        beta1, beta2 = group["betas"]
        return lion_direction(grad, state["exp_avg"], beta1, beta2)

    def momentum_estimate(self, state, group, steps_done):
        if steps_done == 0:
            return None
        return state["exp_avg"].to(torch.float32) / (1 - group["betas"][1] ** steps_done)

    def feedback_coefficient(self, group):
        beta2 = group["betas"][1]
        return beta2 / (1 - beta2)


class SGDMomentum(InnerRule):
    """Heavy-ball SGD as ``torch.optim.SGD(momentum=mu)``: ``b <- mu * b + g``; direction ``b``.

    Group key: ``momentum`` (float, 0.9, in [0, 1))."""

    name = "sgd"
    defaults = {"momentum": 0.9}
    first_moments = ("momentum_buffer",)

    def validate(self, group: dict) -> None:
        check_real("momentum", group["momentum"], 0.0, 1.0)

    foreach = True

    def direction(self, grad, state, group, step) -> Direction:
        return sgd_momentum_direction(grad, state["momentum_buffer"], group["momentum"])

    def directions_foreach(self, grads, states, group, steps):
        return sgd_directions_foreach(grads, [s["momentum_buffer"] for s in states], group["momentum"])

    def momentum_estimate(self, state, group, steps_done):
        """The buffer as a weighted mean of past gradients: ``b (1 - mu) / (1 - mu^k)``."""
        if steps_done == 0:
            return None
        mu = group["momentum"]
        return state["momentum_buffer"].to(torch.float32) * ((1 - mu) / (1 - mu**steps_done))

    def feedback_coefficient(self, group):
        # b_next = mu * b + g: mass lost from b re-enters through g with weight mu.
        return float(group["momentum"])


INNER_RULES: Registry[InnerRule] = Registry("inner", (Adam(), AdamWHF(), Lion(), SGDMomentum()))


def get_inner(name: str) -> InnerRule:
    return INNER_RULES.lookup(name)
