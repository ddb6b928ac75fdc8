"""Subspace steps on weights sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under ``fully_shard`` a weight W (m, n) is a ``DTensor`` split by rows (``Shard(0)``): this process
holds W_i (m_i, n) and its gradient G_i. In left form (k, l) (``functional.py``) the rows of W are the
projected side k for a left projection and the other side l for a right one, so the step's math
splits cleanly (all on local tensors, the same functions as the whole-weight reference):

- ``l`` sharded (right projection, the side rule's choice for m >= n): the basis Q (k, r) is whole on
  every process; R_i = Q^T G_i, the moments (r, l_i), the update and error feedback are local.
  Nothing is communicated on an ordinary step.
- ``k`` sharded (left projection): the basis rows P_i are local; ``R = sum_i P_i^T G_i`` is one
  all-reduce of (r, l) per step, after which everything is local again.
- A refresh of a refresh-window selector needs the spectrum of the whole gradient: the Gram matrix
  of the unsharded side, ``G G^T = sum_i G_i G_i^T`` (k, k), one all-reduce, when that is smaller
  than the gradient, else an all-gather of the gradient; every process then factorises the same
  matrix, so every process holds bitwise the same basis (random selectors draw from counter-based
  generators, identical everywhere) and keeps its own rows of it.
- The every-step selectors (OSD, LDAdam's power iteration), ``rotate`` and the overlap diagnostic
  contract over k or l; each such sum is one all-reduce of a small (r, ...) or (k, r) matrix.

State tensors are ``DTensor``s placed like what they describe (moments ``Shard(1)`` when l is
sharded, bases ``Shard(0)`` when k is, the error buffer like the weight, the rest replicated), so
``torch.distributed.checkpoint`` saves, loads and reshards them. Only 1-D meshes with ``Shard(0)``
(FSDP2's layout) are supported; anything else raises ``NotImplementedError``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import linalg


def is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(tensor, DTensor)


def local(tensor):
    """The local shard of a ``DTensor`` (sharing its storage), anything else unchanged."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


class Whole:
    """A weight held whole by this process: every operation is the identity (the reference)."""

    sharded = False

    def sum_k(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the k (projected) side of a contraction computed on local rows."""
        return x

    def sum_l(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the l side of a contraction computed on local columns."""
        return x

    def rows(self, full: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole (k, ...) matrix."""
        return full

    def whole_shape(self, shape) -> tuple[int, int]:
        """The whole left-form (k, l) from this process's shard shape."""
        return tuple(shape)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The whole (k, ...) matrix from every process's rows."""
        return rows

    def all_equal(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a, b)

    def any(self, x: torch.Tensor) -> bool:
        return bool(x.any())

    def frobenius_norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(x)

    def overlap(self, old: torch.Tensor, new: torch.Tensor) -> float:
        return linalg.subspace_overlap(old, new)

    def factorize(self, grad: torch.Tensor, method: str, count=None, test_matrix=None, options=None):
        """``(U, S)`` of the whole left-form gradient by ``method`` (fp32; ``linalg.SVD_METHODS``)."""
        return linalg.SVD_METHODS[method](grad, count, test_matrix, **(options or {}))


WHOLE = Whole()


class RowShards(Whole):
    """A weight sharded by rows over a 1-D device mesh, seen in left form (see the module docstring).

    ``traffic`` (a dict, optional) accumulates the bytes this process sends into our collectives,
    by kind (``"step"`` or ``"refresh"``): what the communication benchmark reports.
    """

    sharded = True

    def __init__(self, param, left: bool, traffic: dict | None = None, kind: str = "step"):
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = param.device_mesh
        if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise NotImplementedError(
                f"subspace optimizers support DTensor weights sharded by rows on a 1-D mesh (FSDP2's "
                f"fully_shard), got placements {tuple(param.placements)} on a {mesh.ndim}-D mesh")
        self.mesh, self.group = mesh, mesh.get_group()
        self.world = mesh.size()
        self.k_sharded, self.l_sharded = left, not left
        self.rows_total = param.shape[0]
        self.row_sizes = [len(chunk) for chunk in torch.arange(self.rows_total).chunk(self.world)]
        self.row_sizes += [0] * (self.world - len(self.row_sizes))
        shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, param.placements)
        self.offset, self.local_rows = offset[0], shape[0]
        self.traffic, self.kind = traffic, kind

    # ------------------------------------------------------------------------- collectives
    def _count(self, nbytes: int) -> None:
        if self.traffic is not None:
            self.traffic[self.kind] = self.traffic.get(self.kind, 0) + nbytes

    def _all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        x = x.contiguous()
        self._count(x.numel() * x.element_size())
        dist.all_reduce(x, op=op, group=self.group)
        return x

    def _all_gather(self, piece: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every process's ``piece`` along ``dim`` (uneven sizes: FSDP2's chunking)."""
        size = max(self.row_sizes)
        moved = piece.movedim(dim, 0)
        padded = moved.new_zeros((size, *moved.shape[1:]))
        padded[: moved.shape[0]] = moved
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        self._count(padded.numel() * padded.element_size())
        dist.all_gather(pieces, padded, group=self.group)
        whole = torch.cat([t[:n] for t, n in zip(pieces, self.row_sizes)])
        return whole.movedim(0, dim)

    # ------------------------------------------------------------------------- the operations
    def sum_k(self, x):
        return self._all_reduce(x) if self.k_sharded else x

    def sum_l(self, x):
        return self._all_reduce(x) if self.l_sharded else x

    def rows(self, full):
        return full[self.offset: self.offset + self.local_rows] if self.k_sharded else full

    def whole_shape(self, shape):
        k, l = shape
        return (self.rows_total, l) if self.k_sharded else (k, self.rows_total)

    def gather_rows(self, rows):
        return self._all_gather(rows, 0) if self.k_sharded else rows

    def all_equal(self, a, b):
        same = torch.tensor(1.0 if torch.equal(a, b) else 0.0, device=a.device)
        return bool(self._all_reduce(same, dist.ReduceOp.MIN) == 1.0)

    def any(self, x):
        flag = torch.tensor(1.0 if bool(x.any()) else 0.0, device=x.device)
        return bool(self._all_reduce(flag, dist.ReduceOp.MAX) == 1.0)

    def frobenius_norm(self, x):
        return self._all_reduce(x.to(torch.float32).square().sum()).sqrt()

    def overlap(self, old, new):
        r = min(old.shape[1], new.shape[1])
        if r == 0:
            return 1.0
        c = self.sum_k(old.to(torch.float32).T @ new.to(torch.float32))  # (r1, r2)
        return float((c * c).sum() / r)

    def factorize(self, grad, method, count=None, test_matrix=None, options=None):
        """Whole-gradient factors from local pieces: the Gram matrix of the unsharded side (one
        all-reduce of (k, k)) when k < l for the exact methods (``svd`` then takes ``gram``'s
        arithmetic), else an all-gather of the gradient and ``method`` on it (the reference's
        arithmetic); identical on every process."""
        k, l_total = grad.shape[0], (self.rows_total if self.l_sharded else grad.shape[1])
        # (the randomized method keeps its own law: it factorises the gathered gradient)
        if self.l_sharded and k < l_total and method != "randomized":
            a = grad.detach().to(torch.float32)
            scale = self._all_reduce(a.abs().amax().reshape(1), dist.ReduceOp.MAX)[0]
            if scale == 0 or not torch.isfinite(scale):
                return linalg.svd_fp32(self._all_gather(a, 1))
            a = a / scale
            return linalg.gram_factors(self._all_reduce(a @ a.T), scale)
        whole = self._all_gather(grad, 0 if self.k_sharded else 1)
        return linalg.SVD_METHODS[method](whole, count, test_matrix, **(options or {}))

    # ------------------------------------------------------------------------- DTensor state
    def wrap(self, tensor: torch.Tensor, role: str):
        """A local state tensor as a ``DTensor`` placed by its ``role``: ``"param"`` (like the weight),
        ``"basis"`` ((k, r) rows), ``"moments"`` ((r, l) columns) or ``"replicated"``."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if role == "param":
            placement, dim = Shard(0), 0
        elif role == "basis" and self.k_sharded:
            placement, dim = Shard(0), 0
        elif role == "moments" and self.l_sharded:
            placement, dim = Shard(1), 1
        else:
            return DTensor.from_local(tensor, self.mesh, [Replicate()], run_check=False)
        shape = list(tensor.shape)
        shape[dim] = self.rows_total
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(tensor, self.mesh, [placement], run_check=False, shape=torch.Size(shape),
                                  stride=stride)


def shards_of(param, left: bool, traffic: dict | None = None, kind: str = "step") -> Whole:
    """``RowShards`` for a sharded ``DTensor`` weight, else the identity ``WHOLE``."""
    if is_dtensor(param):
        return RowShards(param, left, traffic, kind)
    return WHOLE


def whole_norm(grad) -> torch.Tensor:
    """The 2-norm of the whole tensor (0-d fp32) from a ``DTensor``'s local shard: one all-reduce
    (sum) of the local squared norm over the shard group, so every process gets the same value.
    A plain tensor's norm is ``torch.linalg.vector_norm`` of it (``clip_grad_norm_``'s)."""
    if not is_dtensor(grad):
        return torch.linalg.vector_norm(grad, 2)
    square = torch.linalg.vector_norm(local(grad), 2, dtype=torch.float32).square().reshape(1)
    dist.all_reduce(square, group=grad.device_mesh.get_group())
    return square[0].sqrt()
