"""Which side of an (m, n) weight is projected.

Left projection keeps P (m, r) and a state of shape (r, n); right projection keeps Q (n, r) and
works on G^T, so its state is (r, m). Rules:

- ``galore`` (default; GaLore's ``std``): compress the smaller dimension, i.e. left if m < n, else
  right. Square matrices go right.
- ``ldadam``: as ``galore`` but square matrices go left (LDAdam's code).
- ``min_state`` (GaLore's ``reverse_std``): compress the larger dimension, which minimises the Adam
  state (r * min(m, n) per moment) at the cost of a larger projector; square matrices go left.
- ``left``, ``right``: always that side.
- ``full`` (galore-torch's ``proj_type="full"``): both sides, ``R = P^T G Q`` (r, r) with P (m, r)
  and Q (n, r); the state is (r, r). The weight is handled in left form (G itself) with a second,
  right basis Q chosen by the same selector from G^T (so I3S samples the two sides independently).
"""

from __future__ import annotations

SIDES = ("galore", "ldadam", "min_state", "left", "right", "full")
# galore-torch's proj_type values
PROJ_TYPE_TO_SIDE = {"std": "galore", "reverse_std": "min_state", "left": "left", "right": "right", "full": "full"}


def two_sided(side: str) -> bool:
    return side == "full"


def projects_left(side: str, m: int, n: int) -> bool:
    if side == "galore":
        return m < n
    if side == "ldadam":
        return m <= n
    if side == "min_state":
        return m >= n
    if side in ("left", "full"):
        return True
    if side == "right":
        return False
    raise ValueError(f"side: unknown side {side!r}; allowed: {list(SIDES)}")
