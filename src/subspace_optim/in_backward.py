"""Updates inside backward: each parameter is updated as soon as its gradient is complete, and the
gradient is freed at once, so the gradients of a model never coexist (the idea of LOMO, "Full
Parameter Fine-tuning for Large Language Models with Limited Resources", arXiv 2306.09782, and of
GaLore's per-layer weight updates, arXiv 2403.03507 section 4.3; torch's
``register_post_accumulate_grad_hook`` tutorial). Unlike GaLore's per-layer recipe this stays one
optimizer: ``state_dict``/``load_state_dict``, LR schedulers and step hooks work unchanged.

Use (see ``docs/memory.md``)::

    handle = opt.step_in_backward()          # accumulate=k, max_grad_norm=c, two_pass=True, ddp=model
    for batch in data:
        handle.backward(loss_of(batch))      # or loss.backward(): updates happen inside it
        opt.step()                           # closes the step: updates nothing itself
        scheduler.step()
    handle.remove()                          # back to ordinary opt.step()

What cannot be global any more, and how it is handled:

- **The step** is closed by ``opt.step()`` (a step pre-hook of the handle): it updates parameters whose
  accumulation window saw fewer than ``accumulate`` gradients, counts a skipped step and resets the
  window. LR schedulers therefore see ``optimizer.step()`` as usual; they change ``lr`` between steps,
  which the next backward's updates read.
- **Gradient clipping**: ``max_grad_norm`` clips each parameter's gradient on its own
  (``clip_grad_norm_([p], c)``), or, with ``two_pass=True``, the global norm exactly as
  ``clip_grad_norm_`` over the optimizer's parameters (in group order) does: a first backward only
  measures norms (freeing each gradient), a second one updates. Accumulation in the subspace never
  holds an accumulated full gradient, so clipping needs ``accumulate=1``.
- **Non-finite gradients** keep the step all-or-nothing as far as that is possible without holding
  every gradient: ``handle.backward`` checks the loss before any gradient exists; every gradient is
  screened before its parameter is updated, and once one is non-finite the rest of the window is
  discarded (``nonfinite="skip"``: the step is skipped and counted; ``"error"``: ``RuntimeError``),
  which covers every micro-batch before the last and a non-finite first gradient (a non-finite loss).
  A gradient that turns non-finite after other parameters were already updated in the same backward
  cannot be undone: the handle raises ``RuntimeError`` whatever the policy (the step is torn; resume
  from a checkpoint). ``two_pass=True`` screens every gradient before any update: fully all-or-nothing.
- **DDP**: gradients must be all-reduced before the update, but a parameter's post-accumulate hook runs
  before DDP's reducer copies it into its bucket. So with ``ddp=model`` the handle registers a DDP
  communication hook instead, which all-reduces each bucket as DDP's default does and then updates that
  bucket's parameters. DDP keeps its buckets (a full gradient) for the whole run, so this saves no
  gradient memory there; do not use ``no_sync`` (every micro-batch is reduced and accumulated here).
  DDP's communication hook cannot be unregistered: after ``remove()`` it only all-reduces.
- **FSDP2** (``fully_shard``) calls post-accumulate-grad hooks on the sharded ``DTensor`` parameter after
  its reduce-scatter, in the same order on every process, so the per-parameter hook sees the reduced
  shard and runs the step's own per-parameter code on the local shards (``sharding.py``): a refresh,
  OSD and LDAdam factorise or contract across shards as ``opt.step()`` does; an ordinary step of a
  left projection all-reduces ``sum_i P_i^T G_i`` (r, l) once, a right projection communicates
  nothing; with ``accumulate=k`` local partial products are summed over the window and all-reduced
  once at its end (``accumulation.py``). Every decision that could differ between processes is agreed
  first, by a collective that every process enters for every parameter in hook order: each gradient's
  non-finite screen (a flag all-reduced over the mesh, ``nonfinite.nonfinite_agreed``), so every
  process skips, raises or tears together; the loss check of ``handle.backward``; ``max_grad_norm``
  clips by the norm of the whole parameter (its squared local norm all-reduced,
  ``sharding.whole_norm``), and ``two_pass=True`` sums those whole norms (FSDP2 supports the second
  backward over the retained graph). Tested with 2 gloo processes (``tests/test_fsdp_in_backward.py``):
  bitwise equal to ordinary FSDP2 steps with one micro-batch, within fp32 rounding with 2.
"""

from __future__ import annotations

import threading

import torch

from . import accumulation
from .checks import check_bool, check_int, check_real
from .ddp_hook import install_comm_hook
from .nonfinite import nonfinite_agreed
from .sharding import is_dtensor, local, whole_norm


class NonFiniteGradientError(RuntimeError):
    """A non-finite loss or gradient under ``nonfinite="error"``, or a torn step (any policy)."""


def _nonfinite(grad: torch.Tensor) -> bool:
    # (one screen for plain and sharded gradients: a sharded one is agreed by its mesh's processes)
    return nonfinite_agreed(grad)


def _clip_(p: torch.Tensor, max_norm: float) -> None:
    """``clip_grad_norm_([p], max_norm)``; a sharded gradient by the norm of the whole parameter
    (one all-reduce), so every process scales its shard by the same coefficient."""
    if not is_dtensor(p.grad):
        torch.nn.utils.clip_grad_norm_([p], max_norm)
        return
    coef = torch.clamp(max_norm / (whole_norm(p.grad) + 1e-6), max=1.0)  # clip_grad_norm_'s arithmetic
    local(p.grad).mul_(coef)


def _agreement_group(optimizer, ddp):
    """The process group whose ranks must take the same decisions (DDP's, or the mesh of the
    optimizer's sharded parameters), else None."""
    if ddp is not None:
        return ddp.process_group
    return next((p.device_mesh.get_group() for group in optimizer.param_groups for p in group["params"]
                 if is_dtensor(p)), None)


class InBackward:
    """The handle returned by ``SubspaceOptimizer.step_in_backward`` (see the module docstring).

    Args:
        optimizer: a ``SubspaceOptimizer``.
        accumulate (int, 1): backward passes per optimizer step, >= 1; projected weights accumulate
            ``P^T G`` (``accumulation.py``).
        max_grad_norm (float or None, None): clip gradients to this norm, > 0.
        two_pass (bool, False): exact global clipping and all-or-nothing steps for one more backward.
        ddp (DistributedDataParallel or None, None): the DDP module wrapping the parameters (not for
            FSDP2, whose sharded parameters are found and handled as they are).
    """

    def __init__(self, optimizer, *, accumulate: int = 1, max_grad_norm: float | None = None,
                 two_pass: bool = False, ddp=None):
        self.accumulate = check_int("accumulate", accumulate, 1)
        self.max_grad_norm = None if max_grad_norm is None else check_real(
            "max_grad_norm", max_grad_norm, 0.0, low_open=True)
        self.two_pass = check_bool("two_pass", two_pass)
        if self.accumulate > 1 and (self.max_grad_norm is not None or self.two_pass):
            raise ValueError("max_grad_norm/two_pass need accumulate=1: accumulation in the subspace never "
                             "holds the accumulated full gradient whose norm clipping needs")
        if getattr(optimizer, "_in_backward", None) is not None:
            raise RuntimeError("step_in_backward: this optimizer already has an active handle; remove() it first")
        self.optimizer = optimizer
        self.ddp = ddp
        self._group = _agreement_group(optimizer, ddp)
        # the group's index, not the dict: load_state_dict (a resume, accelerate's device placement)
        # replaces the param-group dicts, and an LR scheduler then changes the new ones
        self._index = {p: (self._group_index(optimizer, group), key) for group, key, p in optimizer._keyed_params()}
        self._lock = threading.Lock()
        self._phase = None if self.two_pass else "update"
        self._clip_coef = None
        self._norms: dict = {}
        self._reset_window()
        self._handles = [optimizer.register_step_pre_hook(self._finish),
                         optimizer.register_state_dict_pre_hook(self._check_between_steps),
                         optimizer.register_load_state_dict_pre_hook(self._check_between_steps)]
        if ddp is None:
            self._handles += [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self._index]
        else:
            install_comm_hook(ddp, optimizer)
        optimizer._in_backward = self

    # ---------------------------------------------------------------------------- public API
    @property
    def active(self) -> bool:
        return self.optimizer is not None and self.optimizer._in_backward is self

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with the updates inside it; first checks the loss (a non-finite loss
        skips or raises before any gradient exists); with ``two_pass`` runs the measuring backward
        (``retain_graph=True``) and then the updating one."""
        if not self._all_finite(loss):
            self._poison("loss", None)
            return
        if not self.two_pass:
            loss.backward()
            return
        self._measure(lambda: loss.backward(retain_graph=True))
        if not self._poisoned:
            self._update_pass(loss.backward)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite, agreed by every DDP or FSDP2 rank (ranks must skip backward
        together)."""
        finite = torch.isfinite(loss.detach()).all()
        if self._group is not None:
            flag = finite.to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MIN, group=self._group)
            finite = flag[0]
        return bool(finite)

    def remove(self) -> None:
        """Back to ordinary ``opt.step()``. Not in the middle of an accumulation window."""
        if not self.active:
            return
        self._check_between_steps()
        for h in self._handles:
            h.remove()
        self.optimizer._in_backward = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------- gradients arriving
    def _on_gradient(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._arrive(p, p.grad, owned=True)

    def _arrive(self, p, grad, owned: bool) -> None:
        """A complete (for DDP: all-reduced) micro-batch gradient of ``p``. ``owned``: it is ``p.grad``
        and autograd accumulates into it (else it is DDP's bucket view, valid only now)."""
        with self._lock, torch.no_grad():
            group, key = self._where(p)
            if self._phase is None:
                raise RuntimeError("step_in_backward(two_pass=True): run backward through handle.backward(loss) "
                                   "or opt.step(closure), which run the measuring and the updating pass")
            if self._poisoned:
                p.grad = None
                return
            if _nonfinite(grad):
                p.grad = None
                self._poison(key, p)
                return
            if self._phase == "measure":
                self._norms[p] = whole_norm(grad)  # a shard's: of the whole parameter (all-reduced)
                p.grad = None
                return
            count = self._count[p] = self._count.get(p, 0) + 1
            if count > self.accumulate:
                self._reset_window()
                raise RuntimeError(f"step_in_backward: parameter {key} got more than accumulate="
                                   f"{self.accumulate} gradients; call opt.step() after every "
                                   f"{self.accumulate} backward pass(es)")
            # Without clipping a projected weight whose basis stays takes its update from P^T G even
            # at accumulate=1 (the same arithmetic as the step's): its gradient is freed before its
            # moments are decoded and its update is formed.
            full = self._full.setdefault(p, self._clips() or accumulation.needs_full_gradient(
                self.optimizer, group, p))
            if not full:
                self._add_reduced(p, accumulation.project_gradient(self.optimizer, group, p, grad, self.accumulate))
                p.grad = None
            elif not owned:  # DDP's bucket view: valid only now
                held = self._held.get(p)
                if held is None and count == self.accumulate:
                    p.grad = grad
                else:
                    self._held[p] = grad.clone() if held is None else held.add_(grad)
                    p.grad = None
            if count == self.accumulate:
                self._update(group, key, p)

    @staticmethod
    def _group_index(optimizer, group: dict) -> int:
        return next(i for i, g in enumerate(optimizer.param_groups) if g is group)

    def _where(self, p) -> tuple[dict, str]:
        gi, key = self._index[p]
        return self.optimizer.param_groups[gi], key

    def _clips(self) -> bool:
        return self.max_grad_norm is not None or self._clip_coef is not None

    def _add_reduced(self, p, reduced) -> None:
        held = self._reduced.get(p)
        self._reduced[p] = reduced if held is None else held.add_(reduced)

    def _update(self, group: dict, key: str, p) -> None:
        """Update ``p`` from what its window accumulated, then free it."""
        opt = self.optimizer
        if self._full.get(p, True):
            if p in self._held:
                p.grad = self._held.pop(p)
            if p.grad is None:
                return
            opt._check_gradient(group, key, p)
            if self._clip_coef is not None:
                local(p.grad).mul_(self._clip_coef.to(p.grad.device))
            elif self.max_grad_norm is not None:
                _clip_(p, self.max_grad_norm)
            opt._update_parameter(group, key, p)
            p.grad = None
        else:
            accumulation.reduced_step(opt, group, p, self._reduced.pop(p))
        self._updated.add(p)

    def _poison(self, key: str, p) -> None:
        """A non-finite loss or gradient: discard the window, or raise (see the module docstring)."""
        opt = self.optimizer
        if self._updated:
            n = len(self._updated)
            self._reset_window()
            raise NonFiniteGradientError(
                f"{type(opt).__name__}: non-finite gradient in parameter {key} after {n} parameter(s) were "
                "already updated in this backward: the step is torn and cannot be undone (resume from a "
                "checkpoint; step_in_backward(two_pass=True) screens every gradient before any update)")
        if opt.nonfinite == "error":
            self._reset_window()
            if p is None:
                what = "loss"
            else:
                state = opt.state.get(p) or {}
                step = int(state["step"]) + 1 if "step" in state else 1
                what = f"gradient in parameter {key} at its step {step}"
            raise NonFiniteGradientError(f"{type(opt).__name__}: non-finite {what}; nothing was updated "
                               "(nonfinite='skip' skips such steps instead)")
        self._poisoned = True
        for q in list(self._held) + [q for q in self._full if q.grad is not None]:
            q.grad = None
        self._held.clear()
        self._reduced.clear()

    # ---------------------------------------------------------------------------- two passes
    def _measure(self, run_backward) -> None:
        """The measuring pass: norms and finiteness of every gradient, each freed at once."""
        self._phase, self._norms = "measure", {}
        try:
            run_backward()
        finally:
            self._phase = None
        if self._poisoned or self.max_grad_norm is None:
            return
        norms = [self._norms[p] for p in self._index if p in self._norms]
        if norms:  # torch's clip_grad_norm_ arithmetic, over the optimizer's parameter order
            total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2)
            self._clip_coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def _update_pass(self, run_backward):
        self._phase = "update"
        try:
            return run_backward()
        finally:
            self._phase, self._clip_coef, self._norms = None, None, {}

    # -------------------------------------------------------------------------- step closing
    def _finish(self, optimizer, args, kwargs):
        """Step pre-hook: run a closure (twice with ``two_pass``), update stragglers, count a skip,
        reset the window. The step body then finds no gradient of a hooked parameter."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is not None:
            loss = self._run_closure(closure)
            args, kwargs = (optimizer,), {"closure": lambda: loss}
        with torch.no_grad():
            if self._poisoned:
                for group in optimizer.param_groups:
                    group["skipped_steps"] += 1
            else:
                for p in [q for q, n in self._count.items() if q not in self._updated and n > 0]:
                    self._update(*self._where(p), p)
            for p in self._index if self.ddp is not None else ():
                p.grad = None  # DDP copies its reduced bucket back into .grad after we used it
        self._reset_window()
        return args, kwargs

    def _run_closure(self, closure):
        with torch.enable_grad():
            if not self.two_pass:
                return closure()
            self._measure(closure)
            if self._poisoned:
                return None
            return self._update_pass(closure)

    def _reset_window(self) -> None:
        self._count, self._full, self._held, self._reduced = {}, {}, {}, {}
        self._updated, self._poisoned = set(), False

    def _check_between_steps(self, *args) -> None:
        if any(n and p not in self._updated for p, n in self._count.items()):
            raise RuntimeError("step_in_backward: in the middle of an accumulation window; call opt.step() "
                               "first (accumulated gradients are not optimizer state and would be lost)")
