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

A projector (``projector_bits=8``) takes bitsandbytes' signed *linear* map instead (255 evenly
spaced values in [-1, 1] and zero): a basis vector's entries are spread around ``1/sqrt(k)`` with
no heavy concentration near zero, which the dynamic map's resolution favours. Measured on SVD bases
of (128, 32) to (4096, 1024): relative entry error 0.7% (linear) against 1.1% (dynamic), and
``||P^T P - I||_2`` 1.0e-2 against 1.5e-2 (bf16 storage: 0.17% and 2.4e-3).
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


MAPS = ("dynamic", "linear")


def quantization_map(signed: bool, device, kind: str = "dynamic") -> torch.Tensor:
    """bitsandbytes' dynamic map, or its linear one (``kind``; 256 values, fp32) on ``device``, cached."""
    key = (kind, signed, str(device))
    if key not in _MAPS:
        F = _functional()
        made = F.create_dynamic_map(signed=signed) if kind == "dynamic" else F.create_linear_map(signed=signed)
        _MAPS[key] = made.to(device)
    return _MAPS[key]


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def empty_codes(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of an all-zero tensor of ``shape`` (a zero scale decodes to exact zeros)."""
    numel = torch.Size(shape).numel()
    return (torch.zeros(shape, dtype=torch.uint8, device=device),
            torch.zeros(blocks(numel), dtype=torch.float32, device=device))


def quantize_into(values: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                  kind: str = "dynamic") -> None:
    """Write the codes (``codes``, uint8, ``values``' shape) and block scales (``absmax``, fp32) of
    ``values`` in place. Blocks start at element 0 of ``values``: quantising a tensor chunk by chunk,
    with chunks that start on block boundaries, gives exactly the codes of the whole."""
    code = quantization_map(signed, values.device, kind)
    _functional().quantize_blockwise(values.contiguous(), code=code, absmax=absmax, out=codes, blocksize=BLOCK)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, kind: str = "dynamic") -> torch.Tensor:
    """The fp32 values that ``codes`` and ``absmax`` encode (``codes``' shape) with the map ``kind``."""
    code = quantization_map(signed, codes.device, kind)
    return _functional().dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCK)
