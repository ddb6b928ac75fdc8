"""The selector interface: pick the r-dimensional subspace a 2-D gradient is projected onto.

Selectors work on the gradient in *left form*: a (k, l) fp32 matrix whose k rows span the projected
side (the optimizer transposes right-projected gradients first), and return a (k, r) fp32 basis with
orthonormal columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..components import Component
from ..randomized import gaussian_test_matrix, method_options
from ..rng import generator_for
from ..sharding import WHOLE, Whole
from ..sides import two_sided

# Prefix of the randomized SVD's stream key: its own stream, so that a selector's sampling draws
# the same numbers whichever ``svd_method`` factorised the gradient.
SKETCH_KEY_PREFIX = "sketch\x1e"
# Suffix of a two-sided projection's right-basis key (``refresh_stage.py`` selects Q from G^T under
# ``key + "/right"``): how a context knows its gradient is the transpose of the left form.
RIGHT_KEY_SUFFIX = "/right"


@dataclass
class SelectionContext:
    """What a selector may use besides the gradient.

    ``state`` is the parameter's optimizer state (a selector may keep its own tensors there, listed
    in its ``exact_state_keys`` so that ``load_state_dict`` keeps their dtype). ``refresh_index``
    counts this parameter's refreshes before this one: with ``seed`` and ``key`` it names the random
    stream, so every data-parallel rank and every resumed run draws the same numbers.
    """

    state: dict
    group: dict
    key: str
    refresh_index: int
    inner: object = None  # the group's inner rule (``inner.InnerRule``), for selectors that read it
    # how the weight is split across processes (``sharding.py``): gradients and bases a selector sees
    # are this process's shards, and it contracts / gathers through these operations
    shard: Whole = WHOLE

    def generator(self, device: torch.device | str) -> torch.Generator:
        return generator_for(self.group["seed"], self.key, self.refresh_index, device)

    def sketch_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator of the randomized SVD's test matrix (``svd_method="randomized"``)."""
        return generator_for(self.group["seed"], SKETCH_KEY_PREFIX + self.key, self.refresh_index, device)

    @property
    def transposed(self) -> bool:
        """Whether the gradient this context selects for is the transpose of the weight's gradient as
        stored: a right projection's left form (``state["project_left"]`` False), or the right basis
        of a two-sided one (selected from G^T under ``key + "/right"``). Read by
        ``svd_method="lapack"``, which factorises the gradient as stored (galore-torch's arithmetic)."""
        left = self.state.get("project_left", True)
        if two_sided(self.group.get("side", "galore")) and self.key.endswith(RIGHT_KEY_SUFFIX):
            return left
        return not left

    def factorize(self, grad: torch.Tensor, count: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``U`` (k, c) with orthonormal columns and ``S`` (c,) descending, of ``grad`` (k, l) by the
        group's ``svd_method``, in fp32; None for an all-zero (or empty) gradient, which carries no
        direction to choose from.

        ``count`` is how many leading triplets the caller needs (None: the whole spectrum). The exact
        methods (``svd``, ``gram``) return all ``c = min(k, l)``; ``randomized`` returns ``count``
        (or all, when a sketch would be as large as the matrix), from this weight's own test matrix;
        ``auto`` is one of these, chosen by the whole gradient's shape and ``count``; ``lapack``
        (galore-torch's arithmetic) factorises the gradient as stored (:attr:`transposed`), for whole
        weights only (``ValueError`` for a sharded one).
        """
        method, options = method_options(self.group, self.shard.whole_shape(grad.shape), count)
        test_matrix = gaussian_test_matrix(self.sketch_generator(grad.device)) if options else None
        if method == "lapack":
            if self.shard.sharded:
                raise ValueError(f"svd_method='lapack' (galore-torch's arithmetic) factorises a whole gradient; "
                                 f"{self.key} is sharded (DTensor): use svd_method='svd' or 'gram'")
            options = {"transposed": self.transposed}
        return nonzero_factors(*self.shard.factorize(grad, method, count, test_matrix, options))


def nonzero_factors(u: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(u, s)``, or None when every singular value is zero (or there are none)."""
    if s.numel() == 0 or s[0] == 0:
        return None
    return u, s


class Selector(Component):
    """Base class. ``every_step`` selectors are called at every step, the others every
    ``update_proj_gap`` steps (and at a parameter's first step)."""

    every_step = False
    basis_state_keys: tuple[str, ...] = ()  # state shaped like the basis (k, r): sharded like it

    def check_state(self, state: dict, group: dict, where: str) -> None:
        """Raise ``ValueError`` (prefixed by ``where``) if a loaded ``state`` lacks what this selector
        keeps in it."""

    def select(
        self, grad: torch.Tensor, previous: torch.Tensor | None, rank: int, ctx: SelectionContext
    ) -> torch.Tensor:
        raise NotImplementedError


class SpectralSelector(Selector):
    """A selector that picks its basis among the leading singular triplets of the gradient.

    It says how many triplets it needs (:meth:`triplets`) and picks from them (:meth:`choose`), so
    that one factorisation call can serve a batch of equal-shape weights (``batched_refresh.py``)
    while each weight's choice (and random draw) stays its own.
    """

    def triplets(self, rank: int, shape: tuple[int, int], group: dict) -> int | None:
        """Leading triplets needed for a rank-``rank`` basis of a ``shape`` gradient; None: all."""
        return rank

    def choose(self, factors, grad: torch.Tensor, previous: torch.Tensor | None, rank: int,
               ctx: SelectionContext) -> torch.Tensor:
        """The basis (k, r) from ``factors`` (``SelectionContext.factorize``'s result for ``grad``)."""
        raise NotImplementedError

    def select(self, grad, previous, rank, ctx: SelectionContext) -> torch.Tensor:
        factors = ctx.factorize(grad, self.triplets(rank, ctx.shard.whole_shape(grad.shape), ctx.group))
        return self.choose(factors, grad, previous, rank, ctx)


def numerically_nonzero(singular_values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Mask of singular values above LAPACK's rank tolerance ``sigma_1 * max(k, l) * eps(fp32)``.

    Directions under it are noise: sampling them would pick arbitrary null-space vectors.
    """
    if singular_values.numel() == 0:
        return singular_values.bool()
    tol = singular_values[0] * max(shape) * torch.finfo(torch.float32).eps
    return singular_values > tol


def dominant_basis(grad: torch.Tensor, previous: torch.Tensor | None, rank: int,
                   ctx: SelectionContext) -> torch.Tensor:
    """The top-``rank`` left singular vectors of ``grad`` (k, r), or :func:`zero_gradient_basis`
    for an all-zero gradient: GaLore's subspace, and the first basis of the every-step selectors."""
    from .dominant import DominantSelector  # the dominant selector is this function's home

    return DominantSelector().select(grad, previous, rank, ctx)


def zero_gradient_basis(previous: torch.Tensor | None, rows: int, rank: int, device,
                        shard: Whole = WHOLE) -> torch.Tensor:
    """The documented basis for an all-zero gradient, which carries no direction to choose from.

    Keep the previous basis if there is one; at a parameter's first step use the first ``rank``
    coordinate axes (a deterministic, orthonormal choice). ``rows`` is this process's k.
    """
    if previous is not None:
        return previous
    return shard.rows(torch.eye(shard.whole_shape((rows, 0))[0], rank, dtype=torch.float32, device=device))
