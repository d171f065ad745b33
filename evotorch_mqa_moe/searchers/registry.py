"""One registry of searchers, and the small protocol the runner sees them through.

Every searcher is one :class:`SearcherSpec` in :data:`SEARCHERS` (name,
description, builder, default and minimum population size, whether it needs
gradients, and a declarative search space for tuning); :func:`make_searcher`
builds any of them and returns an object implementing :class:`Searcher`:
``step()``, ``status``, ``current_solution()``, ``evaluations`` (cost in
forward-equivalents), ``state_dict()`` / ``load_state_dict()``. ``run``,
``compare``, checkpoints and the CLI use only this protocol and the registry,
never a searcher's name. A new searcher is one :func:`register` call.

The registry imports none of its members: each searcher module registers its own
specs when it is imported, and :mod:`evotorch_mqa_moe.searchers` imports them all,
in the order ``list`` shows them. Importing the registry alone therefore never makes
an import circle.

All searchers start from the model's own initialisation (a population of
freshly initialised networks, or a centre that is one), never from EvoTorch's
near-zero default, and every step of a searcher sees one fresh batch of data
shared by all its evaluations.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_float, check_int
from evotorch_mqa_moe.problem import TransformerProblem

SPACE_KINDS = ("log", "float", "int", "cat")


# ----------------------------------------------------------------------------- protocol
@runtime_checkable
class Searcher(Protocol):
    """What ``run``, ``compare`` and checkpoints see of a searcher.

    ``status`` holds at least ``"iter"`` (steps taken), ``"best_eval"`` (the best
    fitness seen so far over the whole run), ``"pop_best_eval"`` (the best of the
    last step) and ``"mean_eval"`` (the mean of the last step). ``evaluations``
    is the cost so far in forward-equivalents: one forward pass of one
    individual on one task batch counts 1, a backward pass 2 more (so one
    gradient step of one network costs 3).
    """

    problem: TransformerProblem

    def step(self) -> None: ...

    @property
    def status(self) -> Mapping[str, Any]: ...

    def current_solution(self) -> Tensor: ...

    @property
    def evaluations(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def supports_gradients(task: Any) -> bool:
    """Whether ``task`` offers a differentiable loss (``sample`` and ``loss``)."""
    return callable(getattr(task, "sample", None)) and callable(getattr(task, "loss", None))


def check_loss_fitness(name: str, task: Any) -> None:
    """Refuse a gradient searcher ``name`` on a task whose fitness is its sequence metric
    (``fitness="metric"``): the gradient of the loss would optimise another objective."""
    if getattr(task, "fitness_mode", "loss") != "loss":
        raise ValueError(f"{name} follows the gradient of the task's loss, but task "
                         f"{task.name!r} has fitness={task.fitness_mode!r} (a sequence metric "
                         "without a gradient); use a gradient-free searcher (pgpe, "
                         "lowrank-es, ga, ...) or reinforce, or fitness='loss'")


def _check_space(name: str, space: Mapping[str, tuple]) -> None:
    for key, entry in space.items():
        if not isinstance(entry, tuple) or not entry or entry[0] not in SPACE_KINDS:
            raise ValueError(f"search_space[{key!r}] of {name} must be a tuple starting with one "
                             f"of {SPACE_KINDS}, got {entry!r}")
        kind = entry[0]
        if kind == "cat":
            if len(entry) != 2 or not isinstance(entry[1], list | tuple) or not entry[1]:
                raise ValueError(f"search_space[{key!r}] of {name}: ('cat', [choices]), "
                                 f"got {entry!r}")
            continue
        if len(entry) not in (3, 4) or not all(isinstance(v, int | float) for v in entry[1:]):
            raise ValueError(f"search_space[{key!r}] of {name}: (kind, low, high[, step]), "
                             f"got {entry!r}")
        low, high = entry[1], entry[2]
        if not low < high or (kind == "log" and low <= 0):
            raise ValueError(f"search_space[{key!r}] of {name} needs low < high "
                             f"(and low > 0 for 'log'), got {entry!r}")


@dataclass(frozen=True)
class SearcherSpec:
    """One registered searcher.

    Attributes:
        name: the ``--searcher`` name.
        description: one line for ``evotorch-mqa-moe list``.
        build: ``build(problem, *, popsize, stdev, **options) -> Searcher``. The
            builder may ignore ``popsize`` and ``stdev`` (``adam`` trains one network).
        default_popsize: population size when none is given.
        min_popsize: the smallest population it accepts.
        default_stdev: the search / mutation stdev when none is given.
        needs_gradient: True for searchers that backpropagate the task's loss; they
            refuse tasks without ``sample`` + ``loss`` (cartpole) with one clear error.
        dense_population: True (default) when the searcher stores ``popsize`` full
            solution vectors (``run`` then refuses a population that cannot fit in
            memory); False for ``lowrank-es``, whose individuals are low-rank factors.
        search_space: declarative ranges for tuning, ``{option: entry}`` with entry
            ``("log", low, high)`` (log-uniform: multiplicative scales),
            ``("float", low, high)``, ``("int", low, high[, step])`` (inclusive) or
            ``("cat", [choices])``. Keys are ``popsize``, ``stdev`` or keyword
            options of ``build``.
        defaults: the values ``build`` uses for the ``search_space`` options that
            the caller does not give (``popsize`` and ``stdev`` come from
            ``default_popsize`` / ``default_stdev``). When every key of the space has
            a default, ``tune`` runs the defaults as a fresh study's first trial: the
            baseline the tuned setting must beat.
    """

    name: str
    description: str
    build: Callable[..., Searcher]
    default_popsize: int
    min_popsize: int = 1
    needs_gradient: bool = False
    search_space: Mapping[str, tuple] = field(default_factory=dict)
    default_stdev: float = 0.05
    dense_population: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise ValueError(f"searcher name must be a non-empty string, got {self.name!r}")
        if not callable(self.build):
            raise TypeError(f"build of {self.name} must be callable, got {self.build!r}")
        for label in ("min_popsize", "default_popsize"):
            check_int(f"{label} of {self.name}", getattr(self, label))
        if self.default_popsize < self.min_popsize:
            raise ValueError(f"default_popsize {self.default_popsize} of {self.name} is below "
                             f"its min_popsize {self.min_popsize}")
        check_float(f"default_stdev of {self.name}", self.default_stdev)
        _check_space(self.name, self.search_space)
        object.__setattr__(self, "search_space", MappingProxyType(dict(self.search_space)))


_REGISTRY: dict[str, SearcherSpec] = {}
SEARCHERS: Mapping[str, SearcherSpec] = MappingProxyType(_REGISTRY)
"""The registry ``{name: SearcherSpec}``, read-only; :func:`register` adds to it."""


def register(spec: SearcherSpec, *, replace: bool = False) -> SearcherSpec:
    """Add ``spec`` to :data:`SEARCHERS`; ``replace=True`` to redefine an existing name."""
    if not isinstance(spec, SearcherSpec):
        raise TypeError(f"register takes a SearcherSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"searcher {spec.name!r} is already registered; "
                         "pass replace=True to redefine it")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> SearcherSpec:
    """The spec of searcher ``name``; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown searcher {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def min_popsize(name: str) -> int:
    """The smallest population searcher ``name`` accepts."""
    return get_spec(name).min_popsize


MAX_STDEV = 1e3
"""The largest search / mutation stdev accepted (weights drawn at 1e300 are inf in float32)."""


def _check_options(spec: SearcherSpec, options: Mapping[str, Any]) -> None:
    """ValueError naming an option of ``spec`` that is NaN/inf, or not a number where the
    searcher's search space or defaults hold a number."""
    for key, value in options.items():
        entry = spec.search_space.get(key)
        default = spec.defaults.get(key)
        numeric = (entry is not None and entry[0] in ("log", "float", "int")) or (
            isinstance(default, int | float) and not isinstance(default, bool))
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if is_number and not math.isfinite(value):
            raise ValueError(f"searcher option {key} of {spec.name} must be finite, "
                             f"got {value!r}")
        if numeric and not is_number:
            raise ValueError(f"searcher option {key} of {spec.name} must be a number, "
                             f"got {value!r}")


def make_searcher(name: str, problem: TransformerProblem, *, popsize: int | None = None,
                  stdev: float | None = None, init: Any = None, **options: Any) -> Searcher:
    """Build searcher ``name`` over ``problem``.

    Args:
        name: a name in :data:`SEARCHERS`.
        problem: the problem (its generator seeds the searcher's randomness).
        popsize: population size; default the spec's ``default_popsize``.
        stdev: the initial search stdev (ES) or mutation stdev (GAs); default the
            spec's ``default_stdev`` (0.05, the measured sweet spot of the evolutionary
            searchers on the example problems; 0.01 for the hybrids).
        init: start from these weights (one solution, e.g. a trained model's flat
            vector) instead of fresh networks: the ES centre and ``adam``'s network
            are exactly ``init``, populations (GAs, hybrids) are ``init`` and
            ``init + stdev * N(0, 1)`` around it
            (:meth:`~evotorch_mqa_moe.problem.TransformerProblem.set_initial_solution`).
        options: keyword options of the searcher's builder (for EvoTorch
            searchers: passed on to its constructor, or to
            :func:`~evotorch_mqa_moe.ga.seed_genetic_algorithm` for ``ga``).
    Returns:
        An object implementing :class:`Searcher`.
    Raises:
        ValueError: unknown ``name``, ``popsize`` below the spec's ``min_popsize``,
            a ``stdev`` outside ``(0, MAX_STDEV]``, a NaN/inf option or a non-number
            where the searcher takes a number, or a gradient searcher on a task without a loss
            or with ``fitness="metric"``.
    """
    spec = get_spec(name)
    popsize = spec.default_popsize if popsize is None else popsize
    stdev = spec.default_stdev if stdev is None else stdev
    popsize = check_int(f"popsize for {name}", popsize, spec.min_popsize)
    stdev = check_float("stdev", stdev, 0.0, MAX_STDEV)
    _check_options(spec, options)
    if spec.needs_gradient and not supports_gradients(problem.task):
        raise ValueError(f"{name} needs a supervised task (sample + loss) for its gradients; "
                         f"{problem.task.name!r} is not one")
    if spec.needs_gradient:
        check_loss_fitness(name, problem.task)
    if init is not None:
        problem.set_initial_solution(init, stdev)
    return spec.build(problem, popsize=popsize, stdev=stdev, **options)
