"""What ``SubspaceOptimizer.load_state_dict`` checks before it changes anything.

torch's ``Optimizer.load_state_dict`` checks only the number of groups and parameters: a GaLore state
loaded into ``I3SAdamW`` would silently switch it to the dominant selector (the saved group keys win),
a ``torch.optim.AdamW`` state would make every group dense, ``lr=nan`` or a NaN projector would be
accepted and a missing state key would surface at the next ``step()`` as a ``KeyError``. Here every
loaded group is validated like a constructed one, a change of method (selector, transition, inner
rule, error feedback, side, rank, projection on or off) needs ``allow_method_change=True``, and every
parameter's state must hold the keys, shapes, dtypes and finite values its configuration needs.
Group keys an older version did not save take the current group's values.
"""

from __future__ import annotations

import math

import torch

from . import error_feedback
from .inner import INNER_RULES
from .selectors import SELECTORS
from .sides import two_sided
from .quantization import blocks
from .state_storage import BASIS_ABSMAX, stored_keys
from .validation import validate_group

# Group keys that define the method: loading a state saved with other values changes what the
# optimizer does, so it needs an explicit allow_method_change=True.
METHOD_KEYS = ("subspace", "selector", "transition", "inner", "error_feedback", "side", "rank")
# Per-parameter bookkeeping of a projected weight (plain Python values)
PROJECTED_INT_KEYS = ("step", "inner_step", "refresh_count")
# State keys added by later versions, with the value an older state implies
STATE_KEY_DEFAULTS = {"refresh_phase": 0}


def prepare_loaded_state(optimizer, state_dict: dict, allow_method_change: bool) -> dict:
    """Validate ``state_dict`` against ``optimizer`` and return it with old groups completed.

    Raises ``ValueError`` naming the group, the parameter and the key at the first problem; the
    optimizer is untouched then.
    """
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("state_dict: expected a dict with 'state' and 'param_groups' (an optimizer's "
                         "state_dict())")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"state_dict: it has {len(saved_groups)} param groups, this optimizer "
                         f"{len(optimizer.param_groups)}")
    groups = []
    for gi, (saved, current) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(f"state_dict: param group {gi} has {len(saved['params'])} parameters, this "
                             f"optimizer's {len(current['params'])}")
        if "subspace" not in saved and not allow_method_change:
            raise ValueError(
                f"state_dict: param group {gi} has no 'subspace' key, so it was not saved by a subspace "
                f"optimizer (its keys: {sorted(k for k in saved if k != 'params')}); pass "
                "allow_method_change=True to load it anyway")
        group = {**{k: v for k, v in current.items() if k != "params"}, **saved}
        _check_method(gi, saved, current, allow_method_change)
        try:
            validate_group(group)
        except ValueError as err:
            raise ValueError(f"state_dict: param group {gi}: {err}") from None
        groups.append(group)
    state = dict(state_dict["state"])
    for gi, (group, current) in enumerate(zip(groups, optimizer.param_groups)):
        names = current.get("param_names")
        for i, (pid, p) in enumerate(zip(group["params"], current["params"])):
            if pid not in state:
                continue
            where = f"state_dict: parameter {names[i] if names else f'{gi}.{i}'} (group {gi})"
            state[pid] = _check_param_state(state[pid], group, p, optimizer, where)
    return {**state_dict, "state": state, "param_groups": groups}


def _check_method(gi: int, saved: dict, current: dict, allow: bool) -> None:
    if allow:
        return
    for key in METHOD_KEYS:
        if key in saved and saved[key] != current[key]:
            raise ValueError(
                f"state_dict: param group {gi} was saved with {key}={saved[key]!r}, this optimizer has "
                f"{key}={current[key]!r}; loading it would change the method silently (pass "
                "allow_method_change=True to switch deliberately)")


def _check_param_state(param_state: dict, group: dict, p: torch.Tensor, optimizer, where: str) -> dict:
    param_state = dict(param_state)
    inner = INNER_RULES.lookup(group["inner"])
    projected = optimizer._is_projected(group, p)
    _require(param_state, ("step",), where)
    if not projected:
        _check_tensor(param_state["step"], where, "step", shape=())
        _check_moments(param_state, group, inner, tuple(p.shape), where, optimizer._moment_dtype(group, p))
        return param_state
    for key, value in STATE_KEY_DEFAULTS.items():
        param_state.setdefault(key, value)
    if isinstance(param_state["step"], torch.Tensor) and param_state["step"].dim() == 0:
        param_state["step"] = int(param_state["step"])  # saved when a projected step was a tensor
    _require(param_state, ("projector", "project_left", *PROJECTED_INT_KEYS), where)
    left, rank, _ = optimizer._layout(group, p)
    if param_state["project_left"] != left:
        raise ValueError(f"{where}: saved with a {'left' if param_state['project_left'] else 'right'} "
                         f"projection, this optimizer's side rule {group['side']!r} gives "
                         f"{'left' if left else 'right'}")
    l = p.shape[1] if left else p.shape[0]
    k = p.shape[0] if left else p.shape[1]
    basis_dtype = {8: torch.uint8, 16: torch.bfloat16}.get(group["projector_bits"], torch.float32)
    _check_tensor(param_state["projector"], where, "projector", shape=(k, rank), dtype=basis_dtype)
    if group["projector_bits"] == 8:  # codes and their block scales (state_storage.py)
        _require(param_state, (BASIS_ABSMAX,), where)
        _check_tensor(param_state[BASIS_ABSMAX], where, BASIS_ABSMAX, shape=(blocks(k * rank),),
                      dtype=torch.float32)
    if two_sided(group["side"]):
        _require(param_state, ("projector_right",), where)
        _check_tensor(param_state["projector_right"], where, "projector_right", shape=(l, rank),
                      dtype=torch.float32)
        l = rank
    _check_moments(param_state, group, inner, (rank, l), where, optimizer._moment_dtype(group, p))
    for key in PROJECTED_INT_KEYS:
        value = param_state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    if group["error_feedback"]:
        _require(param_state, (error_feedback.BUFFER,), where)
        _check_tensor(param_state[error_feedback.BUFFER], where, error_feedback.BUFFER,
                      shape=tuple(p.shape), dtype=torch.float32)
    SELECTORS.lookup(group["selector"]).check_state(param_state, group, where)
    for key, value in param_state.items():  # whatever else a component keeps must be finite too
        if isinstance(value, torch.Tensor):
            _check_tensor(value, where, key)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: {key} is {value}")
    return param_state


def _check_moments(param_state: dict, group: dict, inner, shape: tuple, where: str, dtype) -> None:
    """The inner rule's moments, as stored (``state_storage.py``: plain, 8-bit codes or bf16); plain
    moments are given the dtype this optimizer keeps them in (``dtype``: e.g. fp32 for an fp16
    weight's subspace state), which torch's load would otherwise replace by the weight's."""
    for key in inner.state_keys:
        keys = stored_keys(group, key, math.prod(shape))
        _require(param_state, keys, where)
        _check_tensor(param_state[keys[0]], where, keys[0], shape=shape)  # values, codes or bf16
        if keys == (key,):
            param_state[key] = param_state[key].to(dtype)


def _require(param_state: dict, keys, where: str) -> None:
    missing = [key for key in keys if key not in param_state]
    if missing:
        raise ValueError(f"{where}: state lacks {missing} (it has {sorted(param_state)}); it was saved by "
                         "an optimizer configured differently")


def _check_tensor(value, where: str, key: str, shape: tuple | None = None, dtype=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: {key} must be a tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, expected {shape} (saved with "
                         "another rank, side or model?)")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{where}: {key} has dtype {value.dtype}, expected {dtype}")
    if value.is_floating_point() and not bool(value.isfinite().all()):
        raise ValueError(f"{where}: {key} holds non-finite values (NaN or Inf)")
