"""Safe mutation: per-gene mutation scales from the output sensitivity, refreshed on a
schedule (:class:`SafeMutationScale`)."""

from __future__ import annotations

from typing import Any

import torch
from loguru import logger
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_bool, check_int

from .sensitivity import (
    _check_floor,
    _check_method,
    _check_normalize,
    output_sensitivity,
    sensitivity_inputs,
    sensitivity_to_scale,
)

# ----------------------------------------------------------------------------
# The refreshing scale
# ----------------------------------------------------------------------------


class SafeMutationScale:
    """Safe-mutation stdev multipliers for a problem, refreshed every ``every`` generations.

    Each refresh draws a batch of the task's inputs (:func:`sensitivity_inputs`),
    measures :func:`output_sensitivity` and turns it into multipliers with
    :func:`sensitivity_to_scale` (root mean square 1 over the genes). In between,
    :meth:`scale` returns the cached multipliers, so the cost of a refresh is
    spread over ``every`` generations.

    By default the multipliers are one ``(N,)`` vector for the whole population:
    the sensitivities of ``num_individuals`` randomly chosen rows of the values
    passed in (the parents) are combined by root mean square,
    ``s_j = sqrt(mean_p s_pj**2)``, then scaled. That is robust and cheap, and does
    not go stale when children are cross-overs of their parents. With
    ``per_individual=True`` every row gets its own multipliers ``(P, N)``, for row
    ``i`` of the values of the last refresh; that fits ``every=1`` (or a scheme
    where row ``i`` stays the same lineage), since a cached per-row scale belongs to
    the population it was measured on.

    Args:
        problem: a :class:`~evotorch_mqa_moe.problem.TransformerProblem` (its
            ``config``, ``task`` and chunking settings are used).
        every: refresh interval in generations, ``>= 1``.
        method: ``"rms"`` (default), ``"sum"`` (SM-G-SUM) or ``"abs"`` (SM-G-ABS);
            see :func:`output_sensitivity`.
        projections: random-sign backward passes per refresh (``"rms"``).
        batch_size: input sequences (or observation windows) per refresh.
        num_individuals: rows measured for the population-wide scale (all rows if
            the population is smaller); ignored with ``per_individual=True``.
        per_individual: ``(P, N)`` multipliers instead of ``(N,)``.
        floor, normalize: see :func:`sensitivity_to_scale` (``normalize="genes"``: the
            multipliers' root mean square is 1; ``"outputs"``: a mutation moves the
            outputs as much as a plain one of the same stdev, to first order).
        seed: seeds the CPU generator that draws the input batches, the measured
            rows and the random signs; ``None`` draws a seed from ``problem.generator``
            (one number).

    Attributes (plain tensors and numbers, saved by checkpoints):
        generation: the generation the next :meth:`scale` call without one counts as.
        last_refresh: generation of the last refresh (``-1``: none yet).
        refreshes: how many refreshes so far.
        forward_equivalents: the cost of all refreshes so far in the searcher
            protocol's unit (one forward of one individual on one task batch = 1, a
            backward pass = 2): per refresh, measured individuals x
            ``batch_size / task.batch_size`` (1 for tasks without one) x ``1 + 2R``
            (``"rms"``), ``1 + 2O`` (``"sum"``) or ``O + 2TO`` (``"abs"``; T = 1 pooled).
        multiplier: the cached ``(N,)`` or ``(P, N)`` multipliers (``None`` before the first).
        generator: the CPU ``torch.Generator`` of the input batches, rows and signs.

    Example, inside a GA generation (``mutation`` a
    :class:`~evotorch_mqa_moe.operators.GaussianMutation` over the same problem)::

        safe = SafeMutationScale(problem, every=10)
        ...
        children = crossover.make_children(parents_batch, num_children)
        scale = safe.scale(parents_batch.values, generation)   # (N,); refreshed every 10
        children = mutation.mutate_values(children, scale=scale)
    """

    def __init__(
        self,
        problem: Any,
        *,
        every: int = 10,
        method: str = "rms",
        projections: int = 4,
        batch_size: int = 8,
        num_individuals: int = 4,
        per_individual: bool = False,
        floor: float = 0.01,
        normalize: str = "genes",
        seed: int | None = None,
    ):
        self.every = check_int("every", every)
        self.method = _check_method(method)
        self.projections = check_int("projections", projections)
        self.batch_size = check_int("batch_size", batch_size)
        self.num_individuals = check_int("num_individuals", num_individuals)
        self.per_individual = check_bool("per_individual", per_individual)
        self.floor = _check_floor(floor)
        self.normalize = _check_normalize(normalize)
        for attr in ("config", "task"):
            if getattr(problem, attr, None) is None:
                raise TypeError(f"problem must be a TransformerProblem; it has no {attr!r}")
        self.problem = problem
        if seed is None:
            gen = problem.generator
            seed = int(torch.randint(0, 2**62, (), generator=gen, device=gen.device))
        else:
            seed = check_int("seed", seed, 0, none_ok=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.generation = 0
        self.last_refresh = -1
        self.refreshes = 0
        self.forward_equivalents = 0.0
        self.multiplier: Tensor | None = None

    def __repr__(self) -> str:
        return (f"SafeMutationScale(every={self.every}, method={self.method!r}, "
                f"projections={self.projections}, batch_size={self.batch_size}, "
                f"num_individuals={self.num_individuals}, "
                f"per_individual={self.per_individual}, floor={self.floor}, "
                f"normalize={self.normalize!r})")

    def due(self, generation: int) -> bool:
        """Whether :meth:`scale` at ``generation`` refreshes: none cached yet, ``every``
        generations since the last refresh, or a generation before it (a restart)."""
        return (self.multiplier is None or generation >= self.last_refresh + self.every
                or generation < self.last_refresh)

    def scale(self, values: Tensor, generation: int | None = None) -> Tensor:
        """The stdev multipliers for this generation, refreshed from ``values`` when due.

        Args:
            values: ``(P, N)`` the current population (the parents), on the problem's device.
            generation: the generation number; ``None`` counts calls (0, 1, 2, ...).
        Returns:
            ``(N,)`` (default) or ``(P, N)`` (``per_individual``) positive multipliers
            on ``values``' device: ``GaussianMutation.mutate_values(..., scale=...)``.
        """
        if generation is None:
            generation = self.generation
        else:
            generation = check_int("generation", generation, 0)
        values = torch.as_tensor(values)
        if values.dim() != 2:
            raise ValueError(f"values must be a (P, N) tensor, got shape {tuple(values.shape)}")
        if self.due(generation):
            self.refresh(values)
            self.last_refresh = generation
        elif self.per_individual and self.multiplier.shape[0] != values.shape[0]:
            raise ValueError(
                f"per-individual multipliers were measured on {self.multiplier.shape[0]} rows "
                f"but values have {values.shape[0]}; refresh every generation (every=1)"
            )
        self.generation = generation + 1
        return self.multiplier.to(values.device)

    def _cost(self, individuals: int, inputs: Tensor) -> float:
        """Forward-equivalents of measuring ``individuals`` on ``inputs``."""
        config = self.problem.config
        O = config.output_dim
        rows = 1 if config.pooling is not None else inputs.shape[1]  # T of the inputs
        passes = {"rms": 1 + 2 * self.projections, "sum": 1 + 2 * O,
                  "abs": O + 2 * rows * O}[self.method]
        task_batch = getattr(self.problem.task, "batch_size", None) or self.batch_size
        return individuals * self.batch_size / task_batch * passes

    def refresh(self, values: Tensor) -> Tensor:
        """Measure the sensitivities of ``values`` (P, N) now and cache the multipliers."""
        problem = self.problem
        values = torch.as_tensor(values).detach()
        if type(values) is not Tensor:
            values = values.as_subclass(Tensor)
        P = values.shape[0]
        if not self.per_individual and P > self.num_individuals:
            rows = torch.randperm(P, generator=self.generator)[: self.num_individuals]
            values = values.index_select(0, rows.to(values.device))
        inputs = sensitivity_inputs(problem.task, self.batch_size, self.generator)
        inputs = inputs.to(values.device)
        sens = output_sensitivity(problem.config, values, inputs, method=self.method,
                                  projections=self.projections, generator=self.generator,
                                  chunk_size=None,
                                  memory_budget=getattr(problem, "memory_budget", None))
        if not self.per_individual:
            sens = sens.square().mean(dim=0).sqrt()
        self.multiplier = sensitivity_to_scale(sens, floor=self.floor, normalize=self.normalize)
        self.refreshes += 1
        self.forward_equivalents += self._cost(values.shape[0], inputs)
        logger.debug(f"safe mutation: refresh {self.refreshes} ({self.method}) on "
                     f"{values.shape[0]} individuals x {self.batch_size} inputs")
        return self.multiplier
