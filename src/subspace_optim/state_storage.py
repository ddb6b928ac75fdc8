"""Compressed storage of optimizer state between steps: the inner rule's moments in 8 or 16 bits
(group key ``state_bits``) and the projector in 8 or 16 bits (``projector_bits``); the math stays fp32.

- ``state_bits=32`` (default): moments stored as computed, at the parameter's precision (fp32 for
  fp16 parameters), as ``torch.optim.AdamW`` keeps them.
- ``state_bits=16``: moments stored in bf16 (key ``<moment>_bf16``), computed in fp32.
- ``state_bits=8``: moments stored block-wise quantised (``quantization.py``: 256-element blocks,
  bitsandbytes' dynamic map, signed for first moments and unsigned for second moments; keys
  ``<moment>_codes`` uint8 and ``<moment>_absmax`` fp32), computed in fp32, as bitsandbytes' and
  torchao's 8-bit optimizers do. Tensors under 4,096 elements stay unquantised, as in both.
- ``projector_bits=16``: the basis is stored in bf16 and decoded to fp32 for every projection, so
  projection, refresh and transitions keep fp32 arithmetic; only the stored basis is rounded
  (a refresh step itself still uses the unrounded new basis). Its relative error, ~2^-9 per entry,
  makes the basis orthonormal only to that precision.
- ``projector_bits=8``: the basis is stored block-wise quantised with the signed *linear* map
  (``quantization.py``): key ``projector`` holds the uint8 codes (the basis' shape, so the rank and
  side read from it as before) and ``projector_absmax`` the fp32 block scales. Relative entry error
  ~0.7%, ``||P^T P - I||_2`` ~1e-2. A basis is quantised once, when a refresh makes it: steps that
  keep it put the stored codes back instead of quantising the decoded copy again. The right basis
  of a two-sided projection stays fp32 (as with ``projector_bits=16``).

Applies to projected and dense parameters. A step decodes the moments of one parameter, runs the
ordinary arithmetic (transitions, selectors and error feedback see ordinary float tensors) and
encodes them again; if the step raises, the stored state is left as it was. Large dense parameters
(embeddings, the LM head) are updated chunk by chunk (:func:`dense_update`), so a step never holds
more than one chunk of decoded moments; every operation is element-wise and chunks start on block
boundaries, so chunking changes nothing (tested against the unchunked reference).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from . import quantization as q
from .checks import check_choice
from .components import Component, Registry
from .dtypes import scalar_dtype
from .functional import apply_update, lion_sign, step_number
from .inner import INNER_RULES

MIN_COMPRESSED_NUMEL = 4096
CHUNK = 1 << 20  # elements per chunk of a dense update, a multiple of the block size
CODES, ABSMAX, BF16 = "_codes", "_absmax", "_bf16"
STATE_BITS, PROJECTOR_BITS = (8, 16, 32), (8, 16, 32)
BASIS, BASIS_ABSMAX = "projector", "projector" + ABSMAX


class StateStorage(Component):
    name = "storage"
    defaults = {"state_bits": 32, "projector_bits": 32}

    @property
    def exact_state_keys(self) -> tuple[str, ...]:  # codes and scales must keep their dtype on load
        return (BASIS_ABSMAX,) + tuple(key + suffix for rule in INNER_RULES.values() for key in rule.state_keys
                                       for suffix in (CODES, ABSMAX, BF16))

    def validate(self, group: dict) -> None:
        for name, allowed in (("state_bits", STATE_BITS), ("projector_bits", PROJECTOR_BITS)):
            if isinstance(group[name], bool) or group[name] not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {group[name]!r}")
        if group["state_bits"] == 8 or group["projector_bits"] == 8:
            q.require_backend()


STORAGE: Registry[StateStorage] = Registry("storage", (StateStorage(),))


def compute_dtype(group: dict, default: torch.dtype) -> torch.dtype:
    """fp32 when the moments are stored compressed, else ``default`` (the optimizer's state dtype)."""
    return torch.float32 if group["state_bits"] < 32 else default


def _format(group: dict, numel: int) -> str:
    if group["state_bits"] == 32 or numel < MIN_COMPRESSED_NUMEL:
        return "plain"
    return "int8" if group["state_bits"] == 8 else "bf16"


def compresses_dense(group: dict, p: torch.Tensor) -> bool:
    return _format(group, p.numel()) != "plain"


def _signed(inner, key: str) -> bool:
    return key not in inner.second_moments


# ------------------------------------------------------------------------- decode / encode
def stored_basis(state: dict) -> torch.Tensor:
    """The fp32 basis (k, r) that ``state``'s ``projector`` stores (fp32, bf16 or 8-bit codes)."""
    basis = state[BASIS]
    if basis.dtype == torch.uint8:
        return q.dequantize(basis, state[BASIS_ABSMAX], True, "linear")
    return basis.to(torch.float32)


def _decode(state: dict, inner) -> None:
    for key in inner.state_keys:
        if key + CODES in state:
            state[key] = q.dequantize(state[key + CODES], state[key + ABSMAX], _signed(inner, key))
        elif key + BF16 in state:
            state[key] = state[key + BF16].to(torch.float32)
    if BASIS in state and state[BASIS].dtype != torch.float32:
        state[BASIS] = stored_basis(state)
        state.pop(BASIS_ABSMAX, None)


def _encode_basis(state: dict, group: dict, stored: dict | None, decoded_basis) -> None:
    if BASIS not in state:
        return
    if group["projector_bits"] == 16:
        state[BASIS] = state[BASIS].to(torch.bfloat16)
    elif group["projector_bits"] == 8:
        if state[BASIS] is decoded_basis and stored[BASIS].dtype == torch.uint8:  # the basis stayed
            state[BASIS], state[BASIS_ABSMAX] = stored[BASIS], stored[BASIS_ABSMAX]
            return
        codes, absmax = q.empty_codes(state[BASIS].shape, state[BASIS].device)
        q.quantize_into(state[BASIS], codes, absmax, True, "linear")
        state[BASIS], state[BASIS_ABSMAX] = codes, absmax


def _encode(state: dict, group: dict, inner) -> None:
    for key in inner.state_keys:
        if key not in state:
            continue
        value = state.pop(key)
        fmt = _format(group, value.numel())
        for other in {"plain": (CODES, ABSMAX, BF16), "int8": ("", BF16), "bf16": ("", CODES, ABSMAX)}[fmt]:
            state.pop(key + other, None)
        if fmt == "plain":
            state[key] = value
        elif fmt == "int8":
            codes = state.get(key + CODES)
            if codes is None or codes.shape != value.shape:
                state[key + CODES], state[key + ABSMAX] = q.empty_codes(value.shape, value.device)
            q.quantize_into(value, state[key + CODES], state[key + ABSMAX], _signed(inner, key))
        else:
            state[key + BF16] = value.to(torch.bfloat16)


def stored_keys(group: dict, key: str, numel: int) -> tuple[str, ...]:
    """The state keys that hold moment ``key`` of ``numel`` elements between steps."""
    fmt = _format(group, numel)
    return {"plain": (key,), "int8": (key + CODES, key + ABSMAX), "bf16": (key + BF16,)}[fmt]


def _active(group: dict) -> bool:
    return group["state_bits"] < 32 or group["projector_bits"] < 32


@contextmanager
def decoded(opt, group: dict, p: torch.Tensor):
    """Within the block, ``opt.state[p]`` holds its moments and projector as ordinary fp32 tensors;
    they are stored compressed again on exit, or left as stored if the block raises."""
    if not _active(group):
        yield
        return
    inner = INNER_RULES.lookup(group["inner"])
    state = opt.state.get(p)  # not opt.state[p]: a first step must find no state entry
    stored = dict(state) if state else None
    if state:
        _decode(state, inner)
    decoded_basis = state.get(BASIS) if state else None
    try:
        yield
    except BaseException:
        if stored is not None:
            state.clear()
            state.update(stored)
        raise
    state = opt.state.get(p)
    if state:
        _encode(state, group, inner)
        _encode_basis(state, group, stored, decoded_basis)


# ------------------------------------------------------------------------------ dense path
def dense_update(opt, group: dict, p: torch.Tensor, chunk: int = CHUNK) -> None:
    """The dense step of ``opt._dense_update`` with compressed moments, ``chunk`` elements at a time
    (fp32 arithmetic; the weight update is cast to the parameter's dtype)."""
    inner = INNER_RULES.lookup(group["inner"])
    fmt = _format(group, p.numel())
    state = opt.state[p]
    if not state:
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        for key in inner.state_keys:
            if fmt == "int8":
                state[key + CODES], state[key + ABSMAX] = q.empty_codes(p.shape, p.device)
            else:
                state[key + BF16] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
    state["step"] += 1
    step = step_number(state["step"])
    whole = not p.is_contiguous()
    target = p if whole else p.view(-1)
    grad = p.grad if whole else p.grad.reshape(-1)
    n = target.numel() if not whole else 0
    spans = [(None, None)] if whole else [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    for start, end in spans:
        moments = {key: _read(state, key, fmt, start, end, _signed(inner, key)) for key in inner.state_keys}
        d = inner.direction(grad[start:end].to(torch.float32), moments, group, step)
        numerator = lion_sign(d.numerator, inner.sign_after_backprojection)
        part = target[start:end]
        step_size = d.step_size(group["lr"])
        if part.dtype == torch.float32:
            apply_update(part, numerator, d.denominator, step_size, group["lr"], group["weight_decay"],
                         inner.decay_after_update)
        else:
            ratio = numerator if d.denominator is None else numerator / d.denominator
            apply_update(part, ratio.to(part.dtype), None, step_size, group["lr"], group["weight_decay"],
                         inner.decay_after_update)
        for key, value in moments.items():
            _write(state, key, fmt, start, end, value, _signed(inner, key))


def _span(tensor: torch.Tensor, start, end) -> torch.Tensor:
    return tensor if start is None else tensor.view(-1)[start:end]


def _scales(absmax: torch.Tensor, start, end) -> torch.Tensor:
    return absmax if start is None else absmax[start // q.BLOCK:q.blocks(end)]


def _read(state, key, fmt, start, end, signed) -> torch.Tensor:
    if fmt == "int8":
        return q.dequantize(_span(state[key + CODES], start, end), _scales(state[key + ABSMAX], start, end), signed)
    return _span(state[key + BF16], start, end).to(torch.float32)


def _write(state, key, fmt, start, end, value, signed) -> None:
    if fmt == "int8":
        q.quantize_into(value, _span(state[key + CODES], start, end), _scales(state[key + ABSMAX], start, end),
                        signed)
    else:
        _span(state[key + BF16], start, end).copy_(value)
