"""Optimizer state that must keep its dtype through ``load_state_dict``.

torch's ``Optimizer.load_state_dict`` casts every floating per-parameter state tensor to the
parameter's dtype (only the key ``step`` is spared): an fp32 projector of a bf16 weight would come
back bf16 and a resumed run would no longer be bit-identical. It
also returns tensors that alias the loaded dict when no cast is needed, so two optimizers loaded
from one dict would update the same tensors. This mixin restores the listed keys at their saved
dtype and gives every other state tensor its own storage.
"""

from __future__ import annotations

import torch


class ExactStateMixin:
    """Mix into a ``torch.optim.Optimizer``; override :meth:`_exact_state_keys`."""

    def _exact_state_keys(self) -> set[str]:
        return set()

    def _prepare_loaded_state(self, state_dict: dict) -> dict:
        """Check (raise ``ValueError``) and complete a state dict before anything is loaded."""
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        captured = {}

        def prepare(opt, sd):
            captured["sd"] = self._prepare_loaded_state(sd)
            return captured["sd"]

        # registered last, so it sees the dict after any user pre-hook replaced it
        handle = self.register_load_state_dict_pre_hook(prepare)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        saved = captured["sd"]
        exact = self._exact_state_keys()
        for saved_group, group in zip(saved["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in saved["state"].get(pid, {}).items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    state = self.state[p]
                    if key in exact:
                        state[key] = value.to(device=p.device, copy=True)
                    elif state[key].data_ptr() == value.data_ptr():
                        state[key] = state[key].clone()
