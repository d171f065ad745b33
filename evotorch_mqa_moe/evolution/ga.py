"""The seed's genetic algorithm as an EvoTorch ``GeneticAlgorithm``.

One generation (:class:`SeedGeneticAlgorithm`):

1. evaluate the population (every generation when ``re_evaluate``: fitness may be
   noisy, e.g. a fresh batch of examples per generation);
2. pick parent pairs: truncation (random pairs from the best fraction) or
   tournaments, NaN fitness always worst;
3. uniform cross-over -> children; Gaussian mutation of each gene with
   probability ``p`` (optionally adaptive step sizes, see :mod:`.adaptive`);
4. evaluate the children; the next population is the ``num_elites`` best parents
   plus all children (``num_elites=None``: the best ``popsize`` of parents and
   children together, EvoTorch's ``elitist=True``).

Build it with :func:`seed_genetic_algorithm`.
"""

from __future__ import annotations

import math

import torch
from evotorch import Problem, SolutionBatch
from evotorch.algorithms import GeneticAlgorithm

from evotorch_mqa_moe._internal.evotorch_compat import wrap_batch
from evotorch_mqa_moe._internal.validate import check_int

from .adaptive import SelfAdaptiveStepSize, SuccessRule
from .operators import GaussianMutation, UniformCrossOver
from .safe_mutation import SafeMutationScale
from .selection import best_first

__all__ = ["SeedGeneticAlgorithm", "seed_genetic_algorithm"]


def _fitness(batch: SolutionBatch, obj_index: int) -> torch.Tensor:
    return batch.evals[:, obj_index].as_subclass(torch.Tensor)


class SeedGeneticAlgorithm(GeneticAlgorithm):
    """Truncation/tournament + uniform cross-over + Gaussian mutation + elitism.

    A :class:`evotorch.algorithms.GeneticAlgorithm` whose step keeps each child
    attached to its parents (needed for self-adaptive step sizes and the success
    rule) and treats NaN fitness as the worst when choosing elites (EvoTorch's
    ``take_best`` ranks NaN first when maximising). Usually built with
    :func:`seed_genetic_algorithm`.

    Args:
        problem: a single-objective problem (or pass ``obj_index`` to the cross-over).
        popsize: population size ``P``.
        cross_over: makes ``P - num_elites`` children (``P`` if ``num_elites`` is None).
        mutation: applied to every child.
        num_elites: best parents copied unchanged into the next generation; ``None``
            keeps the best ``P`` of parents and children together.
        re_evaluate: ``True``: re-evaluate all parents every generation; ``"elites"``:
            re-evaluate only the ``num_elites`` survivors on the new generation's data
            (cheap, and an elite's lucky score on an old batch cannot keep it on top);
            ``False``: never (each individual keeps the score of its first batch).
        step_size: ``None``, a :class:`SelfAdaptiveStepSize` or a :class:`SuccessRule`.
        safe_mutation: ``None`` or a :class:`~evotorch_mqa_moe.safe_mutation.SafeMutationScale`:
            mutation stdevs are multiplied by its per-gene multipliers, measured on the
            parents and refreshed every ``safe_mutation.every`` generations. Its cost
            (forward-equivalents) is added to ``problem.evaluations``.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        popsize: int,
        cross_over: UniformCrossOver,
        mutation: GaussianMutation,
        num_elites: int | None = 2,
        re_evaluate: bool | str = True,
        step_size: SelfAdaptiveStepSize | SuccessRule | None = None,
        safe_mutation: SafeMutationScale | None = None,
    ):
        popsize = check_int("popsize", popsize, 2, integral_float=True)
        num_elites = check_int("num_elites", num_elites, 0, popsize - 1, none_ok=True,
                               integral_float=True)
        if re_evaluate not in (True, False, "elites"):
            raise ValueError(f"`re_evaluate` must be True, False or 'elites', got {re_evaluate!r}")
        if re_evaluate == "elites" and num_elites is None:
            raise ValueError("`re_evaluate='elites'` needs a number of elites, got num_elites=None")
        if safe_mutation is not None and not isinstance(safe_mutation, SafeMutationScale):
            raise TypeError(
                f"`safe_mutation` must be None or a SafeMutationScale, got {safe_mutation!r}"
            )
        if step_size is not None and not isinstance(step_size, SelfAdaptiveStepSize | SuccessRule):
            raise TypeError(
                "`step_size` must be None, a SelfAdaptiveStepSize or a SuccessRule, "
                f"got {step_size!r}"
            )
        obj = cross_over.obj_index
        if obj is None and problem.is_multi_objective:
            raise ValueError("SeedGeneticAlgorithm needs a single objective or an `obj_index`")
        super().__init__(
            problem,
            operators=[cross_over, mutation],
            popsize=int(popsize),
            elitist=num_elites is None,
            re_evaluate=re_evaluate is True,
        )
        self._re_evaluate_elites = re_evaluate == "elites"
        self._safe = safe_mutation
        self._generation = 0
        self._cross_over = cross_over
        self._mutation = mutation
        self._num_elites = num_elites
        self._step_size = step_size
        self._obj = 0 if obj is None else obj
        self._maximize = problem.senses[self._obj] == "max"
        self._needs_eval = True
        self._log_scales = (
            step_size.initial_log_scales(self._popsize, device=self._population.device)
            if isinstance(step_size, SelfAdaptiveStepSize)
            else None
        )

    @property
    def num_elites(self) -> int | None:
        return self._num_elites

    def replace_population(self, values: torch.Tensor) -> None:
        """Replace the population's values (same shape); all are scored again at the
        start of the next step, on that step's data."""
        shape = tuple(self._population.values.shape)
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != shape:
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"replace_population takes values of shape {shape}, got {got}")
        self._population.set_values(values)
        self._needs_eval = True

    @property
    def step_size(self) -> SelfAdaptiveStepSize | SuccessRule | None:
        return self._step_size

    @property
    def safe_mutation(self) -> SafeMutationScale | None:
        return self._safe

    @property
    def log_step_scales(self) -> torch.Tensor | None:
        """``(P,)`` log step-size multipliers of the population (self-adaptive only)."""
        return self._log_scales

    @torch.no_grad()
    def _step(self):
        problem = self.problem
        parents = self._population
        if not bool(torch.isfinite(parents.values.as_subclass(torch.Tensor)).all(dim=1).any()):
            raise ValueError(f"every one of the {len(parents)} individuals of the GA's "
                             "population holds NaN/inf values: nothing finite to select or "
                             "breed from")
        if self._re_evaluate or self._needs_eval:
            problem.evaluate(parents)
            self._needs_eval = False
        elif self._re_evaluate_elites and self._num_elites:
            # The elites are the first rows (see the buffer below): score them on this
            # generation's data, like the children they compete with.
            elites = _batch(problem, parents.values.as_subclass(torch.Tensor)[: self._num_elites])
            problem.evaluate(elites)
            parents.access_evals()[: self._num_elites] = elites.evals
        parent_fit = _fitness(parents, self._obj)
        parent_values = parents.values.as_subclass(torch.Tensor)
        num_parents, length = parent_values.shape
        num_children = self._cross_over._num_children_for(parents)
        num_elites = 0 if self._num_elites is None else self._num_elites

        # One buffer holds [elites; children]: it becomes the next population without
        # the extra full-population copy that SolutionBatch.cat would make.
        buffer = torch.empty(
            num_elites + 2 * math.ceil(num_children / 2),
            length,
            dtype=parent_values.dtype,
            device=parent_values.device,
        )
        elites = best_first(parent_fit, maximize=self._maximize)[:num_elites]
        buffer[:num_elites] = parent_values[elites]
        child_values = self._cross_over.make_children(
            parents, num_children, out=buffer[num_elites:]
        )
        idx1, idx2 = self._cross_over.last_parent_indices

        child_logs = None
        if isinstance(self._step_size, SelfAdaptiveStepSize):
            child_logs = self._step_size.child_log_scales(
                self._log_scales[idx1], self._log_scales[idx2], generator=problem.generator
            )[:num_children]
            scale = child_logs.exp().to(child_values.dtype).unsqueeze(-1)  # (C, 1)
        elif isinstance(self._step_size, SuccessRule):
            scale = torch.tensor(self._step_size.scale, dtype=child_values.dtype)
        else:
            scale = None
        if self._safe is not None:
            spent = self._safe.forward_equivalents
            safe = self._safe.scale(parent_values, self._generation).to(child_values.dtype)
            problem.evaluations += math.ceil(self._safe.forward_equivalents - spent)
            scale = safe if scale is None else scale * safe
        self._generation += 1
        # The children are fresh: mutate them in place (bounds clipping may copy).
        mutated = self._mutation.mutate_values(child_values, scale=scale, inplace=True)
        if mutated is not child_values:
            child_values.copy_(mutated)
        children = _batch(problem, child_values)
        problem.evaluate(children)
        child_fit = _fitness(children, self._obj)

        if isinstance(self._step_size, SuccessRule):
            pairs = torch.cat([torch.arange(len(idx1))] * 2)[:num_children].to(idx1.device)
            self._step_size.update(
                child_fit,
                parent_fit[idx1[pairs]],
                parent_fit[idx2[pairs]],
                maximize=self._maximize,
            )

        if self._num_elites is not None:
            self._population = _batch(
                problem,
                buffer[: num_elites + num_children],
                torch.cat([parents.access_evals()[elites], children.access_evals()]),
            )
            if child_logs is not None:
                self._log_scales = torch.cat([self._log_scales[elites], child_logs])
        else:  # plus-selection: the best popsize of parents and children, best first
            keep = best_first(torch.cat([parent_fit, child_fit]), maximize=self._maximize)
            keep = keep[: self._popsize]
            from_parents = keep < num_parents
            kp, kc = keep[from_parents], keep[~from_parents] - num_parents
            values = torch.cat([parent_values[kp], child_values[kc]])
            evdata = torch.cat([parents.access_evals()[kp], children.access_evals()[kc]])
            self._population = _batch(problem, values, evdata)
            if child_logs is not None:
                self._log_scales = torch.cat([self._log_scales[kp], child_logs[kc]])


def _batch(
    problem: Problem, values: torch.Tensor, evdata: torch.Tensor | None = None
) -> SolutionBatch:
    """A SolutionBatch over ``values`` ``(P, N)`` (no copy), with ``evdata`` if given."""
    return wrap_batch(problem, values, evdata)


def seed_genetic_algorithm(
    problem: Problem,
    *,
    popsize: int = 300,
    num_elites: int | None = 2,
    parent_selection: str = "truncation",
    truncation_fraction: float = 0.2,
    tournament_size: int = 4,
    swap_probability: float = 0.5,
    stdev: float | torch.Tensor = 0.05,
    mutation_probability: float | None = 0.1,
    step_size: str | SelfAdaptiveStepSize | SuccessRule | None = None,
    re_evaluate: bool | str = False,
    obj_index: int | None = None,
    granularity: str = "parameter",
    safe_mutation: bool | SafeMutationScale = False,
    safe_every: int = 10,
) -> SeedGeneticAlgorithm:
    """Build the seed's GA: truncation selection, uniform cross-over, mutation, elitism.

    Defaults are the measured starting point on a small MQA/MoE transformer
    (reverse-8 task, popsize 300: 97% exact in 30 s on one seed; without
    cross-over it stalled): the top 20% breed, 2 elites survive, uniform
    cross-over, each gene mutated with p=0.1 by N(0, 0.05**2). The seed itself
    described truncation to the top half (``truncation_fraction=0.5``). Mutation
    size matters most: 0.02 at p=0.1 was too weak, p=1 at 0.05 too strong.

    Args:
        problem: single-objective EvoTorch problem (or give ``obj_index``).
        popsize: population size.
        num_elites: best parents kept unchanged; ``None`` = keep the best
            ``popsize`` of parents and children (plus-selection).
        parent_selection: ``"truncation"`` or ``"tournament"``.
        truncation_fraction: share of the population that breeds (truncation).
        tournament_size: contestants per tournament (tournament).
        swap_probability: uniform cross-over's chance of taking the second parent's gene.
        stdev: mutation stdev: a number, or a ``(N,)`` tensor per gene (see
            :func:`evotorch_mqa_moe.adaptive.per_tensor_stdev`).
        mutation_probability: chance that a gene mutates; ``None`` = every gene.
        step_size: ``None`` (fixed), ``"self_adaptive"`` / a
            :class:`SelfAdaptiveStepSize`, or ``"success"`` / a :class:`SuccessRule`;
            adaptive multipliers scale ``stdev``.
        re_evaluate: ``"elites"``: score the ``num_elites`` survivors again on each
            generation's data (what the ``ga`` searcher uses). With a fresh batch per
            generation an elite that is never re-scored keeps the lucky score that
            made it an elite and crowds out the children that would improve on it:
            on ``reverse`` with 16 tokens / vocabulary 16 (popsize 100, 100k
            evaluations, seeds 0-4) re-scoring the 2 elites took the median exact
            accuracy from 0.006 to 0.994 for 2% more evaluations, and 10 elites that
            were never re-scored stalled at chance (docs/searchers.md). ``True``
            re-evaluates every parent, which doubles the evaluations per generation
            (on ``reverse``, popsize 200, 60k evaluations, seed 0: 93% exact without,
            0% with). ``False`` (the seed's, the default here): never.
        obj_index: objective to optimise on a multi-objective problem.
        granularity: what the cross-over swaps whole: ``"parameter"`` (single genes,
            the seed's), ``"row"``, ``"head"``, ``"expert"``, ``"tensor"`` or ``"layer"``
            (needs ``problem.gene_groups``, e.g. a ``TransformerProblem``).
        safe_mutation: ``True`` scales each gene's mutation by the inverse sensitivity
            of the network's outputs to it (a
            :class:`~evotorch_mqa_moe.safe_mutation.SafeMutationScale` with its
            defaults, refreshed every ``safe_every`` generations), or give a
            configured ``SafeMutationScale``; ``False``: plain mutation.
        safe_every: refresh interval for ``safe_mutation=True``.
    Returns:
        A :class:`SeedGeneticAlgorithm` (an ``evotorch.algorithms.GeneticAlgorithm``).
    """
    if parent_selection not in ("truncation", "tournament"):
        raise ValueError(
            f"`parent_selection` must be 'truncation' or 'tournament', got {parent_selection!r}"
        )
    if isinstance(step_size, str):
        if step_size == "self_adaptive":
            step_size = SelfAdaptiveStepSize()
        elif step_size == "success":
            step_size = SuccessRule()
        else:
            raise ValueError(
                f"`step_size` must be None, 'self_adaptive' or 'success', got {step_size!r}"
            )
    popsize = check_int("popsize", popsize, 2, integral_float=True)
    num_elites = check_int("num_elites", num_elites, 0, popsize - 1, none_ok=True,
                           integral_float=True)
    num_children = popsize if num_elites is None else popsize - int(num_elites)
    selection = (
        {"truncation_fraction": truncation_fraction}
        if parent_selection == "truncation"
        else {"tournament_size": tournament_size}
    )
    cross_over = UniformCrossOver(
        problem,
        swap_probability=swap_probability,
        obj_index=obj_index,
        num_children=num_children,
        granularity=granularity,
        **selection,
    )
    mutation = GaussianMutation(problem, stdev=stdev, mutation_probability=mutation_probability)
    if safe_mutation is True:
        safe_mutation = SafeMutationScale(problem, every=safe_every)
    elif safe_mutation is False or safe_mutation is None:
        safe_mutation = None
    return SeedGeneticAlgorithm(
        problem,
        popsize=int(popsize),
        cross_over=cross_over,
        mutation=mutation,
        num_elites=None if num_elites is None else int(num_elites),
        re_evaluate=re_evaluate,
        step_size=step_size,
        safe_mutation=safe_mutation,
    )
