"""Block-wise 8-bit quantisation of optimizer moments with bitsandbytes' dynamic (tree) map
("8-bit Optimizers via Block-wise Quantization", Dettmers et al., arXiv 2110.02861).

A tensor is cut into blocks of 256 consecutive elements (of its flattened form); each block keeps
its absolute maximum in fp32 and every element one byte, the index of the nearest value of a
256-entry map in [-1, 1] (signed, first moments) or [0, 1] (unsigned, second moments). The codes
and scales are plain ``uint8`` / ``float32`` tensors, so the state saves with ``torch.save`` and
loads with ``weights_only=True``, and a resumed run decodes exactly what was stored.

Why bitsandbytes: its ``quantize_blockwise`` / ``dequantize_blockwise`` run natively on CPU (and CUDA,
and, as shape-only fakes, on the meta device) over plain tensors of any size. torchao's low-bit
optimizer states are tensor subclasses, which need ``import torchao.optim`` before a
``weights_only`` load, an element count divisible by the block size, and no in-place ``lerp_``.
bitsandbytes is an optional dependency (``pip install 'subspace-optim[lowbit]'``), imported only
when 8-bit states are used.
"""

from __future__ import annotations

import torch

BLOCK = 256
_MAPS: dict = {}


def _functional():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("state_bits=8 needs bitsandbytes: pip install 'subspace-optim[lowbit]' "
                          "(or pip install bitsandbytes)") from e
    return bnb_functional


def require_backend() -> None:
    """Raise ``ImportError`` with the install command if bitsandbytes is missing."""
    _functional()


def quantization_map(signed: bool, device) -> torch.Tensor:
    """bitsandbytes' dynamic map (256 values, fp32) on ``device``, cached."""
    key = (signed, str(device))
    if key not in _MAPS:
        _MAPS[key] = _functional().create_dynamic_map(signed=signed).to(device)
    return _MAPS[key]


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def empty_codes(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of an all-zero tensor of ``shape`` (a zero scale decodes to exact zeros)."""
    numel = torch.Size(shape).numel()
    return (torch.zeros(shape, dtype=torch.uint8, device=device),
            torch.zeros(blocks(numel), dtype=torch.float32, device=device))


def quantize_into(values: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> None:
    """Write the codes (``codes``, uint8, ``values``' shape) and block scales (``absmax``, fp32) of
    ``values`` in place. Blocks start at element 0 of ``values``: quantising a tensor chunk by chunk,
    with chunks that start on block boundaries, gives exactly the codes of the whole."""
    code = quantization_map(signed, values.device)
    _functional().quantize_blockwise(values.contiguous(), code=code, absmax=absmax, out=codes, blocksize=BLOCK)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The fp32 values that ``codes`` and ``absmax`` encode (``codes``' shape)."""
    code = quantization_map(signed, codes.device)
    return _functional().dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCK)
