"""The dtypes a ``SubspaceOptimizer`` keeps its state in."""

from __future__ import annotations

import torch


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of a projected parameter's inner state: the parameter's, except fp16, whose range
    a projected gradient (a sum over a whole dimension) overflows: fp32 there, as amp keeps
    fp16 models' optimizer state."""
    return torch.float32 if param.dtype == torch.float16 else param.dtype


def scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for the ``step`` tensor, so that the dense path matches AdamW exactly."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
