"""A GA whose individuals learn: Lamarckian and Baldwinian evolution with population gradients.

One generation of :class:`LamarckGA` / :class:`BaldwinGA` (``P`` individuals):

1. parents: truncation selection (random pairs from the best ``truncation_fraction``);
   ``num_elites`` best genomes survive unchanged; the other ``P - num_elites`` are
   children of uniform cross-over and Gaussian mutation (:mod:`.functional`);
2. learning: every individual takes ``k`` gradient steps (:class:`PopulationAdam` or
   :class:`PopulationSGD`, all ``P`` at once, each step on a fresh batch of the
   problem's data stream shared by the population);
3. fitness: ``task.fitness`` of the trained weights on one more fresh batch.

**Lamarck** writes the trained weights back into the genome (acquired traits are
inherited) and children start with the optimiser state of their first parent;
**Baldwin** keeps the genome as it was born and only the fitness reflects learning
(Hinton and Nowlan 1987: learning guides evolution without inheritance), so every
lifetime learns from scratch with a fresh optimiser. The answer of either is the
trained network of the fittest individual.

Cost per generation: ``P * (3k + 1)`` forward-equivalents.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_float, check_int
from evotorch_mqa_moe.evolution.crossover import uniform_cross_over
from evotorch_mqa_moe.evolution.mutation import gaussian_mutation_
from evotorch_mqa_moe.evolution.selection import best_first, truncation_pairs

from .hybrid import HybridSearcher, check_fraction, check_positive
from .population_optim import make_optimizer
from .registry import SearcherSpec, register

__all__ = ["LamarckGA", "BaldwinGA", "build_lamarck", "build_baldwin"]


class _LearningGA(HybridSearcher):
    """The shared GA; :attr:`lamarckian` decides whether learning is written back."""

    name = "learning-ga"
    lamarckian = True
    _state_keys = ("genomes", "phenotypes", "_fitness", "optimizer")

    def __init__(self, problem: Any, *, popsize: int, stdev: float, k: int, lr: float,
                 optimizer: str, momentum: float, batch_size: int | None,
                 truncation_fraction: float, num_elites: int,
                 mutation_probability: float | None):
        check_int("popsize", popsize, 2)
        super().__init__(problem, popsize, batch_size)
        self.stdev = check_positive("stdev", stdev)
        self.k = check_int("k", k, 1)
        self.lr = check_positive("lr", lr)
        self.truncation_fraction = check_fraction("truncation_fraction", truncation_fraction)
        self.num_elites = check_int("num_elites", num_elites, 0)
        if self.num_elites >= popsize:
            raise ValueError(f"num_elites must be < popsize={popsize}, got {num_elites!r}")
        self.mutation_probability = check_float("mutation_probability", mutation_probability,
                                                0.0, 1.0, none_ok=True)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.optimizer = make_optimizer(optimizer, popsize, lr=self.lr, momentum=momentum,
                                        device=problem.device)
        self.genomes: Tensor | None = None  # (P, N) what is inherited
        self.phenotypes: Tensor | None = None  # (P, N) the trained networks

    def _learn(self, genomes: Tensor) -> None:
        """Train copies of ``genomes`` k steps, evaluate them, write back if Lamarckian."""
        trained = genomes.clone()
        self._train(trained, self.optimizer, self.k)
        self._fitness = self._evaluate(trained)
        self.phenotypes = trained
        self.genomes = trained if self.lamarckian else genomes

    @torch.no_grad()
    def _step(self) -> None:
        gen = self.problem.generator
        if self.genomes is None:
            self._learn(self.problem.init_population(self.popsize))
            return
        P, E = self.popsize, self.num_elites
        elites = best_first(self._fitness, maximize=True)[:E]
        num_children = P - E
        idx1, idx2 = truncation_pairs(self._fitness, math.ceil(num_children / 2),
                                      fraction=self.truncation_fraction, maximize=True,
                                      generator=gen)
        child1, child2 = uniform_cross_over(self.genomes[idx1], self.genomes[idx2],
                                            generator=gen)
        children = torch.cat([child1, child2])[:num_children]
        gaussian_mutation_(children, stdev=self.stdev,
                           mutation_probability=self.mutation_probability, generator=gen)
        # optimiser state: elites keep theirs; a Lamarckian child continues its first
        # parent's, a Baldwinian lifetime starts afresh
        if self.lamarckian:
            first_parent = torch.cat([idx1, idx2])[:num_children]
            self.optimizer.take(torch.cat([elites, first_parent]))
        else:
            self.optimizer.reset()
        self._learn(torch.cat([self.genomes[elites], children]))

    def _solution_values(self) -> Tensor:
        return self.phenotypes


class LamarckGA(_LearningGA):
    """GA + k gradient steps per individual per generation; the trained weights are the genome.

    Build with :func:`build_lamarck`. Attributes: ``genomes`` (P, N) (= ``phenotypes``,
    the trained networks), ``optimizer`` (per-individual state, inherited from the
    first parent), ``status`` / ``evaluations`` / ``state_dict`` (searcher protocol).
    """

    name = "lamarck"
    lamarckian = True


class BaldwinGA(_LearningGA):
    """GA + k gradient steps per lifetime; fitness after learning, genome left untrained.

    Build with :func:`build_baldwin`. ``genomes`` (P, N) are the inherited weights,
    ``phenotypes`` (P, N) the networks they learnt to be this generation (the answer
    is the fittest phenotype).
    """

    name = "baldwin"
    lamarckian = False


# Measured (docs/searchers.md, "Hybrid searchers"): on sort and reverse-16 at 6k
# forward-equivalents, lr 1e-2 beat 3e-3 by far, k 5-10 beat 1, popsize 8 beat 16 and 32,
# and the mutation stdev hardly mattered (0.002-0.05; smaller slightly better).
_DEFAULTS: dict[str, Any] = dict(k=5, lr=1e-2, optimizer="adam", momentum=0.9, batch_size=None,
                                 truncation_fraction=0.5, num_elites=2,
                                 mutation_probability=0.1)


def build_lamarck(problem: Any, *, popsize: int = 8, stdev: float = 0.01,
                  **options: Any) -> LamarckGA:
    """A :class:`LamarckGA` over ``problem`` (defaults chosen by measurement, docs/searchers.md).

    Options: ``k`` gradient steps per generation, ``lr``, ``optimizer`` (``"adam"`` or
    ``"sgd"``), ``momentum`` (Adam's beta1 / SGD momentum), ``batch_size`` (examples per
    gradient step; default the task's), ``truncation_fraction`` (share that breeds, in
    (0, 1)), ``num_elites``, ``mutation_probability`` (per gene; ``None`` = all);
    ``stdev`` is the mutation's. Raises ValueError naming a bad value.
    """
    return LamarckGA(problem, popsize=popsize, stdev=stdev, **{**_DEFAULTS, **options})


def build_baldwin(problem: Any, *, popsize: int = 8, stdev: float = 0.01,
                  **options: Any) -> BaldwinGA:
    """A :class:`BaldwinGA` over ``problem``; options as :func:`build_lamarck`."""
    return BaldwinGA(problem, popsize=popsize, stdev=stdev, **{**_DEFAULTS, **options})

# Declarative tuning ranges (keys are builder options, popsize and stdev).
LEARNING_GA_SPACE: dict[str, tuple] = {
    "popsize": ("int", 8, 128),
    "stdev": ("log", 1e-3, 0.1),
    "k": ("int", 1, 10),
    "lr": ("log", 1e-4, 1e-1),
    "mutation_probability": ("log", 0.01, 1.0),
    "truncation_fraction": ("float", 0.1, 0.6),
}

# popsize 8: measured in docs/searchers.md, "Hybrid searchers"
register(SearcherSpec("lamarck", "GA whose children take k gradient steps and keep the "
                      "trained weights", build_lamarck, default_popsize=8, min_popsize=3,
                      needs_gradient=True, search_space=LEARNING_GA_SPACE, default_stdev=0.01))
register(SearcherSpec("baldwin", "GA whose children are scored after k gradient steps; "
                      "genomes untrained", build_baldwin, default_popsize=8, min_popsize=3,
                      needs_gradient=True, search_space=LEARNING_GA_SPACE, default_stdev=0.01))
