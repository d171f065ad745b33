"""EvoTorch operator classes over the kernels in :mod:`evotorch_mqa_moe.functional`.

* :class:`UniformCrossOver` - a :class:`evotorch.operators.CrossOver`: picks parent
  pairs (tournament, like EvoTorch's own cross-overs, or truncation, like the
  seed GA) and recombines them gene by gene, or group by group (whole rows,
  heads, experts, tensors or layers of a :class:`~evotorch_mqa_moe.problem.TransformerProblem`).
* :class:`GaussianMutation` - a :class:`evotorch.operators.CopyingOperator`: adds
  Gaussian noise to each gene with a probability, then clips to the problem's
  bounds if it has any.

Both draw every random number from ``problem.generator``, so ``Problem(seed=...)``
makes a run repeat exactly.
"""

from __future__ import annotations

import math

import torch
from evotorch import Problem, SolutionBatch
from evotorch.operators import CopyingOperator, CrossOver

from evotorch_mqa_moe._internal.evotorch_compat import num_tournaments, wrap_batch
from evotorch_mqa_moe._internal.validate import check_int
from evotorch_mqa_moe.model import GENE_GROUP_LEVELS

from .crossover import (
    _cross_over_population,
    _GeneGroups,
    _prepare_groups,
    _uniform_cross_over_stacked,
)
from .mutation import _check_stdev, _mutate
from .sampling import _check_probability
from .selection import tournament_pairs, truncation_pairs

__all__ = ["GaussianMutation", "UniformCrossOver"]


class UniformCrossOver(CrossOver):
    """Uniform cross-over (per gene or per gene group) with tournament or truncation selection.

    Each child gene comes from one parent or the other (``swap_probability`` of
    taking it from the second parent); each pair yields two complementary children.
    Genes are copied, never combined arithmetically, so children stay inside any
    box the parents are in (no clipping needed).

    ``granularity`` (default ``"parameter"``: each gene on its own) makes the
    choice once per gene group instead, so that units which only work together
    move together: ``"row"`` (a neuron's incoming weights and bias), ``"head"``,
    ``"expert"``, ``"tensor"`` or ``"layer"``. Groups come from
    ``problem.gene_groups(granularity)`` (a
    :class:`~evotorch_mqa_moe.problem.TransformerProblem`; see
    :mod:`evotorch_mqa_moe.genes`), compiled once when the operator is built.

    Parent selection, exactly one of:

    * ``tournament_size=k``: each parent wins a tournament of ``k`` uniform draws
      (EvoTorch's usual scheme);
    * ``truncation_fraction=f``: parents are drawn from the best ``f`` of the batch,
      two different ones per pair (the seed GA; ``f=0.5`` is "top half").

    NaN fitness always counts as the worst. Selection uses objective ``obj_index``
    (default: the only objective); a multi-objective problem with
    ``obj_index=None`` falls back to EvoTorch's Pareto tournament.

    How many children: as in EvoTorch's ``CrossOver`` (``num_children`` or
    ``cross_over_rate``; by default as many as the batch), except that an odd
    ``num_children`` is allowed (the last pair's second child is dropped), so a GA
    can keep ``e`` elites and fill ``popsize - e`` places with children.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        tournament_size: int | None = None,
        truncation_fraction: float | None = None,
        swap_probability: float = 0.5,
        obj_index: int | None = None,
        num_children: int | None = None,
        cross_over_rate: float | None = None,
        granularity: str = "parameter",
    ):
        if not isinstance(granularity, str) or granularity not in GENE_GROUP_LEVELS:
            raise ValueError(
                f"unknown `granularity` {granularity!r}; choose from {GENE_GROUP_LEVELS}"
            )
        if granularity != "parameter" and not callable(getattr(problem, "gene_groups", None)):
            raise ValueError(
                f"`granularity={granularity!r}` needs a problem with gene_groups(level) "
                f"(e.g. TransformerProblem); {type(problem).__name__} has none"
            )
        if (tournament_size is None) == (truncation_fraction is None):
            raise ValueError(
                "Give exactly one of `tournament_size` and `truncation_fraction`, got "
                f"tournament_size={tournament_size!r}, truncation_fraction={truncation_fraction!r}"
            )
        tournament_size = check_int("tournament_size", tournament_size, none_ok=True,
                                    integral_float=True)
        if truncation_fraction is not None:
            truncation_fraction = _check_probability("truncation_fraction", truncation_fraction)
            if truncation_fraction == 0.0:
                raise ValueError("`truncation_fraction` must be > 0, got 0.0")
        num_children = check_int("num_children", num_children, none_ok=True,
                                 integral_float=True)
        super().__init__(
            problem,
            tournament_size=1 if tournament_size is None else int(tournament_size),
            obj_index=obj_index,
            num_children=None if num_children is None else int(num_children),
            cross_over_rate=cross_over_rate,
        )
        self._truncation_fraction = truncation_fraction
        self._swap_probability = _check_probability("swap_probability", swap_probability)
        self._granularity = granularity
        self._groups: _GeneGroups | None = None
        if granularity != "parameter":
            self._groups = _prepare_groups(
                problem.gene_groups(granularity), problem.solution_length, problem.device
            )
        self.last_parent_indices: tuple[torch.Tensor, torch.Tensor] | None = None
        """``(idx1, idx2)``, each ``(num_pairs,)``: the parents of the last call
        (child ``i`` and child ``num_pairs + i`` come from pair ``i``); ``None`` after a
        Pareto-tournament call."""

    @property
    def swap_probability(self) -> float:
        return self._swap_probability

    @property
    def truncation_fraction(self) -> float | None:
        return self._truncation_fraction

    @property
    def granularity(self) -> str:
        """The gene-group level the cross-over swaps (``"parameter"``: single genes)."""
        return self._granularity

    def _num_children_for(self, batch: SolutionBatch) -> int:
        if self._num_children is not None:
            return self._num_children
        return num_tournaments(self, batch)

    @torch.no_grad()
    def _do(self, batch: SolutionBatch) -> SolutionBatch:
        num_children = self._num_children_for(batch)
        if self._obj_index is None and self.problem.is_multi_objective:
            if num_children % 2:
                raise ValueError(
                    f"`num_children` must be even for Pareto tournaments, got {num_children}"
                )
            parents1, parents2 = self._do_tournament(batch)
            self.last_parent_indices = None
            return self._do_cross_over(parents1, parents2, num_children=num_children)
        return self._make_children_batch(self.make_children(batch, num_children))

    @torch.no_grad()
    def make_children(
        self, batch: SolutionBatch, num_children: int, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Select pairs from an evaluated ``batch`` and cross them over (single objective).

        Returns ``(num_children, N)`` values: rows ``[children1; children2]`` of
        ``ceil(num_children / 2)`` pairs, the last one dropped if ``num_children`` is
        odd. ``out``, if given, is a contiguous ``(2 * ceil(num_children / 2), N)``
        tensor to write into (the result is a view of it). Sets ``last_parent_indices``.
        """
        num_pairs = math.ceil(num_children / 2)
        values = batch.values.as_subclass(torch.Tensor)
        obj = 0 if self._obj_index is None else self._obj_index
        fitness = batch.evals[:, obj].as_subclass(torch.Tensor)
        maximize = self.problem.senses[obj] == "max"
        gen = self.problem.generator
        if self._truncation_fraction is not None:
            idx1, idx2 = truncation_pairs(
                fitness,
                num_pairs,
                fraction=self._truncation_fraction,
                maximize=maximize,
                generator=gen,
            )
        else:
            idx1, idx2 = tournament_pairs(
                fitness,
                num_pairs,
                tournament_size=self._tournament_size,
                maximize=maximize,
                generator=gen,
            )
        idx1, idx2 = idx1.to(values.device), idx2.to(values.device)
        self.last_parent_indices = (idx1, idx2)
        # Gathers parent rows chunk by chunk inside the kernel (no full-size copies).
        children = _cross_over_population(
            values,
            idx1,
            idx2,
            swap_probability=self._swap_probability,
            generator=gen,
            out=out,
            groups=self._groups,
        )
        return children[:num_children]

    @torch.no_grad()
    def _do_cross_over(
        self, parents1: torch.Tensor, parents2: torch.Tensor, *, num_children: int | None = None
    ) -> SolutionBatch:
        """``(M, N)`` parents -> a batch of ``num_children <= 2M`` children
        ``[children1; children2][:num_children]``."""
        children = _uniform_cross_over_stacked(
            parents1,
            parents2,
            swap_probability=self._swap_probability,
            generator=self.problem.generator,
            groups=self._groups,
        ).view(-1, parents1.shape[-1])
        if num_children is not None and num_children < children.shape[0]:
            children = children[:num_children]
        return self._make_children_batch(children)


class GaussianMutation(CopyingOperator):
    """Add ``N(0, stdev**2)`` noise to each gene independently with probability ``p``.

    Returns a new batch (the input is untouched) whose evaluations are reset.
    Results are clipped to the problem's bounds when it has any.

    Args:
        problem: the problem; its ``generator`` supplies the randomness.
        stdev: ``>= 0``; a number, or a tensor broadcastable to ``(P, N)``: ``(N,)``
            gives each gene its own scale (see :func:`evotorch_mqa_moe.adaptive.per_tensor_stdev`),
            ``(P, 1)`` each individual (the batch size must then match).
        mutation_probability: ``p`` in ``[0, 1]``; ``None`` mutates every gene.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        stdev: float | torch.Tensor,
        mutation_probability: float | None = None,
    ):
        super().__init__(problem)
        stdev = _check_stdev(stdev)
        if isinstance(stdev, torch.Tensor):
            length = problem.solution_length
            if stdev.ndim >= 1 and length is not None and stdev.shape[-1] not in (1, length):
                raise ValueError(
                    f"`stdev` of shape {tuple(stdev.shape)} does not match the solution "
                    f"length {length}"
                )
            stdev = stdev.detach().to(device=problem.device, dtype=problem.dtype)
        self._stdev = stdev
        self._mutation_probability = (
            1.0
            if mutation_probability is None
            else _check_probability("mutation_probability", mutation_probability)
        )

    @property
    def stdev(self) -> float | torch.Tensor:
        return self._stdev

    @property
    def mutation_probability(self) -> float:
        return self._mutation_probability

    @torch.no_grad()
    def mutate_values(
        self, values: torch.Tensor, *, scale: torch.Tensor | None = None, inplace: bool = False
    ) -> torch.Tensor:
        """Mutate ``(P, N)`` values, clipped to the problem's bounds.

        ``scale`` (``>= 0``, broadcastable to ``(P, N)``, e.g. ``(P, 1)``) multiplies
        ``stdev``; self-adaptive schemes use it for per-individual step sizes.
        ``inplace=True`` adds the noise into ``values`` (must be contiguous) instead
        of a copy; the result is ``values`` unless bounds clipping makes a new tensor.
        """
        if inplace and not values.is_contiguous():
            raise ValueError("`values` must be contiguous for in-place mutation")
        factors = (self._stdev,)
        if scale is not None:
            scale = _check_stdev(scale, shape=values.shape)
            if isinstance(scale, torch.Tensor):
                scale = scale.to(device=values.device, dtype=values.dtype)
            factors = factors + (scale,)
        factors = tuple(f.to(values.device) if isinstance(f, torch.Tensor) else f for f in factors)
        for f in factors:
            if isinstance(f, torch.Tensor):
                _check_stdev(f, shape=values.shape)
        out = _mutate(
            values, factors, self._mutation_probability, self.problem.generator, inplace=inplace
        )
        return self._respect_bounds(out)

    @torch.no_grad()
    def _do(self, batch: SolutionBatch) -> SolutionBatch:
        values = batch.values.as_subclass(torch.Tensor)
        return wrap_batch(self.problem, self.mutate_values(values))
