"""The parts a subspace optimizer is composed of, and their registries.

A *component* (a selector, a transition or an inner rule) is a small object with a name, the
param-group keys it owns with their defaults, the validation of those keys and the per-parameter
state keys whose dtype must survive ``load_state_dict``. The optimizer merges the defaults of every
registered component into its own and asks each component to validate its keys, so it never names
a component's option itself: a new selector is one file plus ``SELECTORS.register(MySelector())``.
"""

from __future__ import annotations

from typing import Generic, TypeVar


class Component:
    """Base class of selectors, transitions and inner rules.

    Attributes:
        name: the value of the group key (``selector``, ``transition`` or ``inner``) choosing it.
        defaults: the group keys this component owns, with their defaults.
        exact_state_keys: per-parameter state keys kept at their saved dtype on load (fp32 or integer
            tensors of a lower-precision parameter).
    """

    name: str = ""
    defaults: dict = {}
    exact_state_keys: tuple[str, ...] = ()

    def validate(self, group: dict) -> None:
        """Raise ``ValueError`` naming the key and its allowed values for a bad option of this
        component in ``group``. Called for every group, whichever component the group uses."""


C = TypeVar("C", bound=Component)


class Registry(dict, Generic[C]):
    """``name -> component`` for one kind (``"selector"``, ``"transition"``, ``"inner"``)."""

    def __init__(self, kind: str, components=()):
        super().__init__()
        self.kind = kind
        for component in components:
            self.register(component)

    def register(self, component: C) -> C:
        """Add ``component``; its defaults must not reuse a key another registered component owns."""
        if not component.name:
            raise ValueError(f"{self.kind}: a component needs a non-empty name")
        owned = {key for other in self.values() if other.name != component.name for key in other.defaults}
        clash = owned & set(component.defaults)
        if clash:
            raise ValueError(f"{self.kind} {component.name!r}: group keys {sorted(clash)} are owned by "
                             "another component")
        self[component.name] = component
        return component

    def lookup(self, name: str) -> C:
        try:
            return self[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.kind}: unknown {self.kind} {name!r}; allowed: {sorted(self)}") from None

    def defaults(self) -> dict:
        """The group keys of every registered component with their defaults."""
        out: dict = {}
        for component in self.values():
            out.update(component.defaults)
        return out

    def exact_state_keys(self) -> set[str]:
        return {key for component in self.values() for key in component.exact_state_keys}

    def validate(self, group: dict) -> None:
        for component in self.values():
            component.validate(group)
