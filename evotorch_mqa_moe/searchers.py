"""One factory for every supported searcher, with neuroevolution defaults.

All searchers start from the model's own initialisation (a population of
freshly initialised networks, or a centre that is one), never from EvoTorch's
near-zero default, and every step of a searcher sees one fresh batch of data
shared by all its evaluations.

Which to use (see ``docs/searchers.md``): PGPE with ClipUp is the robust default
at any size; ``cmaes`` is full CMA-ES up to ``FULL_CMAES_MAX`` parameters (its
covariance is N x N) and separable above; ``xnes`` also keeps an N x N matrix,
so small models only; the GAs need large populations but no gradient estimate.
"""

from __future__ import annotations

from typing import Any

from evotorch.algorithms import (
    CEM,
    CMAES,
    PGPE,
    SNES,
    XNES,
    Cosyne,
    GeneticAlgorithm,
    SteadyStateGA,
)
from evotorch.operators import GaussianMutation as EvoTorchGaussianMutation
from evotorch.operators import SimulatedBinaryCrossOver

from .ga import seed_genetic_algorithm
from .operators import GaussianMutation, UniformCrossOver
from .problem import TransformerProblem

__all__ = ["SEARCHERS", "FULL_CMAES_MAX", "XNES_MAX", "make_searcher", "min_popsize"]

FULL_CMAES_MAX = 2000  # popsize x N x N memory; beyond this CMA-ES runs separable
XNES_MAX = 2000  # xNES keeps an N x N matrix too

SEARCHERS = {
    "ga": "our GA: truncation selection, uniform cross-over, probabilistic Gaussian mutation",
    "ga-evotorch": "EvoTorch's GeneticAlgorithm with its SBX cross-over and Gaussian mutation",
    "steady-state-ga": "EvoTorch's SteadyStateGA with our operators",
    "cosyne": "EvoTorch's CoSyNE (cooperative synapse neuroevolution)",
    "cmaes": "CMA-ES (separable above FULL_CMAES_MAX parameters)",
    "pgpe": "PGPE with the ClipUp optimiser",
    "snes": "separable natural evolution strategy",
    "xnes": "exponential natural evolution strategy (small models)",
    "cem": "cross-entropy method",
}

DEFAULT_POPSIZE = {"ga": 300, "ga-evotorch": 300, "steady-state-ga": 300, "cosyne": 300,
                   "cmaes": 100, "pgpe": 200, "snes": 200, "xnes": 100, "cem": 200}


def min_popsize(name: str) -> int:
    """The smallest population a searcher accepts (ES need pairs / a parent set)."""
    return 4 if name in ("pgpe", "snes", "xnes", "cmaes", "cem", "cosyne") else 3


def make_searcher(name: str, problem: TransformerProblem, *, popsize: int | None = None,
                  stdev: float = 0.05, **overrides: Any):
    """Build searcher ``name`` over ``problem``.

    Args:
        name: one of :data:`SEARCHERS`.
        problem: the problem (its generator seeds the searcher's randomness).
        popsize: population size; default per searcher (:data:`DEFAULT_POPSIZE`).
        stdev: the initial search stdev (ES) or mutation stdev (GAs). 0.05 was
            the measured sweet spot on the example problems.
        overrides: keyword arguments passed on to the searcher's constructor
            (or to :func:`~evotorch_mqa_moe.ga.seed_genetic_algorithm` for ``ga``).
    Raises:
        ValueError: unknown ``name`` or a ``popsize`` below :func:`min_popsize`.
    """
    if name not in SEARCHERS:
        raise ValueError(f"unknown searcher {name!r}; known: {', '.join(SEARCHERS)}")
    popsize = DEFAULT_POPSIZE[name] if popsize is None else popsize
    if isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < min_popsize(name):
        raise ValueError(f"popsize for {name} must be an integer >= {min_popsize(name)}, "
                         f"got {popsize!r}")
    if not (isinstance(stdev, (int, float)) and stdev > 0):
        raise ValueError(f"stdev must be a positive number, got {stdev!r}")
    n = problem.solution_length
    kw: dict[str, Any]
    if name == "ga":
        searcher = seed_genetic_algorithm(problem, popsize=popsize,
                                          **{"stdev": stdev, **overrides})
    elif name == "ga-evotorch":
        operators = [SimulatedBinaryCrossOver(problem, tournament_size=4, eta=8),
                     EvoTorchGaussianMutation(problem, stdev=stdev, mutation_probability=0.1)]
        kw = {"elitist": True, "re_evaluate": True, **overrides}
        searcher = GeneticAlgorithm(problem, operators=operators, popsize=popsize, **kw)
    elif name == "steady-state-ga":
        kw = {"elitist": True, "re_evaluate": True, **overrides}
        searcher = SteadyStateGA(problem, popsize=popsize, **kw)
        searcher.use(UniformCrossOver(problem, tournament_size=4))
        searcher.use(GaussianMutation(problem, stdev=stdev, mutation_probability=0.1))
    elif name == "cosyne":
        kw = {"tournament_size": 4, "mutation_stdev": stdev, "mutation_probability": 0.1,
              "num_elites": 2, **overrides}
        searcher = Cosyne(problem, popsize=popsize, **kw)
    else:
        center = problem.init_center()
        if name == "pgpe":
            kw = {"center_learning_rate": 0.2, "stdev_learning_rate": 0.1, "optimizer": "clipup",
                  "optimizer_config": {"max_speed": 0.4}, "ranking_method": "centered"}
            cls = PGPE
        elif name == "snes":
            kw, cls = {}, SNES
        elif name == "xnes":
            if n > XNES_MAX and "force" not in overrides:
                raise ValueError(f"xnes keeps an N x N matrix: N={n} > {XNES_MAX}; "
                                 "use snes, pgpe or cmaes (separable)")
            kw, cls = {}, XNES
        elif name == "cem":
            kw, cls = {"parenthood_ratio": 0.25}, CEM
        else:
            kw, cls = {"separable": n > FULL_CMAES_MAX}, CMAES
        kw.update(overrides)
        kw.pop("force", None)
        searcher = cls(problem, popsize=popsize, stdev_init=stdev, center_init=center, **kw)
    problem.refresh_data_each_step(searcher)
    return searcher
