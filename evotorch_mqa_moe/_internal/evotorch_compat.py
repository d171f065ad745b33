"""Every use of EvoTorch internals, in one place (tested with EvoTorch 0.6.1).

EvoTorch's public API does not cover everything this package needs: wrapping a
tensor as a ``SolutionBatch`` without copying it, the crossover's default number
of tournaments, the status cache a restored searcher must drop, the names of the
hook lists and Ray handles a checkpoint must leave out, whether a problem's Ray
actors are already running, and which ``MAPElites`` is building a population.
Each of those is one function or constant here; the rest of the package calls
these and never reads an EvoTorch attribute whose name starts with ``_``
(``tests/test_evotorch_compat.py`` scans the sources for that).

Our subclasses of EvoTorch classes also override or use protected members that
EvoTorch meant for subclasses; :data:`SUBCLASS_API` lists them per class, and the
tests check that the installed EvoTorch still defines each one, so an upgrade
that renames one fails there, loudly, instead of silently skipping an override.

``pyproject.toml`` bounds EvoTorch to ``>=0.6.1,<0.7`` (:data:`TESTED_VERSIONS`):
a new minor version must pass ``tests/test_evotorch_compat.py`` before the bound
moves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from evotorch import Problem, SolutionBatch

__all__ = [
    "TESTED_VERSIONS",
    "SUBCLASS_API",
    "STATUS_CACHES",
    "CALLBACK_ATTRIBUTES",
    "RAY_ATTRIBUTES",
    "NETWORK_ATTRIBUTES",
    "STATE_COUNTERS",
    "POPSIZE_FIELDS",
    "wrap_batch",
    "num_tournaments",
    "actors_started",
    "mapelites_building",
    "evaluating_with",
    "sync_logger_step",
    "quiet_evotorch_loggers",
    "clipup_velocity",
    "set_clipup_velocity",
]

TESTED_VERSIONS = ">=0.6.1,<0.7"
"""The EvoTorch versions this module is written for (as in ``pyproject.toml``)."""

SUBCLASS_API: dict[str, tuple[str, ...]] = {
    # SeedGeneticAlgorithm (ga.py): its own _step over the GA's population state
    "evotorch.algorithms.GeneticAlgorithm": ("_step", "_population", "_popsize",
                                             "_re_evaluate"),
    # UniformCrossOver (operators.py): CrossOver's tournament and batch helpers
    "evotorch.operators.CrossOver": ("_do", "_do_cross_over", "_do_tournament",
                                     "_make_children_batch", "_num_children", "_obj_index",
                                     "_tournament_size", "_compute_num_tournaments"),
    # GaussianMutation (operators.py)
    "evotorch.operators.CopyingOperator": ("_do", "_respect_bounds"),
    # TransformerProblem (problem.py): vectorised evaluation, network rebuilding, Ray
    "evotorch.neuroevolution.NEProblem": ("_evaluate_batch", "_instantiate_net", "_prepare",
                                          "_parallelize", "_make_sync_data_for_actors",
                                          "_use_sync_data_from_main", "_actors"),
    # lowrank-es checkpoints ClipUp's velocity (clipup_velocity / set_clipup_velocity)
    "evotorch.optimizers.ClipUp": ("_velocity",),
}
"""Protected members of EvoTorch classes that our subclasses override or use,
``{"module.Class": names}``. Instance attributes (``_population``, ...) are checked
on instances in the tests, methods on the classes."""

STATUS_CACHES = ("_LazyReporter__computed",)
"""``SearchAlgorithm`` status values computed lazily and cached (name-mangled in
``LazyReporter``): derived state that a restored searcher must drop."""

CALLBACK_ATTRIBUTES = (
    "_before_step_hook", "_after_step_hook", "_log_hook", "_end_of_run_hook",  # searchers
    "_before_eval_hook", "_after_eval_hook", "_remote_hook",  # problems
)
"""Where searchers and problems keep their hook lists (callables, not state)."""

RAY_ATTRIBUTES = ("_actors", "_actor_pool")
"""A problem's Ray actor handles (process-bound, never saved)."""

NETWORK_ATTRIBUTES = ("_original_network", "_network_args")
"""``NEProblem``'s network template and its arguments (rebuilt from the config)."""

POPSIZE_FIELDS = ("popsize", "_popsize")
"""Where a saved searcher state holds its population size (ours, EvoTorch's)."""

STATE_COUNTERS = frozenset({"evaluations", "_steps_count", "steps", "step", "_data_epoch",
                            "_eval_epoch", "data_epoch", "mu", "iter", "generation",
                            *POPSIZE_FIELDS})
"""Counters of a saved searcher state (ours and EvoTorch's): never negative."""


def wrap_batch(problem: Problem, values: torch.Tensor,
               evals: torch.Tensor | None = None) -> SolutionBatch:
    """A ``SolutionBatch`` whose decision values *are* ``values`` ``(P, N)`` (no copy).

    ``evals`` ``(P, E)`` become its evaluation storage as given (``E`` = objectives
    plus evaluation data); ``None``: not evaluated (NaN). EvoTorch's public
    constructors and ``set_values`` copy the values, which for a GA generation of
    200 x 100k floats is 80 MB per copy.
    """
    batch = SolutionBatch(problem, popsize=0, device=values.device, empty=True)
    width = batch.access_evals().shape[1]
    if evals is None:
        evals = torch.full((values.shape[0], width), float("nan"),
                           dtype=batch.access_evals().dtype, device=values.device)
    elif evals.shape != (values.shape[0], width):
        raise ValueError(f"evals must have shape {(values.shape[0], width)}, "
                         f"got {tuple(evals.shape)}")
    batch._data = values
    batch._evdata = evals
    return batch


def num_tournaments(cross_over: Any, batch: SolutionBatch) -> int:
    """How many tournaments (= children) EvoTorch's ``CrossOver`` runs on ``batch``
    when no ``num_children`` was given (``len(batch)`` rounded up to even, or
    ``cross_over_rate`` of it)."""
    return int(cross_over._compute_num_tournaments(batch))


@contextmanager
def evaluating_with(problem: Problem,
                    evaluate_batch: Callable[[SolutionBatch], None]) -> Iterator[None]:
    """Inside the block, ``problem``'s evaluations call ``evaluate_batch(batch)`` (which
    must ``batch.set_evals(...)``) instead of ``problem._evaluate_batch`` (EvoTorch's
    per-batch hook, which ``Problem.evaluate`` calls on the instance)."""
    problem._evaluate_batch = evaluate_batch  # an instance attribute shadows the method
    try:
        yield
    finally:
        del problem._evaluate_batch


def sync_logger_step(callback: Any, steps_done: int) -> None:
    """Set an EvoTorch ``Logger``'s step counter to ``steps_done`` before it is called
    for the next step (EvoTorch counts calls from 0, so a resumed run would log its
    generations from step 1 again, and ``interval`` would count from the resume);
    other callables are left alone."""
    from evotorch.logging import Logger

    if isinstance(callback, Logger):
        callback._steps_count = int(steps_done)


def actors_started(problem: Problem) -> bool:
    """Whether ``problem``'s Ray actors exist (EvoTorch starts them at the first
    evaluation of a problem with ``num_actors >= 2``)."""
    return problem._actors is not None


def mapelites_building(depth: int = 2) -> tuple[Any, int] | None:
    """``(searcher, descriptors)`` when the caller ``depth`` frames up is EvoTorch's
    ``MAPElites.__init__`` (which calls ``problem.generate_batch``), else ``None``;
    ``descriptors`` = the behaviour descriptors per solution its feature grid needs.

    ``depth`` counts frames above this function: 2 is the caller of the function that
    calls this (``MAPElites.__init__`` -> ``problem.generate_batch`` -> this).
    """
    from evotorch.algorithms import MAPElites

    caller = sys._getframe(depth).f_locals.get("self")
    if not isinstance(caller, MAPElites):
        return None
    return caller, int(caller._feature_grid.shape[1])


def quiet_evotorch_loggers() -> None:
    """Raise EvoTorch's standard-library loggers to WARNING: every ``Problem`` logs a
    few INFO lines (dtype, device, actors) when built, noise in a run's output. The
    loggers exist once ``evotorch`` is imported (this module imports it)."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("evotorch") and not name.startswith("evotorch_mqa_moe"):
            logging.getLogger(name).setLevel(logging.WARNING)


def clipup_velocity(optimizer: Any) -> torch.Tensor:
    """A copy of the velocity of EvoTorch's ``ClipUp`` (its whole mutable state)."""
    return optimizer._velocity.clone()


def set_clipup_velocity(optimizer: Any, velocity: torch.Tensor) -> None:
    """Restore what :func:`clipup_velocity` returned (same length, dtype and device)."""
    current = optimizer._velocity
    if velocity.shape != current.shape:
        raise ValueError(f"ClipUp velocity of shape {tuple(velocity.shape)} for an optimiser of "
                         f"shape {tuple(current.shape)}")
    optimizer._velocity = velocity.to(current.device, current.dtype).clone()
