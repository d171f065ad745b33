"""Non-finite fitness (NaN, inf) made the worst finite value, so that it can neither
crash a run nor win a selection."""

from __future__ import annotations

import torch
from torch import Tensor


def replace_nonfinite(fitness: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`worst_for_nonfinite` without reading anything back to the host.

    Returns the new fitness and the number of replaced entries as a 0-d tensor
    on ``fitness``'s device, so that a GPU evaluation is not stalled here.
    """
    finite = torch.isfinite(fitness)
    bad = (~finite).sum()
    inf = torch.tensor(float("inf"), device=fitness.device, dtype=fitness.dtype)
    low = torch.where(finite, fitness, inf).amin()
    high = torch.where(finite, fitness, -inf).amax()
    worst = torch.where(torch.isfinite(low), low - (high - low) - 1.0, -1e30)
    return torch.where(finite, fitness, worst), bad


def worst_for_nonfinite(fitness: Tensor) -> tuple[Tensor, int]:
    """Replace NaN/inf fitness (maximised) by a finite value below every finite one.

    The replacement is ``min - (max - min) - 1`` over the finite entries (``-1e30``
    when none is finite), so it loses every comparison, keeps rank- and value-based
    searchers finite, and leaves the other individuals untouched. Returns the new
    fitness and how many entries were replaced.
    """
    fitness, bad = replace_nonfinite(fitness)
    return fitness, int(bad)
