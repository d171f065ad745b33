"""Adaptive mutation: per-tensor scales, self-adaptive step sizes, a success rule.

Three independent pieces; :func:`evotorch_mqa_moe.ga.seed_genetic_algorithm` wires
them into the GA.

* :func:`per_tensor_stdev` - a fixed ``(N,)`` per-gene stdev from one scale per
  parameter tensor (embeddings vs expert weights vs LayerNorm gains). Helps when
  tensors live on different scales: token embeddings are drawn from N(0, 1) and
  LayerNorm gains start at 1, while linear weights are U(+-1/sqrt(fan_in)) (+-0.25
  at width 16): a step that is small for the first is large for the second.
* :class:`SelfAdaptiveStepSize` - each individual carries a log step-size
  multiplier that is inherited (mean of the two parents' logs), perturbed
  log-normally, and selected implicitly with the genome (Schwefel 1977; Beyer &
  Schwefel 2002, "Evolution strategies - a comprehensive introduction", Nat.
  Comput. 1:3-52). Helps when the right step size changes during the run
  (large early, small near convergence) and per-individual diversity in step
  size is affordable; costs nothing extra per evaluation.
* :class:`SuccessRule` - one global multiplier driven by the fraction of
  children that beat both of their parents, in the spirit of Rechenberg's 1/5th
  rule (Rechenberg 1973; the smooth exponential form of Kern et al. 2004,
  "Learning probability distributions in continuous evolutionary algorithms",
  Nat. Comput. 3:77-112). Helps with deterministic or low-noise fitness; with
  noisy fitness (a fresh batch per generation) success counts are noisy and the
  self-adaptive scheme is the safer choice.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .sampling import _check_probability, _rng_device
from .selection import _nan_worst_key

__all__ = ["SelfAdaptiveStepSize", "SuccessRule", "per_tensor_stdev"]


def per_tensor_stdev(
    parameters: torch.nn.Module | Iterable[tuple[str, int | torch.Tensor]],
    scales: Mapping[str, float],
    *,
    default: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A per-gene stdev vector ``(N,)`` with one value per parameter tensor.

    Args:
        parameters: a module (its ``named_parameters()``, in registration order =
            the flat order of ``parameters_to_vector``), or ``(name, tensor_or_numel)``
            pairs in flat order.
        scales: ``{glob_pattern: stdev}``, matched with :func:`fnmatch.fnmatchcase`
            against each name; the first matching pattern wins (dict order).
        default: stdev for tensors no pattern matches.
    Returns:
        ``(N,)`` tensor, ``N`` = total number of parameters; pass it as
        ``GaussianMutation(stdev=...)``.

    Names look like ``embed.weight``, ``pos_embed``, ``layers.0.attn.qkv_weight``,
    ``layers.0.moe.in_weight`` (experts), ``layers.0.moe.gate_weight``, ``head.weight``.

    Example: ``per_tensor_stdev(model, {"*embed*": 0.1, "*.moe.*": 0.03}, default=0.05)``.
    """
    items = (
        list(parameters.named_parameters())
        if isinstance(parameters, torch.nn.Module)
        else list(parameters)
    )
    for value in list(scales.values()) + [default]:
        if not (float(value) >= 0.0):
            raise ValueError(f"stdev scales must be >= 0, got {value!r}")
    pieces = []
    for name, p in items:
        numel = p.numel() if isinstance(p, torch.Tensor) else int(p)
        s = next((float(v) for pat, v in scales.items() if fnmatch.fnmatchcase(name, pat)), None)
        pieces.append(torch.full((numel,), float(default) if s is None else s, dtype=dtype))
    out = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype)
    return out.to(device) if device is not None else out


@dataclass(frozen=True)
class SelfAdaptiveStepSize:
    """Log-normal self-adaptation of one step-size multiplier per individual.

    A child's log multiplier is the mean of its parents' (intermediate recombination
    of the strategy parameter) plus ``tau * N(0, 1)``, clamped to
    ``[log(min_scale), log(max_scale)]``; its mutation stdev is ``exp(log) * stdev``.
    Survivors keep their multiplier, so good step sizes spread with good genomes.

    ``tau``: Schwefel's ``1/sqrt(N)`` is tuned for an ES on a sphere; for a GA with a
    few hundred generations and N ~ 1e4-1e5 it lets the step size change by <1%
    per generation, too slow to matter. The default 0.2 lets the multiplier double
    in a handful of generations while selection noise stays small.
    """

    tau: float = 0.2
    initial_scale: float = 1.0
    min_scale: float = 0.05
    max_scale: float = 20.0

    def __post_init__(self):
        if not (self.tau >= 0):
            raise ValueError(f"`tau` must be >= 0, got {self.tau!r}")
        if not (0 < self.min_scale <= self.initial_scale <= self.max_scale):
            raise ValueError(
                "need 0 < min_scale <= initial_scale <= max_scale, got "
                f"min_scale={self.min_scale!r}, initial_scale={self.initial_scale!r}, "
                f"max_scale={self.max_scale!r}"
            )

    def initial_log_scales(self, popsize: int, *, device=None) -> torch.Tensor:
        """``(P,)`` float32 log multipliers of a fresh population."""
        return torch.full((popsize,), math.log(self.initial_scale), device=device)

    def child_log_scales(
        self,
        log_parent1: torch.Tensor,
        log_parent2: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(M,)`` parents' log multipliers -> ``(2M,)`` children's (both children of
        pair ``i``, at ``i`` and ``M + i``, get independent perturbations)."""
        mean = 0.5 * (log_parent1 + log_parent2)
        rng_dev = _rng_device(generator, mean.device)
        noise = torch.randn(2 * mean.shape[0], generator=generator, device=rng_dev)
        child = torch.cat([mean, mean]) + self.tau * noise.to(mean.device, mean.dtype)
        return child.clamp_(math.log(self.min_scale), math.log(self.max_scale))


class SuccessRule:
    """A global step-size multiplier adapted from the offspring success rate.

    After each generation, with ``s`` the fraction of children strictly better than
    both of their parents (NaN is never a success),
    ``scale *= exp((s - target) / (damping * (1 - target)))`` clamped to
    ``[min_scale, max_scale]``: more successes than ``target`` -> bigger steps.

    ``target=0.2`` is Rechenberg's 1/5th; with uniform cross-over between good
    parents, beating both parents is harder than beating one, so a smaller target
    (e.g. 0.05-0.1) can suit a GA better. Mutable (holds ``scale``).
    """

    def __init__(
        self,
        *,
        target: float = 0.2,
        damping: float = 4.0,
        initial_scale: float = 1.0,
        min_scale: float = 0.05,
        max_scale: float = 20.0,
    ):
        target = _check_probability("target", target)
        if not (0.0 < target < 1.0):
            raise ValueError(f"`target` must be in (0, 1), got {target!r}")
        if not (damping > 0):
            raise ValueError(f"`damping` must be > 0, got {damping!r}")
        if not (0 < min_scale <= initial_scale <= max_scale):
            raise ValueError(
                "need 0 < min_scale <= initial_scale <= max_scale, got "
                f"min_scale={min_scale!r}, initial_scale={initial_scale!r}, "
                f"max_scale={max_scale!r}"
            )
        self.target = target
        self.damping = float(damping)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.scale = float(initial_scale)
        self.last_success_rate: float | None = None

    def update(
        self,
        child_fitness: torch.Tensor,
        parent1_fitness: torch.Tensor,
        parent2_fitness: torch.Tensor,
        *,
        maximize: bool,
    ) -> float:
        """Update ``scale`` from ``(C,)`` fitness of children and of their two parents.

        Returns the new ``scale``.
        """
        child = _nan_worst_key(child_fitness, maximize)
        better = torch.maximum(
            _nan_worst_key(parent1_fitness, maximize), _nan_worst_key(parent2_fitness, maximize)
        )
        if child.numel() == 0:
            return self.scale
        rate = float((child > better).to(torch.float64).mean())
        self.last_success_rate = rate
        factor = math.exp((rate - self.target) / (self.damping * (1.0 - self.target)))
        self.scale = min(self.max_scale, max(self.min_scale, self.scale * factor))
        return self.scale
