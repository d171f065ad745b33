"""``lowrank-ga``: the GA at the seed's scale, its individuals stored compactly.

A dense GA keeps ``popsize`` full networks: 256 x 54M float32 parameters is 55 GB at
the seed preset. Here every individual is a **genome** of

* for each weight matrix ``W`` (``(R, C)``, see :func:`lowrank_layout`): rank-``r``
  factors ``A`` ``(R, r)`` and ``B`` ``(C, r)``; the individual's matrix is
  ``W + A @ B.T / sqrt(r)`` around a shared centre ``W`` that never changes
  (the problem's initial network, or ``--init``'s);
* for each vector (biases, LayerNorm weights): its values, as in the dense GA,

in flat layout order, ``G = r * sum(R + C) + n`` numbers (232,288 at the seed preset
with ``r = 1``, against N = 54M). The genomes are the population of our ordinary GA
(:func:`~evotorch_mqa_moe.evolution.ga.seed_genetic_algorithm`, with ``ga``'s
defaults): truncation selection, elites re-scored, and its operators acting on
genomes, so they keep their meaning as follows:

* **uniform cross-over** takes each *tensor* from one parent or the other
  (``granularity="tensor"``): a matrix's factor pair ``(A, B)`` travels whole, so the
  child's matrix is exactly one parent's ``W + A B^T / sqrt(r)``; the children equal
  the dense GA's with ``granularity="tensor"`` on the same parents and random numbers
  (``tests/test_lowrank_ga.py``). ``granularity="parameter"`` mixes single factor
  entries instead.
* **probabilistic Gaussian mutation** adds ``N(0, stdev^2)`` to each genome number
  with probability ``p``: to a vector's value exactly as in the dense GA, to a factor
  entry for a matrix (a rank-one change of that matrix).

Genomes are evaluated in one low-rank pass
(:class:`~evotorch_mqa_moe.model.LowRankPopulation`: no individual is materialised);
only :meth:`LowRankGenomeProblem.dense` (the best individual, for held-out metrics and
``best_model.pt``) builds an ``(N,)`` network. The initial genomes: factor entries
``N(0, sigma)`` each (so every matrix entry moves by about ``sigma``), vectors the
centre's plus ``N(0, sigma^2)``; the first genome is the centre itself.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from evotorch import Problem, SolutionBatch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_float, check_int
from evotorch_mqa_moe.evolution.ga import seed_genetic_algorithm
from evotorch_mqa_moe.evolution.selection import best_first
from evotorch_mqa_moe.model import (
    Block,
    LowRankPopulation,
    TransformerConfig,
    check_rank,
    lowrank_layout,
)
from evotorch_mqa_moe.problem import TransformerProblem, replace_nonfinite

from .evotorch_algorithms import GA_SETTINGS, EvoTorchSearcher
from .registry import SearcherSpec, register

__all__ = ["LowRankGenomeProblem", "LowRankGASearcher", "build_lowrank_ga"]


@functools.lru_cache(maxsize=16)
def _segments(config: TransformerConfig, rank: int) -> tuple[tuple[Block, int, int], ...]:
    # derived from the config (so never part of a checkpoint)
    segments, start = [], 0
    for block in lowrank_layout(config):
        size = rank * (block.rows + block.cols) if block.lowrank else block.size
        segments.append((block, start, start + size))
        start += size
    return tuple(segments)


class LowRankGenomeProblem(Problem):
    """The EvoTorch problem whose solutions are compact genomes of ``problem``'s model.

    Fitness is ``problem``'s task on ``problem``'s data stream (the batch of its current
    data epoch: one per generation), so a genome scores what its network would score
    in ``problem``. Evaluations are counted in :attr:`evaluations` (one per genome).

    Args:
        problem: the :class:`TransformerProblem` (task, model, device, dtype, data).
        rank: ``r``, in ``[1, min(R, C)]`` of every matrix.
        sigma: the initial genomes' spread (see the module docstring), > 0.
    """

    def __init__(self, problem: TransformerProblem, *, rank: int = 1, sigma: float = 0.05):
        self.outer = problem
        self.rank = check_rank(problem.config, rank)
        self.sigma = check_float("sigma", sigma)
        start = self.segments[-1][2]
        # the centre every matrix is perturbed around; float32 (compute-dtype copy below)
        self.shared = problem.init_center().as_subclass(Tensor).to(problem.device,
                                                                     torch.float32)
        self.evaluations = 0
        seed = torch.randint(0, 2**62, (), generator=problem.generator,
                             device=problem.generator.device)
        super().__init__("max", solution_length=start, dtype=torch.float32,
                         device=problem.device, seed=int(seed))

    @property
    def segments(self) -> tuple[tuple[Block, int, int], ...]:
        """``(block, first gene, end)`` of every parameter, in layout order."""
        return _segments(self.outer.config, self.rank)

    # ---------------------------------------------------------------- genomes
    def decode(self, genomes: Tensor) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
        """``(P, G)`` genomes -> ``({name: (A (P, R, r), B (P, C, r))}, vectors (P, n))``."""
        P, r = genomes.shape[0], self.rank
        factors, vectors = {}, []
        for block, start, stop in self.segments:
            if block.lowrank:
                split = start + block.rows * r
                factors[block.name] = (genomes[:, start:split].reshape(P, block.rows, r),
                                       genomes[:, split:stop].reshape(P, block.cols, r))
            else:
                vectors.append(genomes[:, start:stop])
        return factors, torch.cat(vectors, dim=1)

    def population(self, genomes: Tensor) -> LowRankPopulation:
        """The networks of ``(P, G)`` genomes, for one low-rank pass."""
        dtype = self.outer.compute_dtype
        factors, vectors = self.decode(genomes.to(dtype))
        return LowRankPopulation(self.outer.config, self.shared.to(dtype), factors, vectors,
                                 1.0 / math.sqrt(self.rank), output_dtype=torch.float32,
                                 chunk_size=self.outer.chunk_size,
                                 memory_budget=self.outer.memory_budget)

    def dense(self, genomes: Tensor) -> Tensor:
        """``(P, G)`` genomes -> ``(P, N)`` float32 flat networks (P x N numbers: for a few)."""
        factors, vectors = self.decode(genomes.to(torch.float32))
        return LowRankPopulation(self.outer.config, self.shared, factors, vectors,
                                 1.0 / math.sqrt(self.rank)).materialize()

    def recentre(self, genomes: Tensor, best: int) -> Tensor:
        """Fold genome ``best`` into the centre and return the population re-expressed
        around it: ``best`` with zero factors (the same network), every other genome
        with fresh factors (entries ``N(0, sigma)``) and its own vectors. Successive
        centres add up rank-``r`` steps, so the search is not confined to one rank-``r``
        neighbourhood of the initial network."""
        self.shared = self.dense(genomes[best: best + 1])[0]
        fresh = genomes.clone()
        noise = torch.randn(genomes.shape, generator=self.generator, device=genomes.device,
                            dtype=genomes.dtype)
        for block, start, stop in self.segments:
            if block.lowrank:
                fresh[:, start:stop] = math.sqrt(self.sigma) * noise[:, start:stop]
                fresh[best, start:stop] = 0.0
        return fresh

    def gene_groups(self, level: str) -> Tensor:
        """``(G,)`` ids for the cross-over: ``"tensor"`` (a matrix's factor pair, or a
        vector, is one group); the other levels of the dense problem have no meaning
        on factors."""
        if level != "tensor":
            raise ValueError(f"lowrank-ga's cross-over granularity must be 'parameter' or "
                             f"'tensor', got {level!r}")
        ids = torch.empty(self.solution_length, dtype=torch.int64)
        for k, (_, start, stop) in enumerate(self.segments):
            ids[start:stop] = k
        return ids.to(self.device)

    def _fill(self, values: Tensor) -> None:
        noise = torch.randn(values.shape, generator=self.generator, device=values.device,
                            dtype=values.dtype)
        for block, start, stop in self.segments:
            if block.lowrank:  # entries N(0, sigma): each matrix entry moves by ~sigma
                values[:, start:stop] = math.sqrt(self.sigma) * noise[:, start:stop]
            else:
                centre = self.shared[block.offset: block.offset + block.size]
                values[:, start:stop] = centre + self.sigma * noise[:, start:stop]
        values[0] = 0.0  # the first genome is the centre itself
        for block, start, stop in self.segments:
            if not block.lowrank:
                values[0, start:stop] = self.shared[block.offset: block.offset + block.size]

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, x: Any) -> None:
        if self.is_main:
            self.evaluations += len(x) if isinstance(x, SolutionBatch) else 1
        super().evaluate(x)

    def _evaluate_batch(self, batch: SolutionBatch) -> None:
        outer = self.outer
        with torch.no_grad():
            fitness = outer.task.fitness(self.population(batch.values.as_subclass(Tensor)),
                                         outer.data_generator(outer.data_epoch))
        fitness = torch.as_tensor(fitness).reshape(-1).to(batch.device, torch.float32)
        if fitness.shape[0] != len(batch):
            raise ValueError(f"task {outer.task.name!r} returned {fitness.shape[0]} fitness "
                             f"values for {len(batch)} genomes")
        fitness, _ = replace_nonfinite(fitness)
        batch.set_evals(fitness.to(self.eval_dtype))


class LowRankGASearcher(EvoTorchSearcher):
    """The GA over genomes; :meth:`current_solution` is the best ``(N,)`` network.

    Every ``recentre_every`` generations (``0``: never) the best genome is folded into the
    centre (:meth:`LowRankGenomeProblem.recentre`) at the start of the next step, which
    then scores the whole population again on its batch (``popsize`` more
    forward-equivalents).
    """

    def __init__(self, algorithm: Any, *, popsize: int, recentre_every: int = 0):
        super().__init__(algorithm, popsize=popsize)
        self.recentre_every = check_int("recentre_every", recentre_every, 0)

    @property
    def genomes(self) -> LowRankGenomeProblem:
        """The problem the GA runs on (its solutions are genomes)."""
        return self.algorithm.problem

    @property
    def problem(self) -> TransformerProblem:
        return self.genomes.outer

    @property
    def evaluations(self) -> int:
        return int(self.genomes.evaluations)

    def step(self) -> None:
        """Re-centre on the last generation's best when one is due, then one GA step.
        (Re-centring first keeps the population scored between steps, so checkpoints
        and ``current_solution`` always see real fitness values.)"""
        every, done = self.recentre_every, self.algorithm.step_count
        if every and done and done % every == 0:
            population = self.algorithm.population
            best = int(best_first(population.evals[:, 0].as_subclass(Tensor),
                                  maximize=True)[0])
            values = population.values.as_subclass(Tensor)
            self.algorithm.replace_population(self.genomes.recentre(values, best))
        super().step()

    def current_solution(self) -> Tensor:
        """(N,) the best genome's network."""
        best = self.algorithm.status["pop_best"].values.as_subclass(Tensor).detach()
        return self.genomes.dense(best[None])[0]


def build_lowrank_ga(problem: TransformerProblem, *, popsize: int, stdev: float,
                     rank: int = 1, sigma: float | None = None, recentre_every: int = 1,
                     **options: Any) -> LowRankGASearcher:
    """The registry's builder: ``ga``'s settings over genomes of rank ``rank``, cross-over
    at ``granularity="tensor"``; ``sigma`` (the initial spread) defaults to ``stdev``."""
    genomes = LowRankGenomeProblem(problem, rank=rank,
                                   sigma=stdev if sigma is None else sigma)
    algorithm = seed_genetic_algorithm(genomes, popsize=popsize, **{
        **GA_SETTINGS, "granularity": "tensor", "stdev": stdev, **options})
    algorithm.before_step_hook.append(problem.next_generation)  # one batch per generation
    return LowRankGASearcher(algorithm, popsize=popsize, recentre_every=recentre_every)


register(SearcherSpec(
    "lowrank-ga", "our GA on compact genomes: shared centre + rank-r factors per matrix "
    "(cross-over swaps whole tensors), for the seed's scale", build_lowrank_ga,
    default_popsize=50, min_popsize=2, default_stdev=0.05, dense_population=False,
    search_space={"stdev": ("log", 0.005, 0.5), "mutation_probability": ("float", 0.01, 1.0),
                  "popsize": ("int", 10, 400)}))
