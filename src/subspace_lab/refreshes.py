"""Subspace refreshes as they happen, from the optimizer's own counters.

Each projected weight's state holds `refresh_count`; their sum grows exactly when some weight got
a new subspace. Only then are the library's `subspace_diagnostics` read, to report the overlap of
each refreshed weight's new subspace with its previous one (`overlap.jsonl`).
"""
from __future__ import annotations

import torch


class RefreshCounter:
    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.total = self._total()
        self.counts = {d["name"]: d["refresh_count"] for d in self._diagnostics()}

    def _total(self) -> int:
        return sum(int(s.get("refresh_count", 0)) for s in self.opt.state.values())

    def _diagnostics(self) -> list[dict]:
        from subspace_optim import subspace_diagnostics

        return subspace_diagnostics(self.opt)

    def refreshed(self) -> list[dict]:
        """The diagnostics record of every weight refreshed since the last call ([] if none)."""
        total = self._total()
        if total == self.total:
            return []
        self.total = total
        out = []
        for d in self._diagnostics():
            if d["refresh_count"] > self.counts.get(d["name"], 0):
                self.counts[d["name"]] = d["refresh_count"]
                out.append(d)
        return out
