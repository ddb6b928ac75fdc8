"""Zeroth-order fine-tuning: MeZO (arXiv 2305.17333) and SubZero (arXiv 2410.08989).

Both optimizers estimate a directional derivative from two forward passes with a seeded random
perturbation, so ``step(closure)`` is mandatory and no gradient or backward pass is ever used.
"""

from .base import ZerothOrderOptimizer
from .mezo import MeZO
from .subzero import SubZero

__all__ = ["MeZO", "SubZero", "ZerothOrderOptimizer"]
