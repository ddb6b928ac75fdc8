"""Online Subspace Descent's selector ("Memory-Efficient LLM Training with Online Subspace Descent",
Liang et al., arXiv 2408.12857, NeurIPS 2024): the basis follows the gradient by one optimizer step
per training step on an online-PCA loss, with no SVD after the first step.

Two variants, group key ``osd_variant``:

- ``"paper"`` (Alg. 1, Eq. 6): loss ``||P P^T G~ - G~||_F^2 + 0.1 ||P^T P - I||_F^2``; P learning
  rate ``osd_alpha * lr`` (alpha = 5); decoupled weight decay on P equal to the group's
  ``weight_decay`` (the paper's lambda^P = lambda^W); P updated at every step, the first included
  (its loss gradient at P_0 = SVD(G_0) is exactly zero and is taken as such: computed, its rounding
  noise would become a full-size Adam step).
- ``"code"`` (kyleliang919/Online-Subspace-Descent, ``proj_type="continuous"``): no orthogonality
  penalty; P learning rate ``(1 / update_proj_gap) * lr / initial_lr`` (it follows the weight LR
  schedule; ``initial_lr`` is the group key LR schedulers set, else the lr of the first step, and
  it is saved with the group); AdamW weight decay 0.01 on P (0 with SGD, torch's default); no P
  update at a parameter's first step (the code only creates P's optimizer then).

Both: ``G~ = G / ||G||_F``; the loss gradient is analytic; P's optimizer (``osd_p_optimizer``:
``"adam"``, torch's AdamW arithmetic with betas (0.9, 0.999) and eps 1e-8, or ``"sgd"``, plain) keeps
fp32 state in the parameter's optimizer state. Order as in both paper and code: the weight update
of step t uses P_t, and P_{t+1} is computed from G_t. It is implemented lazily: step t's selection
applies the P step computed at step t-1 (moments, learning rate and decay stored then), then
computes the loss gradient at (P_t, G_t) and updates P's moments; so P's state is never larger than
P's optimizer state, and a checkpoint holds everything.

Deliberate deviations: P is fp32 whatever the parameter dtype (the code keeps it in the parameter
dtype); with ``osd_orthonormalize=True`` (the default) P is re-orthonormalised by QR (R's diagonal
non-negative, so it stays continuous) after each online step. Neither the paper nor the code does
that: the paper's penalty keeps P only near-orthonormal and the code's P drifts freely. Every other
part of the library assumes an orthonormal basis (``P P^T`` as the projector, the overlap diagnostic,
``rotate``, error feedback), hence the default; ``osd_orthonormalize=False`` is the faithful mode.
"""

from __future__ import annotations

import torch

from ..checks import check_choice, check_real
from ..linalg import orthonormalize
from ..sharding import WHOLE, Whole
from .base import SelectionContext, Selector, dominant_basis

OSD_VARIANTS = ("paper", "code")
P_OPTIMIZERS = ("adam", "sgd")
PAPER_ORTHO_PENALTY = 0.1
CODE_P_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which the official code leaves on
P_BETAS, P_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as in the code


def online_pca_gradient(basis: torch.Tensor, grad: torch.Tensor, penalty: float, shard: Whole = WHOLE) -> torch.Tensor:
    """Gradient w.r.t. ``basis`` P (k, r) of ``||P P^T G~ - G~||_F^2 + penalty ||P^T P - I||_F^2``,
    with ``G~ = grad / ||grad||_F`` (the gradient is zero for a zero ``grad``). All fp32.

    With ``B = P^T G~`` (r, l), ``E = P B - G~`` and ``S = P^T P - I``: the reconstruction term's
    gradient is ``2 (E B^T + G~ E^T P) = 2 (P (B B^T) + G~ B^T (S - I))``, so only two (k, l, r)
    matmuls and no (k, l) temporary (the normalisation is applied to the small factors). On a
    sharded weight ``basis`` and ``grad`` are this process's shards and every contraction over the
    sharded side is summed across processes (``shard``).
    """
    norm = shard.frobenius_norm(grad)
    eye = torch.eye(basis.shape[1], dtype=basis.dtype, device=basis.device)
    s = shard.sum_k(basis.T @ basis) - eye  # (r, r)
    if norm == 0:  # G~ = 0: only the penalty acts
        out = torch.zeros_like(basis)
    else:
        b = shard.sum_k(basis.T @ grad) / norm  # (r, l)
        out = 2 * (basis @ shard.sum_l(b @ b.T) + shard.sum_l(grad @ (b.T @ (s - eye))) / norm)  # (k, r)
    if penalty:
        out += (4 * penalty) * (basis @ s)
    return out


def _kind(state: dict) -> str:
    # The P optimizer in use, from the keys present: torch's load_state_dict mangles str state values.
    return "adam" if "osd_exp_avg" in state else "sgd"


class OnlinePCASelector(Selector):
    """One optimizer step on the online-PCA loss per training step.

    1. First step of a parameter: P = top-r left singular vectors of G (fp32 SVD, or the Gram-matrix
       path with ``svd_method="gram"``); its P optimizer state starts at zero.
    2. Every later step t: apply the pending P step, ``P <- (1 - lr_P wd_P) P - lr_P * D`` with D
       Adam's bias-corrected ``m / (sqrt(v) + eps)`` (or the stored gradient, SGD); re-orthonormalise
       by QR if ``osd_orthonormalize``. This is P_t, used for step t's projection.
    3. Compute ``grad_P = d L(P_t; G_t) / dP`` analytically and fold it into P's optimizer state
       with this step's ``lr_P`` and ``wd_P``; it moves P at the next step.

    Group keys (all also :class:`SubspaceOptimizer` arguments):
        osd_variant (str, "paper"): ``"paper"`` or ``"code"`` (see the module docstring).
        osd_alpha (float, 5.0): P lr / weight lr in the paper variant, > 0.
        osd_p_optimizer (str, "adam"): ``"adam"`` or ``"sgd"``.
        osd_orthonormalize (bool, True): QR after each online step.
        update_proj_gap (int): sets the code variant's P lr ``1 / update_proj_gap``; unused otherwise.
    """

    name = "online_pca"
    every_step = True
    exact_state_keys = ("osd_exp_avg", "osd_exp_avg_sq", "osd_grad")
    basis_state_keys = exact_state_keys
    defaults = {"osd_variant": "paper", "osd_alpha": 5.0, "osd_p_optimizer": "adam", "osd_orthonormalize": True}

    def validate(self, group: dict) -> None:
        check_choice("osd_variant", group["osd_variant"], OSD_VARIANTS)
        check_real("osd_alpha", group["osd_alpha"], 0.0, low_open=True)
        check_choice("osd_p_optimizer", group["osd_p_optimizer"], P_OPTIMIZERS)
        if not isinstance(group["osd_orthonormalize"], bool):
            raise ValueError(f"osd_orthonormalize must be True or False, got {group['osd_orthonormalize']!r}")

    def check_state(self, state: dict, group: dict, where: str) -> None:
        adam = "osd_grad" not in state or "osd_exp_avg" in state or "osd_exp_avg_sq" in state
        needed = ("osd_step", "osd_lr", "osd_weight_decay",
                  *(("osd_exp_avg", "osd_exp_avg_sq") if adam else ("osd_grad",)))
        missing = [key for key in needed if key not in state]
        if missing:
            raise ValueError(f"{where}: state lacks the online-PCA keys {missing}")
        shape = tuple(state["projector"].shape)
        for key in needed[3:]:
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {shape}")

    def select(self, grad, previous, rank, ctx: SelectionContext) -> torch.Tensor:
        state, group = ctx.state, ctx.group
        variant, p_opt = group["osd_variant"], group["osd_p_optimizer"]
        if previous is None:
            basis = dominant_basis(grad, None, rank, ctx)
        else:
            basis = self._apply_pending(previous, state, p_opt, group["osd_orthonormalize"], ctx.shard)
        if "osd_step" not in state or _kind(state) != p_opt:
            self._init_state(state, basis, p_opt)
        if variant == "code":
            initial = group.setdefault("initial_lr", group["lr"])  # the lr of the first step
            if previous is None:
                return basis  # the code's P optimizer has no gradient at the first step
        penalty = PAPER_ORTHO_PENALTY if variant == "paper" else 0.0
        if previous is None:
            # P_0 spans G_0's top-r singular subspace, where the loss gradient is exactly zero; the
            # rounding noise of computing it would be blown up to a full-size step by Adam.
            g_p = torch.zeros_like(basis)
        else:
            g_p = online_pca_gradient(basis, grad, penalty, ctx.shard)
        if variant == "paper":
            lr_p, wd_p = group["osd_alpha"] * group["lr"], group["weight_decay"]
        else:
            ratio = group["lr"] / initial if initial > 0 else 1.0
            lr_p = ratio / group["update_proj_gap"]
            wd_p = CODE_P_WEIGHT_DECAY if p_opt == "adam" else 0.0
        state["osd_step"] += 1
        state["osd_lr"], state["osd_weight_decay"] = float(lr_p), float(wd_p)
        if p_opt == "adam":
            state["osd_exp_avg"].lerp_(g_p, 1 - P_BETAS[0])
            state["osd_exp_avg_sq"].mul_(P_BETAS[1]).addcmul_(g_p, g_p, value=1 - P_BETAS[1])
        else:
            state["osd_grad"].copy_(g_p)
        return basis

    @staticmethod
    def _init_state(state: dict, basis: torch.Tensor, p_opt: str) -> None:
        for key in OnlinePCASelector.exact_state_keys:
            state.pop(key, None)
        keys = ("osd_exp_avg", "osd_exp_avg_sq") if p_opt == "adam" else ("osd_grad",)
        for key in keys:
            state[key] = torch.zeros_like(basis, dtype=torch.float32)
        state["osd_step"] = 0
        state["osd_lr"], state["osd_weight_decay"] = 0.0, 0.0

    @staticmethod
    def _apply_pending(previous: torch.Tensor, state: dict, p_opt: str, orthonormal: bool,
                       shard: Whole = WHOLE) -> torch.Tensor:
        steps = state.get("osd_step", 0)
        if steps == 0 or _kind(state) != p_opt:
            return previous
        lr, wd = state["osd_lr"], state["osd_weight_decay"]
        basis = previous.mul(1 - lr * wd) if wd else previous.clone()  # (k, r)
        if p_opt == "adam":
            bias_correction1 = 1 - P_BETAS[0] ** steps
            bias_correction2 = 1 - P_BETAS[1] ** steps
            denom = (state["osd_exp_avg_sq"].sqrt() / bias_correction2**0.5).add_(P_EPS)
            basis.addcdiv_(state["osd_exp_avg"], denom, value=-lr / bias_correction1)
        else:
            basis.add_(state["osd_grad"], alpha=-lr)
        return shard.rows(orthonormalize(shard.gather_rows(basis))) if orthonormal else basis
