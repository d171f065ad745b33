"""Parent selection on fitness vectors: best-first order, truncation and tournament
pairs, NaN ranked worst."""

from __future__ import annotations

import math

import torch

from evotorch_mqa_moe._internal.validate import check_int

from .sampling import _check_probability, _rng_device

# --------------------------------------------------------------------------- selection


def _nan_worst_key(fitness: torch.Tensor, maximize: bool) -> torch.Tensor:
    """Fitness as a key where larger is better and NaN is the worst possible value."""
    if fitness.ndim != 1:
        raise ValueError(f"`fitness` must be 1-D (P,), got shape {tuple(fitness.shape)}")
    key = fitness if maximize else -fitness
    return torch.nan_to_num(key.to(torch.float64), nan=-math.inf)


def best_first(fitness: torch.Tensor, *, maximize: bool) -> torch.Tensor:
    """Indices ``(P,)`` sorting ``fitness`` ``(P,)`` from best to worst, NaN last (stable)."""
    key = _nan_worst_key(fitness, maximize)
    # Stable descending sort: among equal keys (e.g. all NaN) keep the original order.
    return torch.sort(key, descending=True, stable=True).indices


def truncation_pairs(
    fitness: torch.Tensor,
    num_pairs: int,
    *,
    fraction: float = 0.5,
    maximize: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncation selection: pair parents drawn from the best ``fraction`` of the population.

    The top ``k = max(2, round(fraction * P))`` individuals (NaN fitness counts as
    the worst) form the mating pool; each pair is two *different* members drawn
    uniformly at random (independently across pairs).

    Args:
        fitness: ``(P,)`` fitness values.
        num_pairs: how many pairs to return.
        fraction: share of the population allowed to breed, in ``(0, 1]``.
        maximize: ``True`` if larger fitness is better.
        generator: source of randomness.
    Returns:
        ``(idx1, idx2)``, each ``(num_pairs,)`` int64 indices into the population.
    """
    num_pairs = check_int("num_pairs", num_pairs, 0, integral_float=True)
    fraction = _check_probability("fraction", fraction)
    if fraction == 0.0:
        raise ValueError("`fraction` must be > 0, got 0.0")
    popsize = fitness.shape[0]
    if popsize < 2:
        raise ValueError(f"truncation selection needs at least 2 individuals, got {popsize}")
    k = min(popsize, max(2, round(fraction * popsize)))
    pool = best_first(fitness, maximize=maximize)[:k]
    rng_dev = _rng_device(generator, fitness.device)
    first = torch.randint(k, (num_pairs,), device=rng_dev, generator=generator)
    # Uniform over the k - 1 others: no individual is mated with itself.
    other = (first + torch.randint(1, k, (num_pairs,), device=rng_dev, generator=generator)) % k
    return pool[first.to(fitness.device)], pool[other.to(fitness.device)]


def tournament_pairs(
    fitness: torch.Tensor,
    num_pairs: int,
    *,
    tournament_size: int,
    maximize: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tournament selection: each parent is the best of ``tournament_size`` uniform draws.

    NaN fitness loses every comparison (ties go to the first drawn).

    Args:
        fitness: ``(P,)`` fitness values.
        num_pairs: how many pairs to return.
        tournament_size: contestants per tournament, ``>= 1``.
        maximize: ``True`` if larger fitness is better.
        generator: source of randomness.
    Returns:
        ``(idx1, idx2)``, each ``(num_pairs,)`` int64 indices into the population.
    """
    num_pairs = check_int("num_pairs", num_pairs, 0, integral_float=True)
    tournament_size = check_int("tournament_size", tournament_size, integral_float=True)
    key = _nan_worst_key(fitness, maximize)
    rng_dev = _rng_device(generator, fitness.device)
    contestants = torch.randint(
        fitness.shape[0], (2 * num_pairs, int(tournament_size)), device=rng_dev, generator=generator
    ).to(fitness.device)
    winners = contestants.gather(1, key[contestants].argmax(dim=1, keepdim=True)).squeeze(1)
    return winners[:num_pairs], winners[num_pairs:]
