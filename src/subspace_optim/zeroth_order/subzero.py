"""SubZero: zeroth-order SGD with layer-wise random low-rank perturbations.

Paper: "SubZero: Random Subspace Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning",
Yu et al., ICCV 2025, arXiv 2410.08989. MeZO's loop (:mod:`.base`) with each 2-D weight's Gaussian
direction replaced by ``sqrt(m n / r^2) U Z V^T`` in a lazily refreshed random subspace. Deliberate
deviations from the official code: U and V come from the library's random selector basis
(:func:`subspace_optim.linalg.random_orthonormal`, Gaussian then QR with a sign-fixed R) drawn from a
counter-based generator, and stay fp32 in the optimizer state (the code casts them to the parameter
dtype) so that a bf16 model's subspace keeps full precision and survives a resume bit for bit;
weight decay is applied (decoupled, >= 2-D parameters; the code silently drops it); the most-square
reshape of thin matrices (the code's PEFT modes) applies to any matrix whose smaller side is below
``reshape_min_dim``; a rank above a matrix's smaller side is clipped to it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..linalg import random_orthonormal
from ..rng import generator_for
from .base import ZerothOrderOptimizer
from ..checks import check_int
from .reshape import subspace_shape


class SubZero(ZerothOrderOptimizer):
    """Zeroth-order SGD with random low-rank perturbations per weight matrix (SubZero).

    Per ``step(closure)``, with t the step counter and ``key`` each parameter's name or position:

    1. Refresh (lazy): for each parameter that is 2-D after squeezing, seen as an m x n matrix
       (the most-square factorisation of its size if min(m, n) < ``reshape_min_dim``), with
       r = min(rank, m, n): if t % ``update_proj_gap`` == 0 (or no basis yet), draw
       ``U`` (m, r) and ``V`` (n, r) with orthonormal columns (Gaussian then QR in fp32, generators
       keyed by (seed, key + "/U" or "/V", t)) and keep them in ``state[p]``.
    2. Direction: ``Z ~ N(0, 1)^{r x r}`` from ``generator_for(seed, key, t)``,
       ``z = sqrt(m n / r^2) U Z V^T`` (fp32, reshaped back and cast to the parameter dtype). The
       scale makes E||z||^2 = m n, the norm of a full Gaussian, so MeZO's lr and eps carry over.
       Other parameters (biases, norms, >= 3-D) get MeZO's full Gaussian ``z``.
    3. Perturb +eps z, ``l+ = closure()``, -2 eps z, ``l- = closure()``, +eps z (restore), in
       param-group then registration order, z regenerated from its seed each time.
    4. ``g = (l+ - l-) / (2 eps)`` (or one-sided), averaged across ranks with ``all_reduce``;
       a non-finite ``g`` raises or skips (policy ``nonfinite``; ``skipped_steps`` counts skips)
       with weights restored and state unchanged, including a refresh made in step 1.
    5. Update: decoupled weight decay on >= 2-D parameters, then ``p <- p - lr g z`` (with
       momentum, heavy ball on ``g z``). ``t <- t + 1``.

    In expectation over Z, the update direction is ``(m n / r^2) U U^T G V V^T`` for a gradient G:
    the gradient projected onto the subspace, scaled (tested exactly).

    Memory: MeZO's, plus (m + n) r fp32 numbers per matrix for U and V and a transient m x n
    buffer for ``U Z V^T``.

    Args:
        params: parameters or ``model.named_parameters()`` (names become the seeding keys), or
            param-group dicts (``rank``, ``update_proj_gap``, ``reshape_min_dim`` may differ
            per group).
        lr: learning rate, >= 0. Default 1e-6 (MeZO's full-parameter grid, which SubZero reuses).
        eps: perturbation scale, > 0, the same in every group. Default 1e-3.
        weight_decay: decoupled weight decay, >= 0, on >= 2-D parameters. Default 0.
        momentum: heavy-ball momentum in [0, 1). Default 0 (the paper's plain ZO-SGD).
        seed: integer in [0, 2**63). Default 0.
        rank: subspace rank r, integer >= 1 (clipped to a matrix's smaller side). Default 8 (the
            official code's ``gauss_rank``).
        update_proj_gap: refresh period F in steps, integer >= 1. Default 1000 (the paper's
            preferred lazy interval and its README example; the code's default is 2000).
        reshape_min_dim: matrices whose smaller side is below this are reshaped to their
            most-square factorisation (LoRA-style thin matrices); integer >= 0, 0 disables.
            Default 32.
        estimator, nonfinite, exact_restore, all_reduce: as in :class:`MeZO`.
    """

    _exact_dtype_keys = ("U", "V")

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.0, seed: int = 0,
                 rank: int = 8, update_proj_gap: int = 1000, reshape_min_dim: int = 32, *,
                 estimator: str = "two-sided", nonfinite: str = "error",
                 exact_restore: bool = False, all_reduce: bool = False):
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, momentum=momentum, seed=seed,
                        rank=rank, update_proj_gap=update_proj_gap,
                        reshape_min_dim=reshape_min_dim)
        super().__init__(params, defaults, estimator=estimator, nonfinite=nonfinite,
                         exact_restore=exact_restore, all_reduce=all_reduce)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        check_int("rank", group["rank"], 1)
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_int("reshape_min_dim", group["reshape_min_dim"], 0)

    def _check_loaded_state(self, key, value, p, group, where) -> None:
        if key not in ("U", "V"):
            return super()._check_loaded_state(key, value, p, group, where)
        shape = subspace_shape(tuple(p.shape), group["reshape_min_dim"])
        if shape is None:
            raise ValueError(f"{where}: state has {key} but the parameter (shape {tuple(p.shape)}) has "
                             "no subspace with these settings")
        side = shape[0] if key == "U" else shape[1]
        expected = (side, min(group["rank"], *shape))
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected or value.dtype != torch.float32:
            raise ValueError(f"{where}: {key} must be an fp32 tensor of shape {expected}")
        if not bool(value.isfinite().all()):
            raise ValueError(f"{where}: {key} holds non-finite values")

    def _prepare(self, group: dict, p: torch.Tensor, key: str) -> None:
        shape = subspace_shape(tuple(p.shape), group["reshape_min_dim"])
        if shape is None:
            return
        m, n = shape
        r = min(group["rank"], m, n)
        state = self.state[p]
        t = group["step"]
        fresh = "U" in state and tuple(state["U"].shape) == (m, r)
        if fresh and t % group["update_proj_gap"] != 0:
            return
        seed = group["seed"]
        state["U"] = random_orthonormal(m, r, generator_for(seed, key + "/U", t, p.device), p.device)
        state["V"] = random_orthonormal(n, r, generator_for(seed, key + "/V", t, p.device), p.device)

    def _direction(self, group: dict, p: torch.Tensor, key: str) -> torch.Tensor:
        gen = generator_for(group["seed"], key, group["step"], p.device)
        state = self.state.get(p)
        if state is None or "U" not in state:
            return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
        u, v = state["U"], state["V"]  # (m, r), (n, r); orthonormal columns, fp32
        m, r = u.shape
        n = v.shape[0]
        z = torch.randn(r, r, generator=gen, dtype=torch.float32, device=p.device)  # (r, r)
        d = (u @ z) @ v.T  # (m, n)
        d.mul_(math.sqrt(m * n) / r)
        return d.reshape(p.shape).to(p.dtype)
