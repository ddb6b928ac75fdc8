"""Peak live tensor bytes, counted through a ``TorchDispatchMode``.

Every tensor an aten op returns is registered by its storage (views and in-place results share it,
so they count once) with a ``weakref.finalize`` on the storage, which fires when the storage is
freed. ``current`` is the sum over live storages, ``peak`` its maximum, sampled after every op (the
op's inputs are still alive then). It measures the same thing on CPU and on the meta device, where
kernels allocate nothing but shapes propagate, so a 7B step can be accounted for on a laptop.

Not seen: allocations inside a kernel that never become a tensor (LAPACK or cuSOLVER workspaces,
a fused attention kernel's scratch), the CPU allocator's own overhead, and tensors created before
the tracker was entered (build the model and optimizer inside it).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_op = None  # the op at which the peak was reached

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._register(leaf)
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, str(func)
        return out

    def _register(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.current += self.sizes[key]
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key)

    def reset_peak(self) -> None:
        self.peak, self.peak_op = self.current, None


class MetaTruth:
    """On the meta device a tensor has no value; data-dependent reads get a fixed one instead:
    ``bool`` reads True (the optimizer's finiteness screens pass; the zero-gradient test of a
    factorisation takes its branch, which keeps the SVD's allocation and substitutes a basis of the
    same shape, so a refresh step is still accounted for); ``item``, ``float`` and ``int`` read 1 (the
    overlap diagnostic, a float)."""

    NAMES = ("__bool__", "item", "__float__", "__int__")
    VALUES = (True, 1.0, 1.0, 1)

    def __enter__(self):
        self._saved = [getattr(torch.Tensor, name) for name in self.NAMES]
        for name, real, value in zip(self.NAMES, self._saved, self.VALUES):
            def read(t, real=real, value=value):
                return value if t.device.type == "meta" else real(t)
            setattr(torch.Tensor, name, read)
        return self

    def __exit__(self, *exc):
        for name, real in zip(self.NAMES, self._saved):
            setattr(torch.Tensor, name, real)
