"""What the lab measures and plots: optimizer-state bytes and the subspace overlap between refreshes."""

from __future__ import annotations

import torch


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state_dict()["state"]``: what a checkpoint stores and
    what the optimizer holds beyond the weights and gradients."""
    return _tensor_bytes(optimizer.state_dict()["state"])


def subspace_diagnostics(optimizer: torch.optim.Optimizer) -> list[dict]:
    """One record per projected parameter that has taken a step.

    ``overlap`` is ``||P_prev^T P||_F^2 / r`` between the two latest bases, the mean squared cosine
    of their principal angles (1 = the subspace did not move: GaLore's frozen subspace), None before
    the parameter's second refresh. ``state_bytes`` covers that parameter's state tensors.
    """
    records = []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            if not state or "projector" not in state:
                continue
            records.append(
                {
                    "name": names[pi] if names else f"{gi}.{pi}",
                    "shape": tuple(p.shape),
                    "rank": state["projector"].shape[1],
                    "refresh_count": state["refresh_count"],
                    "overlap": state.get("overlap"),
                    "state_bytes": _tensor_bytes(state),
                }
            )
    return records
