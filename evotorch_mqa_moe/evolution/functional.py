"""The flat GA kernels in one namespace: uniform cross-over, Gaussian mutation, selection.

Everything here works on plain tensors of decision values shaped ``(..., P, N)``
(any leading batch dimensions, ``P`` individuals, ``N`` genes) and takes an
optional ``torch.Generator`` so that a seeded run repeats exactly. Inputs are
never modified; outputs keep the dtype and device of the inputs. Each kernel lives
in its own module (:mod:`.crossover`, :mod:`.mutation`, :mod:`.selection`); this
module only gathers them (it was ``evotorch_mqa_moe.functional``).
"""

from __future__ import annotations

from .crossover import uniform_cross_over
from .mutation import gaussian_mutation, gaussian_mutation_
from .selection import best_first, tournament_pairs, truncation_pairs

__all__ = [
    "best_first",
    "gaussian_mutation",
    "gaussian_mutation_",
    "tournament_pairs",
    "truncation_pairs",
    "uniform_cross_over",
]
