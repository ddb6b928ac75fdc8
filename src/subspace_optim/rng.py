"""Counter-based random generators: ``(seed, key, counter) -> torch.Generator``.

Every random draw in the library (I3S's sampled subspaces, random bases, zeroth-order perturbations)
comes from a fresh generator whose seed is a hash of the run seed, a stable key (the parameter's name
or position) and a counter (the refresh or step number). The global RNG is never touched, so the
same seed gives the same subspaces on every data-parallel rank and after a resume, with no generator
state to save: the counter alone, a plain integer, reproduces the stream.
"""

from __future__ import annotations

import hashlib

import torch

_MASK_63 = (1 << 63) - 1


def derive_seed(seed: int, key: str, counter: int) -> int:
    """A 63-bit seed from ``(seed, key, counter)``; stable across processes, platforms and versions.

    blake2b rather than Python's ``hash``, which is salted per process.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x1f{key}\x1f{int(counter)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def generator_for(seed: int, key: str, counter: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` seeded by :func:`derive_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, key, counter))
    return gen
