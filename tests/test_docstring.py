"""The class docstring of ``SubspaceOptimizer`` lists every registered component and every
component option by hand; this keeps it accurate when a component or option is added."""

from __future__ import annotations

import pytest

from subspace_optim import SubspaceOptimizer
from subspace_optim.inner import INNER_RULES
from subspace_optim.linalg import SVD_METHODS
from subspace_optim.optimizer import component_defaults
from subspace_optim.selectors import SELECTORS
from subspace_optim.sides import SIDES
from subspace_optim.transitions import TRANSITIONS

NAMES = [*SELECTORS, *TRANSITIONS, *INNER_RULES, *SIDES, *SVD_METHODS, *component_defaults()]


@pytest.mark.parametrize("name", sorted(set(NAMES)))
def test_class_docstring_names_every_component_and_option(name):
    assert f"``{name}``" in SubspaceOptimizer.__doc__, name
