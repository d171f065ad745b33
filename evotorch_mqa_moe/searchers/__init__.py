"""The searchers: one registry (:mod:`.registry`) and its members.

Each member module registers its own specs on import; importing this package imports
them all, in the order ``evotorch-mqa-moe list`` shows them:

* :mod:`.evotorch_algorithms`: our GA and EvoTorch's algorithms (CMA-ES, PGPE, SNES, ...)
  behind the :class:`EvoTorchSearcher` adapter;
* :mod:`.backprop`: ``adam``, the backprop reference;
* :mod:`.lamarck`, :mod:`.pbt`: hybrids built on :mod:`.gradients`,
  :mod:`.population_optim` and :mod:`.hybrid`;
* :mod:`.lowrank_es`: the low-rank evolution strategy;
* :mod:`.lowrank_ga`: our GA on compact (centre + low-rank factor) genomes;
* :mod:`.reinforce`: policy gradient on the sequence reward (group-mean baseline).
"""

from __future__ import annotations

# isort: off
# Registration order is the order `list` shows (and the catalog records).
from . import evotorch_algorithms  # noqa: F401  (ga ... cem)
from . import backprop  # noqa: F401  (adam)
from . import lamarck  # noqa: F401  (lamarck, baldwin)
from . import pbt  # noqa: F401  (pbt)
from . import lowrank_es  # noqa: F401  (lowrank-es)
from . import lowrank_ga  # noqa: F401  (lowrank-ga)
from . import reinforce  # noqa: F401  (reinforce)
# isort: on
from .evotorch_algorithms import (
    FULL_CMAES_MAX,
    GA_SEED_SETTINGS,
    GA_SETTINGS,
    GA_SPACE,
    XNES_MAX,
    EvoTorchSearcher,
)
from .registry import (
    SEARCHERS,
    SPACE_KINDS,
    Searcher,
    SearcherSpec,
    check_loss_fitness,
    get_spec,
    make_searcher,
    min_popsize,
    register,
    supports_gradients,
)

__all__ = [
    "Searcher",
    "SearcherSpec",
    "EvoTorchSearcher",
    "SEARCHERS",
    "FULL_CMAES_MAX",
    "XNES_MAX",
    "SPACE_KINDS",
    "GA_SETTINGS",
    "GA_SEED_SETTINGS",
    "GA_SPACE",
    "register",
    "check_loss_fitness",
    "get_spec",
    "make_searcher",
    "min_popsize",
    "supports_gradients",
]
