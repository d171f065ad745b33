"""EvoTorch's algorithms (and our GA, which runs on EvoTorch's GeneticAlgorithm) behind
the searcher protocol: the :class:`EvoTorchSearcher` adapter and their registry specs.

Which to use (see ``docs/searchers.md``): PGPE with ClipUp is the robust default
at any size; ``cmaes`` is full CMA-ES up to ``FULL_CMAES_MAX`` parameters (its
covariance is N x N) and separable above; ``xnes`` also keeps an N x N matrix,
so small models only; the GAs need large populations but no gradient estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
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
from torch import Tensor

from evotorch_mqa_moe._internal.evotorch_compat import evaluating_with
from evotorch_mqa_moe.evolution.ga import seed_genetic_algorithm
from evotorch_mqa_moe.evolution.operators import GaussianMutation, UniformCrossOver
from evotorch_mqa_moe.problem import TransformerProblem

from .registry import SearcherSpec, register
from .state import capture, restore

FULL_CMAES_MAX = 2000  # popsize x N x N memory; beyond this CMA-ES runs separable
XNES_MAX = 2000  # xNES keeps an N x N matrix too

# ----------------------------------------------------------------------------- adapter
class EvoTorchSearcher:
    """An EvoTorch ``SearchAlgorithm`` behind the :class:`Searcher` protocol.

    The wrapped algorithm stays reachable as :attr:`algorithm` (attach EvoTorch
    loggers to it), and attribute reads the adapter does not define are
    forwarded to it (``searcher.population``, ``searcher.separable``, ...).

    * ``status``: the algorithm's status plus ``"best_eval"`` = the highest
      ``pop_best_eval`` over all steps so far (kept here, so it exists on every
      device; EvoTorch keeps its own best only on the CPU).
    * ``evaluations``: ``problem.evaluations`` (one evaluation = one forward of
      one individual on one task batch).
    * ``current_solution()``: the distribution's centre when the algorithm has
      one, else the population's best.
    * ``state_dict()``: :func:`~evotorch_mqa_moe.state.capture` of the algorithm
      and its problem (tensors, numbers, strings: ``weights_only``-safe).

    Args:
        algorithm: an EvoTorch searcher over ``problem``. The data refresh
            (:meth:`TransformerProblem.refresh_data_each_step`) is the caller's
            choice; :func:`make_searcher`'s builders set it.
        popsize: the population size it was built with (recorded in results).
    """

    def __init__(self, algorithm: Any, *, popsize: int | None = None):
        self.algorithm = algorithm
        self.popsize = popsize
        self._best_eval = -math.inf

    @property
    def problem(self) -> TransformerProblem:
        return self.algorithm.problem

    def __getattr__(self, name: str) -> Any:
        # only called for names the adapter lacks; guard dunders (pickle, copy)
        # and the time before __init__ / __setstate__ set ``algorithm``
        algorithm = self.__dict__.get("algorithm")
        if algorithm is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(algorithm, name)

    def __repr__(self) -> str:
        return f"EvoTorchSearcher({type(self.algorithm).__name__}, popsize={self.popsize})"

    def step(self) -> None:
        """One generation of the wrapped algorithm."""
        self.algorithm.step()
        pop_best = float(self.algorithm.status["pop_best_eval"])
        if not self._best_eval >= pop_best:  # also replaces a NaN
            self._best_eval = pop_best

    @property
    def status(self) -> dict[str, Any]:
        status = dict(self.algorithm.status)
        status["best_eval"] = self._best_eval
        return status

    def current_solution(self) -> Tensor:
        """(N,) the centre of a distribution-based searcher, else the population's best."""
        status = self.algorithm.status
        if "center" in status:
            return torch.as_tensor(status["center"]).as_subclass(Tensor).detach()
        return status["pop_best"].values.as_subclass(Tensor).detach()

    @property
    def evaluations(self) -> int:
        return int(self.problem.evaluations)

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": capture(self.algorithm), "best_eval": self._best_eval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly from :meth:`state_dict` (of a searcher built the same way).

        EvoTorch creates some state lazily in the first step (the population, the
        problem's best/worst records), and :func:`~evotorch_mqa_moe.state.restore`
        writes into existing objects. A never-stepped algorithm therefore takes one
        step first, with the task's forward replaced by zero fitness (no forward
        pass is spent); everything it changed is then overwritten by the saved state.
        """
        if not isinstance(state, dict) or "algorithm" not in state:
            raise ValueError("not a state_dict of an EvoTorch searcher "
                             f"(keys: {sorted(state) if isinstance(state, dict) else state!r})")
        if self.algorithm.step_count == 0:
            self._dry_step()
        restore(self.algorithm, state["algorithm"])
        self._best_eval = float(state["best_eval"])

    def _dry_step(self) -> None:
        problem = self.algorithm.problem  # the one that evaluates (lowrank-ga: the genomes')

        def zero_fitness(batch: Any) -> None:
            batch.set_evals(torch.zeros(len(batch), dtype=problem.eval_dtype,
                                        device=batch.device))

        with evaluating_with(problem, zero_fitness):
            self.algorithm.step()


def _wrap(algorithm: Any, problem: TransformerProblem, popsize: int) -> EvoTorchSearcher:
    problem.refresh_data_each_step(algorithm)
    return EvoTorchSearcher(algorithm, popsize=popsize)


# ----------------------------------------------------------------------------- builders
# The GA as shipped before issue "GA learns", pinned here so that `ga-seed` keeps meaning
# the seed's algorithm whatever the defaults of `seed_genetic_algorithm` become.
GA_SEED_SETTINGS: dict[str, Any] = {
    "num_elites": 2, "parent_selection": "truncation", "truncation_fraction": 0.2,
    "swap_probability": 0.5, "mutation_probability": 0.1, "re_evaluate": False,
    "granularity": "parameter", "safe_mutation": False, "step_size": None,
}
# `ga`'s defaults: the seed's, except that the elites are scored again on each
# generation's batch. Every generation draws a fresh batch, so an elite that was never
# re-scored keeps the lucky score it won its place with and blocks its lineage's
# successors (the winner's curse); re-scoring 2 elites costs 4% of a generation of 50.
# Measured on the search suite (docs/searchers.md, "The GA: what it learns"); options
# such as granularity and safe_mutation stay one keyword away.
GA_SETTINGS: dict[str, Any] = {**GA_SEED_SETTINGS, "re_evaluate": "elites"}


def _ga_builder(settings: dict[str, Any]) -> Callable[..., EvoTorchSearcher]:
    """A builder of ``seed_genetic_algorithm`` with ``settings`` under the caller's options."""

    def build(problem: TransformerProblem, *, popsize: int, stdev: float,
              **options: Any) -> EvoTorchSearcher:
        algorithm = seed_genetic_algorithm(problem, popsize=popsize,
                                           **{**settings, "stdev": stdev, **options})
        return _wrap(algorithm, problem, popsize)

    return build


def _build_ga_evotorch(problem: TransformerProblem, *, popsize: int, stdev: float,
                       mutation_probability: float = 0.1, tournament_size: int = 4,
                       eta: float = 8, **options: Any) -> EvoTorchSearcher:
    operators = [SimulatedBinaryCrossOver(problem, tournament_size=tournament_size, eta=eta),
                 EvoTorchGaussianMutation(problem, stdev=stdev,
                                          mutation_probability=mutation_probability)]
    kw = {"elitist": True, "re_evaluate": True, **options}
    return _wrap(GeneticAlgorithm(problem, operators=operators, popsize=popsize, **kw),
                 problem, popsize)


def _build_steady_state_ga(problem: TransformerProblem, *, popsize: int, stdev: float,
                           mutation_probability: float = 0.1, tournament_size: int = 4,
                           **options: Any) -> EvoTorchSearcher:
    kw = {"elitist": True, "re_evaluate": True, **options}
    algorithm = SteadyStateGA(problem, popsize=popsize, **kw)
    algorithm.use(UniformCrossOver(problem, tournament_size=tournament_size))
    algorithm.use(GaussianMutation(problem, stdev=stdev,
                                   mutation_probability=mutation_probability))
    return _wrap(algorithm, problem, popsize)


def _build_cosyne(problem: TransformerProblem, *, popsize: int, stdev: float,
                  **options: Any) -> EvoTorchSearcher:
    kw = {"tournament_size": 4, "mutation_stdev": stdev, "mutation_probability": 0.1,
          "num_elites": 2, **options}
    return _wrap(Cosyne(problem, popsize=popsize, **kw), problem, popsize)


def _distribution_builder(cls: type, defaults: Callable[[TransformerProblem], dict[str, Any]]
                          ) -> Callable[..., EvoTorchSearcher]:
    """A builder for a distribution-based EvoTorch searcher started at the model's init."""

    def build(problem: TransformerProblem, *, popsize: int, stdev: float,
              **options: Any) -> EvoTorchSearcher:
        kw = {**defaults(problem), **options}
        algorithm = cls(problem, popsize=popsize, stdev_init=stdev,
                        center_init=problem.init_center(), **kw)
        return _wrap(algorithm, problem, popsize)

    build.__name__ = f"build_{cls.__name__.lower()}"
    return build


def _build_pgpe(problem: TransformerProblem, *, popsize: int, stdev: float,
                max_speed: float = 0.4, **options: Any) -> EvoTorchSearcher:
    kw = {"center_learning_rate": 0.2, "stdev_learning_rate": 0.1, "optimizer": "clipup",
          "optimizer_config": {"max_speed": max_speed}, "ranking_method": "centered",
          **options}
    algorithm = PGPE(problem, popsize=popsize, stdev_init=stdev,
                     center_init=problem.init_center(), **kw)
    return _wrap(algorithm, problem, popsize)


def _build_xnes(problem: TransformerProblem, *, popsize: int, stdev: float,
                force: bool = False, **options: Any) -> EvoTorchSearcher:
    n = problem.solution_length
    if n > XNES_MAX and not force:
        raise ValueError(f"xnes keeps an N x N matrix: N={n} > {XNES_MAX}; "
                         "use snes, pgpe or cmaes (separable), or pass force=True")
    return _distribution_builder(XNES, lambda p: {})(problem, popsize=popsize, stdev=stdev,
                                                     **options)


GA_SPACE = {"stdev": ("log", 0.005, 0.3), "mutation_probability": ("log", 0.005, 1.0),
            "truncation_fraction": ("float", 0.05, 0.5), "num_elites": ("int", 1, 10),
            "granularity": ("cat", ["parameter", "row", "head", "expert", "tensor"]),
            "re_evaluate": ("cat", [False, "elites"]),
            "step_size": ("cat", [None, "self_adaptive", "success"]),
            "swap_probability": ("float", 0.0, 0.5),
            "popsize": ("int", 50, 1000)}
_ES_SPACE = {"stdev": ("log", 0.005, 0.3), "popsize": ("int", 20, 1000)}

for _spec in (
    # popsize 50: four times the generations of the seed's 200 for a budget; on
    # reverse-16 it solved 10 seeds of 10 within 100k evaluations (100: 7 of 8; 200: 0 of 5)
    SearcherSpec("ga", "our GA: truncation selection, uniform cross-over, probabilistic "
                 "Gaussian mutation, re-scored elites", _ga_builder(GA_SETTINGS),
                 default_popsize=50, min_popsize=3, search_space=GA_SPACE,
                 defaults=GA_SETTINGS),
    SearcherSpec("ga-seed", "the seed's GA exactly as first shipped, pinned (`ga` may change)",
                 _ga_builder(GA_SEED_SETTINGS), default_popsize=200, min_popsize=3,
                 search_space=GA_SPACE, defaults=GA_SEED_SETTINGS),
    SearcherSpec("ga-evotorch", "EvoTorch's GeneticAlgorithm with its SBX cross-over and "
                 "Gaussian mutation", _build_ga_evotorch, default_popsize=300, min_popsize=3,
                 search_space={"stdev": ("log", 0.005, 0.3),
                               "mutation_probability": ("log", 0.005, 1.0),
                               "tournament_size": ("int", 2, 10),
                               "popsize": ("int", 50, 1000)}),
    SearcherSpec("steady-state-ga", "EvoTorch's SteadyStateGA with our operators",
                 _build_steady_state_ga, default_popsize=300, min_popsize=3,
                 search_space={"stdev": ("log", 0.005, 0.3),
                               "mutation_probability": ("log", 0.005, 1.0),
                               "tournament_size": ("int", 2, 10),
                               "popsize": ("int", 50, 1000)}),
    SearcherSpec("cosyne", "EvoTorch's CoSyNE (cooperative synapse neuroevolution)",
                 _build_cosyne, default_popsize=300, min_popsize=4,
                 search_space={"stdev": ("log", 0.005, 0.3),
                               "mutation_probability": ("log", 0.005, 1.0),
                               "num_elites": ("int", 0, 10), "popsize": ("int", 50, 1000)}),
    SearcherSpec("cmaes", f"CMA-ES (separable above {FULL_CMAES_MAX} parameters)",
                 _distribution_builder(
                     CMAES, lambda p: {"separable": p.solution_length > FULL_CMAES_MAX}),
                 default_popsize=100, min_popsize=4, search_space=_ES_SPACE),
    SearcherSpec("pgpe", "PGPE with the ClipUp optimiser", _build_pgpe, default_popsize=200,
                 min_popsize=4,
                 search_space={"stdev": ("log", 0.005, 0.3),
                               "center_learning_rate": ("log", 0.01, 1.0),
                               "stdev_learning_rate": ("log", 0.01, 0.5),
                               "max_speed": ("log", 0.02, 2.0),
                               "popsize": ("int", 20, 1000, 2)}),  # symmetric: even
    SearcherSpec("snes", "separable natural evolution strategy",
                 _distribution_builder(SNES, lambda p: {}), default_popsize=200, min_popsize=4,
                 search_space=_ES_SPACE),
    SearcherSpec("xnes", f"exponential natural evolution strategy (N <= {XNES_MAX})",
                 _build_xnes, default_popsize=100, min_popsize=4, search_space=_ES_SPACE),
    SearcherSpec("cem", "cross-entropy method",
                 _distribution_builder(CEM, lambda p: {"parenthood_ratio": 0.25}),
                 default_popsize=200, min_popsize=4,
                 search_space={**_ES_SPACE, "parenthood_ratio": ("float", 0.05, 0.5)}),
):
    register(_spec)
del _spec
