"""Subspace selectors, by name. Add one by subclassing :class:`Selector` and registering it here."""

from ..components import Registry
from .base import SelectionContext, Selector
from .dominant import DominantSelector
from .importance import ImportanceSelector, sample_without_replacement
from .online_pca import OSD_VARIANTS, P_OPTIMIZERS, OnlinePCASelector
from .power import PowerSelector
from .random import CoordinateSelector, RandomSelector

SELECTORS: Registry[Selector] = Registry("selector", (
    DominantSelector(), ImportanceSelector(), RandomSelector(), CoordinateSelector(),
    OnlinePCASelector(), PowerSelector(),
))


def get_selector(name: str) -> Selector:
    return SELECTORS.lookup(name)


__all__ = ["SELECTORS", "SelectionContext", "Selector", "get_selector", "sample_without_replacement"]
