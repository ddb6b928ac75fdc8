"""``SubspaceOptimizer``: one ``torch.optim.Optimizer`` that composes selector x inner rule x transition.

It covers GaLore (arXiv 2403.03507) and I3S (arXiv 2502.05790) as presets (see ``presets.py``).
Deliberate deviations from galore-torch: decoupled weight decay is applied before the update, as in
``torch.optim.AdamW`` (galore-torch applies it after); projections run in fp32 with an fp32 projector
whatever the parameter dtype; the inner Adam uses torch's AdamW arithmetic (epsilon added after the
bias-corrected square root) so the dense path matches ``torch.optim.AdamW`` bit for bit.
"""

from __future__ import annotations

import warnings

import torch
from torch.optim import Optimizer

from .dtypes import scalar_dtype, state_dtype
from .error_feedback import FEEDBACK_STAGES
from .functional import apply_update, left_form, lion_sign, project, step_number
from .inner import INNER_RULES
from .grouped import bucket_key, grouped_step
from .sharding import is_dtensor, local, shards_of
from .nonfinite import PendingSkips, all_or_nothing, first_nonfinite
from .param_groups import IGNORED_GALORE_ARGS, ParamGroupsMixin
from .persistence import PersistenceMixin
from .randomized import RANDOMIZED_DEFAULTS
from .refresh_stage import RefreshMixin
from .selectors import SELECTORS
from .sides import two_sided
from .state_storage import STORAGE, compresses_dense, compute_dtype, decoded, dense_update
from .blocked_update import back_project_and_apply
from .transitions import TRANSITIONS
from .validation import validate_nonfinite

__all__ = ["SubspaceOptimizer", "component_defaults", "state_dtype"]


def component_defaults() -> dict:
    """The group keys owned by the registered selectors, transitions and inner rules."""
    return {**SELECTORS.defaults(), **TRANSITIONS.defaults(), **INNER_RULES.defaults(), **STORAGE.defaults()}


def _use_foreach(group: dict, p: torch.Tensor) -> bool:
    """The group's ``foreach``; None means on for CUDA tensors, as torch.optim's default."""
    return p.is_cuda if group["foreach"] is None else group["foreach"]


class SubspaceOptimizer(ParamGroupsMixin, PersistenceMixin, RefreshMixin, Optimizer):
    """AdamW whose 2-D weights train in a low-rank subspace of their gradient.

    Per step, for every parameter with a gradient:

    1. Check every gradient first: sparse or complex gradients raise ``RuntimeError``; a non-finite
       gradient raises (``nonfinite="error"``, naming the parameter and its step) or skips the whole
       step (``"skip"``, counted in ``skipped_steps``), in both cases before anything is modified.
    2. Dense parameters (groups with ``subspace=False``, 1-D, 0-D and empty tensors) take the inner
       rule on the full gradient; with ``inner="adam"`` this is ``torch.optim.AdamW`` exactly.
    3. A 2-D parameter in a subspace group is put in left form ``G`` (k, l) by the side rule
       (``sides.py``); rank ``r = min(rank, k)`` (a larger rank is clipped, making the projection
       the whole space).
    4. At its first step and whenever its step count (before this step) is a multiple of
       ``update_proj_gap`` (or every step, for ``every_step`` selectors; with ``stagger_refresh``,
       when its step count minus its phase is), the selector picks a new
       fp32 basis ``P`` (k, r); the transition updates the inner state for the change of basis and
       the overlap ``||P_old^T P_new||_F^2 / r`` is recorded.
    5. ``R = P^T G`` (r, l) in fp32, cast to the state dtype (the parameter's; fp32 for fp16
       parameters); the inner rule turns ``R`` into a direction ``N``; the update
       ``U = scale * P N`` (Lion: ``sign(P N)``, no scale) is transposed back for right projections.
       With ``error_feedback``, ``G`` is ``G + xi`` from step 4 on and ``xi`` becomes what the
       projection and the transition lost (``error_feedback.py``).
    6. ``W <- (1 - lr * weight_decay) * W - lr * U`` (``adamw_hf``: the decay after the update).

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts. A group
            is projected when it sets ``subspace=True`` or any GaLore key (``rank``,
            ``update_proj_gap``, ``scale``, ``proj_type``), as in galore-torch; see
            :func:`subspace_param_groups` to build groups from a model.
        lr (float, 1e-3): learning rate, >= 0.
        betas (tuple, (0.9, 0.999)): Adam coefficients, each in [0, 1).
        eps (float, 1e-8): Adam epsilon, >= 0.
        weight_decay (float, 0.0): decoupled weight decay, >= 0.
        rank (int, 128): subspace rank, >= 1; clipped to the projected dimension.
        update_proj_gap (int, 200): steps between refreshes, >= 1.
        stagger_refresh (bool, False): give the i-th of a group's n projected weights the phase
            ``i * update_proj_gap // n``, so that refreshes (and the full gradients they need) are spread
            evenly over the gap instead of all falling on one step. Off in the presets: the papers
            refresh every weight together.
        batch_refresh (bool, False): at a step where several weights are due for a refresh, factorise
            the due weights of one shape (and selector, method, triplet count) by one batched linalg
            call (``batched_refresh.refresh_batch``) instead of one call per weight; each weight keeps
            its own random streams, transition and counters. On CPU that call factorises one weight
            at a time, so the result is bitwise the per-weight path (tested); on accelerators it is
            stacked, equal to rounding. Only ``dominant`` and ``importance`` refreshes batch; sharded
            (FSDP2) weights, compiled steps and ``step_in_backward`` select per weight. Helps on GPUs
            with many small equal-shape weights (``docs/refresh.md``). Off in the presets (the
            reference path).
        scale (float, 1.0): multiplier of the projected update, > 0 (GaLore's alpha).
        side (str, "galore"): ``galore``, ``ldadam``, ``min_state``, ``left``, ``right`` or ``full``
            (``sides.py``); galore-torch's ``proj_type`` key is accepted in groups (``std``,
            ``reverse_std``, ``left``, ``right``, ``full``). ``full`` projects
            both sides (state (r, r)) and takes the refresh-window selectors (``dominant``,
            ``importance``, ``random``, ``coordinate``), ``keep`` or ``reset``, no error feedback.
        selector (str, "dominant"): ``dominant``, ``importance``, ``random``, ``coordinate``,
            ``online_pca`` (OSD) or ``power`` (LDAdam); the last two move every step.
        transition (str, "keep"): ``keep``, ``reset`` or ``rotate`` (LDAdam's projection-aware
            state transfer, for any selector).
        inner (str, "adam"): ``adam``, ``adamw_hf`` (transformers' / galore-torch's AdamW arithmetic),
            ``lion`` (uses ``betas``) or ``sgd``; see ``inner.py``.
        seed (int, 0): seeds the counter-based generators of random selectors, >= 0.
        error_feedback (bool, False): keep what the projection loses in an fp32 buffer in the state
            and add it to the next gradient (``error_feedback.py``).
        svd_method (str, "svd"): how the ``dominant`` and ``importance`` selectors (and the first step
            of ``online_pca`` and ``power``) factorise the gradient: ``svd`` (LAPACK thin SVD, the
            reference), ``gram`` (``eigh`` of the Gram matrix, exact, 2-5x faster, see
            ``linalg.svd_gram_fp32``) or ``randomized`` (Halko-Martinsson-Tropp: only the leading
            triplets, ``randomized.py``; I3S then samples the whole spectrum from an exact
            factorisation unless ``importance_pool`` restricts it to the top ``pool * r``) or
            ``auto`` (per weight shape, the cheapest of ``gram`` and planned randomized settings
            predicted to capture 99% of the exact top-r energy, ``auto_svd.py``) or ``lapack``
            (galore-torch's arithmetic: the SVD of the gradient as stored, LAPACK's signs kept instead
            of canonical ones; with ``inner="adamw_hf"`` it reproduces a galore-torch run on the same
            BLAS library and device; whole weights, ``batch_refresh=False``; ``linalg.svd_lapack_fp32``).
        rsvd_oversampling (float, 0.5, >= 0), rsvd_power_iters (int, 1, >= 0): the randomized
            method's extra sketch columns (a fraction of the rank) and power iterations.
        subspace (bool or None, None): default for groups that set neither ``subspace`` nor a GaLore
            key; None means dense, as in galore-torch.
        nonfinite (str, "error"): ``error`` or ``skip``.
        foreach (bool or None, None): the grouped path for ordinary steps (``grouped.py``): batched
            matmuls over same-shaped weights and foreach inner updates; None means on for CUDA
            tensors, as torch.optim's default.
        **component_options: the options of the components, each documented and validated by its
            component: ``momentum`` (``inner="sgd"``, 0.9), ``correct_bias`` (``inner="adam"`` and
            ``"adamw_hf"``, True), ``importance_pool`` (``selector="importance"``, None), ``rho``
            (``selector="power"``, 0.908), ``osd_variant``, ``osd_alpha``,
            ``osd_p_optimizer``, ``osd_orthonormalize`` (``selector="online_pca"``), ``state_bits``
            (8, 16 or 32) and ``projector_bits`` (8, 16 or 32) (``state_storage.py``); and those of any
            component registered later. galore-torch's ``no_deprecation_warning`` is accepted and
            ignored.

    Changing ``rank`` or ``side`` of a group mid-run raises ``ValueError`` at the next step of an
    affected parameter; ``lr``, ``betas``, ``eps``, ``weight_decay``, ``scale`` and
    ``update_proj_gap`` may change at any time; a new ``selector`` is used from the next refresh.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        side: str = "galore",
        selector: str = "dominant",
        transition: str = "keep",
        inner: str = "adam",
        seed: int = 0,
        subspace: bool | None = None,
        nonfinite: str = "error",
        error_feedback: bool = False,
        svd_method: str = "svd",
        stagger_refresh: bool = False,
        batch_refresh: bool = False,
        foreach: bool | None = None,
        rsvd_oversampling: float = RANDOMIZED_DEFAULTS["rsvd_oversampling"],
        rsvd_power_iters: int = RANDOMIZED_DEFAULTS["rsvd_power_iters"],
        **component_options,
    ):
        validate_nonfinite(nonfinite)
        owned = component_defaults()
        unknown = sorted(set(component_options) - set(owned) - set(IGNORED_GALORE_ARGS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}; the "
                            f"components' options are {sorted(owned)}")
        self.nonfinite = nonfinite
        self._default_subspace = subspace
        self._warned_full_rank = False
        self._pending_skips = PendingSkips()
        # bytes this process sent into the collectives of sharded (FSDP2) weights, by kind
        # ("step", "refresh"); zero it to measure a window
        self.communication: dict[str, int] = {}
        options = {k: v for k, v in component_options.items() if k in owned}
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, side=side, selector=selector,
            transition=transition, inner=inner, seed=seed, skipped_steps=0,
            error_feedback=error_feedback, svd_method=svd_method, stagger_refresh=stagger_refresh,
            batch_refresh=batch_refresh, foreach=foreach,
            rsvd_oversampling=rsvd_oversampling, rsvd_power_iters=rsvd_power_iters,
            **{**owned, **options},
            differentiable=False,  # torch.optim adds it on load; present from the start keeps state_dicts equal
        )
        super().__init__(params, defaults)
        self.register_state_dict_pre_hook(SubspaceOptimizer._fold_pending_skips)
        self._constructed = True
        for group in self.param_groups:
            self._warn_full_rank(group)
        if not any(g["subspace"] for g in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}: no parameter group is projected, so this is plain AdamW; "
                "pass groups with subspace=True (or rank=...), or build them with "
                "subspace_param_groups(model)",
                stacklevel=2,
            )

    def step_in_backward(self, **options):
        """Update each parameter inside backward, as soon as its gradient is complete, and free the
        gradient; returns a handle whose ``remove()`` returns to ordinary ``step()``. Options
        (``accumulate``, ``max_grad_norm``, ``two_pass``, ``ddp``) and what changes: ``in_backward.py``."""
        from .in_backward import InBackward

        return InBackward(self, **options)

    # ------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect_work()
        if not work:
            return loss
        if torch.compiler.is_compiling() and self.nonfinite == "skip" and not self._any_refresh_due(work):
            with all_or_nothing(self, work):  # no host sync: no graph break (nonfinite.py)
                self._update_all(work)
            return loss
        bad = first_nonfinite(work)
        if bad is not None:
            key, p = bad
            if self.nonfinite == "error":
                step = int(self.state[p]["step"]) + 1 if "step" in self.state.get(p, {}) else 1
                raise RuntimeError(
                    f"{type(self).__name__}: non-finite gradient in parameter {key} at its step {step}; "
                    "nothing was updated (nonfinite='skip' skips such steps instead)"
                )
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return loss
        self._update_all(work)
        return loss

    def _update_all(self, work) -> None:
        buckets: dict[tuple, list] = {}  # the grouped (foreach) path's batches
        chosen = self._batched_selections(work)  # batch_refresh: bases of due weights (refresh_stage.py)
        for group, key, p in work:
            state = self.state.get(p)
            if self._is_projected(group, p):
                if self._groupable(group, p, state):
                    buckets.setdefault(bucket_key(id(group), p, state), []).append((group, p))
                    continue
            elif (state and _use_foreach(group, p) and INNER_RULES.lookup(group["inner"]).foreach_dense
                  and not is_dtensor(p) and not compresses_dense(group, p)):
                buckets.setdefault(("dense", id(group), p.device), []).append((group, p))
                continue
            self._update_parameter(group, key, p, chosen.get(id(p)))
        for key, members in buckets.items():
            group, params = members[0][0], [p for _, p in members]
            states = [self.state[p] for p in params]
            inner = INNER_RULES.lookup(group["inner"])
            if key[0] == "dense":
                inner.dense_step_foreach(group, params, states)
            else:
                grouped_step(group, params, states, inner, state_dtype(params[0]))

    def _groupable(self, group: dict, p: torch.Tensor, state: dict | None) -> bool:
        """An ordinary step the grouped path can take (``grouped.py``)."""
        return (bool(state) and _use_foreach(group, p) and INNER_RULES.lookup(group["inner"]).foreach
                and not group["error_feedback"] and not two_sided(group["side"]) and not is_dtensor(p)
                and group["state_bits"] == 32 and group["projector_bits"] == 32
                and not self._refresh_due(group, state))

    def _update_parameter(self, group: dict, key: str, p: torch.Tensor, chosen: dict | None = None) -> None:
        """One parameter's update from its gradient, after the checks: the unit that ``step`` runs
        for every parameter and that updates inside backward (``in_backward.py``) run one at a time.
        ``chosen``: the bases the batched refresh computed for it (``step`` with ``batch_refresh``)."""
        if self._is_projected(group, p):
            with decoded(self, group, p):  # compressed moments / projector as fp32 for the step
                self._subspace_update(group, key, p, chosen)
        elif compresses_dense(group, p):
            dense_update(self, group, p)
        else:
            self._dense_update(group, p)

    def _dense_update(self, group: dict, p: torch.Tensor) -> None:
        inner = INNER_RULES.lookup(group["inner"])
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
            inner.init_state(state, p)
        state["step"] += 1
        d = inner.direction(p.grad, state, group, step_number(state["step"]))
        numerator = lion_sign(d.numerator, inner.sign_after_backprojection)  # back-projection is the identity
        apply_update(p, numerator, d.denominator, d.step_size(group["lr"]), group["lr"],
                     group["weight_decay"], inner.decay_after_update)

    def _subspace_update(self, group: dict, key: str, p: torch.Tensor, chosen: dict | None = None) -> None:
        fresh = p not in self.state
        try:
            self._projected_step(group, key, p, chosen)
        except BaseException:
            if fresh:  # a failed first step leaves no half-made state behind
                self.state.pop(p, None)
            raise

    def _projected_step(self, group: dict, key: str, p: torch.Tensor, chosen: dict | None = None) -> None:
        inner = INNER_RULES.lookup(group["inner"])
        feedback = FEEDBACK_STAGES[group["error_feedback"]]
        left, rank, _ = self._layout(group, p)
        state = self.state[p]
        if not state:
            state.update(self._initial_state(group, left, self._refresh_phase(group, p)))
        kind = "refresh" if self._refresh_due(group, state) else "step"
        shard = shards_of(p, left, self.communication, kind)
        # a sharded weight (FSDP2) steps on its local shards, with the same arithmetic
        view = {k: local(v) for k, v in state.items()} if shard.sharded else state
        grad = feedback.corrected_gradient(view, left_form(local(p.grad), left), left)  # (k, l) fp32
        lost = self._refresh_if_due(group, key, p, view, grad, rank, inner, feedback, shard, chosen)
        basis = view["projector"]  # (k, r) fp32, orthonormal columns
        right = view.get("projector_right")  # (l, r), two-sided projections only
        view["step"] += 1
        view["inner_step"] += 1
        reduced = shard.sum_k(project(basis, grad, right))  # (r, l), or (r, r) two-sided
        reduced = reduced.to(compute_dtype(group, state_dtype(p)))
        feedback.store(view, grad, basis, reduced, lost, inner.feedback_coefficient(group), left)
        del grad  # for a bf16 weight an fp32 copy of its gradient: gone before the update is formed
        self._reduced_update(group, p, view, reduced, left)
        if shard.sharded:
            self._store_sharded(state, view, shard, group, inner)

    def _reduced_update(self, group: dict, p: torch.Tensor, state: dict, reduced: torch.Tensor,
                        left: bool) -> None:
        """The inner rule on the projected gradient ``reduced`` (r, l) and the back-projected update of
        ``p``, with the step counters already advanced (accumulation in the subspace enters here).
        ``state`` holds local tensors (a sharded weight's shards)."""
        inner = INNER_RULES.lookup(group["inner"])
        d = inner.direction(reduced, state, group, state["inner_step"])
        step_size = d.step_size(group["lr"])
        if not inner.sign_after_backprojection:  # Lion: the sign makes the scale irrelevant
            step_size = step_size * group["scale"]
        # fp32 weights: U = P N at once (the reference); lower precision: row blocks of U, each added
        # to the weight with one rounding (blocked_update.py)
        back_project_and_apply(local(p), state["projector"], d.ratio().to(torch.float32), left, step_size,
                               group["lr"], group["weight_decay"], inner.sign_after_backprojection,
                               right=state.get("projector_right"), decay_after_update=inner.decay_after_update)
