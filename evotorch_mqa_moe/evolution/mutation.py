"""Probabilistic Gaussian mutation on flat populations.

Only as many normals are drawn as genes are mutated, at positions found from
geometric gaps between mutated genes (exact Bernoulli statistics), then added into
a clone with ``index_add_`` (``torch.randn`` of every gene costs ~6 clones on a CPU).
Above a mutation probability of ``_DENSE_MUTATION_ABOVE`` a dense draw is cheaper.
"""

from __future__ import annotations

import math
import numbers

import torch

from .sampling import _check_probability, _rng_device

# Above this mutation probability, drawing a normal for every gene and zeroing the
# (1 - p) untouched ones beats drawing positions + normals for the mutated ones.
_DENSE_MUTATION_ABOVE = 0.5


# --------------------------------------------------------------------------- mutation


def _bernoulli_positions(
    n: int, p: float, *, device, generator, _slack_sigmas: float = 6.0
) -> torch.Tensor:
    """Sorted, distinct int64 indices of the successes among ``n`` Bernoulli(``p``) trials.

    The gaps between successes are geometric: ``floor(log(V) / log(1 - p))`` with
    ``V`` uniform on ``(0, 1]`` (float64, so the distribution is exact to 2**-53).
    Draws enough gaps to pass ``n`` with overwhelming probability and loops if not
    (tests force the loop with a negative ``_slack_sigmas``).
    """
    if p < 1e-300 or n == 0:  # P(any success) < 1e-280: treat as 0, avoids inf/NaN gaps
        return torch.empty(0, dtype=torch.int64, device=device)
    if p == 1.0:
        return torch.arange(n, dtype=torch.int64, device=device)
    rng_dev = _rng_device(generator, device)
    log_q = math.log1p(-p)
    pieces = []
    start = 0  # index of the first trial not yet covered
    while start < n:
        mean = (n - start) * p
        k = max(1, int(mean + _slack_sigmas * math.sqrt(mean * (1.0 - p)) + 16))
        u = torch.rand(k, dtype=torch.float64, device=rng_dev, generator=generator)
        # gap + 1 = floor(log(1 - u) / log(1 - p)) + 1: the int64 cast truncates, which is
        # floor here (values >= 1). Each pass over k float64s costs ~0.1 clone, so
        # everything is in place and the start offset goes into the first element only.
        steps = u.neg_().log1p_().mul_(1.0 / log_q).add_(1.0)
        if 37.0 / -log_q > 2.0**62:  # p < ~1e-17: keep the cast and cumsum in range
            steps.clamp_max_(float(n + 1))
        pos = steps.to(device=device, dtype=torch.int64)
        pos[0] += start - 1
        pos = pos.cumsum_(0)
        cut = int(torch.searchsorted(pos, n))
        pieces.append(pos[:cut])
        if cut < k:
            break
        start = int(pos[-1]) + 1
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _check_stdev(stdev, *, shape=None) -> float | torch.Tensor:
    """Validate a scalar or tensor standard deviation; scalars come back as ``float``."""
    if isinstance(stdev, torch.Tensor):
        if stdev.is_complex() or stdev.dtype == torch.bool:
            raise TypeError(f"`stdev` must be real, got a tensor of dtype {stdev.dtype}")
        if stdev.numel() == 1 and stdev.ndim == 0:
            stdev = stdev.item()
        else:
            if shape is not None:
                try:
                    b = torch.broadcast_shapes(stdev.shape, shape)
                except RuntimeError:
                    b = None
                if b != torch.Size(shape):
                    raise ValueError(
                        f"`stdev` of shape {tuple(stdev.shape)} does not broadcast to the "
                        f"values' shape {tuple(shape)}"
                    )
            bad = ~((stdev >= 0) & torch.isfinite(stdev))  # negative, NaN or inf
            if bool(bad.any()):
                raise ValueError(
                    f"`stdev` must be finite and >= 0 everywhere, got "
                    f"{stdev[bad].flatten()[0].item()!r}"
                )
            return stdev
    if not isinstance(stdev, numbers.Real) or isinstance(stdev, bool):
        raise TypeError(f"`stdev` must be a real number or a tensor, got {stdev!r}")
    stdev = float(stdev)
    if not (0.0 <= stdev < math.inf):
        raise ValueError(f"`stdev` must be finite and >= 0, got {stdev!r}")
    return stdev


def _gather_broadcast(t: torch.Tensor, flat_index: torch.Tensor, shape) -> torch.Tensor:
    """``t.expand(shape).reshape(-1)[flat_index]`` without materialising the expansion."""
    t = t.reshape((1,) * (len(shape) - t.ndim) + tuple(t.shape)).contiguous()
    expanded = t.expand(shape)
    offset = torch.zeros_like(flat_index)
    inner = 1
    for size, stride in zip(reversed(shape), reversed(expanded.stride()), strict=True):
        if stride != 0 and size > 1:
            offset += (flat_index // inner) % size * stride
        inner *= size
    return t.view(-1)[offset]


def gaussian_mutation(
    values: torch.Tensor,
    *,
    stdev: float | torch.Tensor,
    mutation_probability: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add ``N(0, stdev**2)`` noise to each gene independently with probability ``p``.

    Args:
        values: ``(..., P, N)`` floating-point decision values (any shape works).
        stdev: ``>= 0``; a number or a tensor broadcastable to ``values`` (e.g.
            ``(P, 1)`` per individual, ``(N,)`` per gene, ``(P, N)``).
        mutation_probability: ``p`` in ``[0, 1]``; ``None`` mutates every gene.
        generator: source of randomness; ``None`` uses PyTorch's global generator.
    Returns:
        A new tensor shaped like ``values`` (contiguous), same dtype and device.
    Raises:
        ValueError: ``p`` outside ``[0, 1]``; negative/NaN ``stdev``; ``stdev`` not
            broadcastable to ``values``.
        TypeError: non-floating ``values``.

    For ``p <= 0.5`` only the mutated genes get a normal draw (positions from geometric
    gaps); above, every gene gets one and the untouched ``1 - p`` are zeroed. Both
    give exactly independent Bernoulli(``p``) choices.
    """
    p, stdev = _mutation_args(values, stdev, mutation_probability)
    return _mutate(values, (stdev,), p, generator)


def gaussian_mutation_(
    values: torch.Tensor,
    *,
    stdev: float | torch.Tensor,
    mutation_probability: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """In-place :func:`gaussian_mutation` of a contiguous tensor; returns ``values``.

    Same statistics, validation and random stream as :func:`gaussian_mutation`
    (with the same generator state both give the same numbers) but skips the copy:
    use it on a tensor you just made, e.g. fresh children of a cross-over.
    """
    p, stdev = _mutation_args(values, stdev, mutation_probability)
    if not values.is_contiguous():
        raise ValueError("`values` must be contiguous for in-place mutation")
    return _mutate(values, (stdev,), p, generator, inplace=True)


def _mutation_args(values: torch.Tensor, stdev, mutation_probability) -> tuple:
    """Validated ``(p, stdev)`` for the mutation kernels (stdev moved to ``values``)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"`values` must be a tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise TypeError(f"`values` must be floating point, got dtype {values.dtype}")
    p = (
        1.0
        if mutation_probability is None
        else _check_probability("mutation_probability", mutation_probability)
    )
    stdev = _check_stdev(stdev, shape=values.shape)
    if isinstance(stdev, torch.Tensor):
        stdev = stdev.to(device=values.device, dtype=values.dtype)
    return p, stdev


def _mutate(
    values: torch.Tensor, stdevs: tuple, p: float, generator, *, inplace: bool = False
) -> torch.Tensor:
    """Mutation kernel; ``stdevs`` is a tuple of validated factors whose product is the stdev.

    ``inplace`` needs a contiguous ``values`` and returns it."""
    device, dtype, shape, n = values.device, values.dtype, values.shape, values.numel()
    rng_dev = _rng_device(generator, device)
    scalar = 1.0
    tensors = []
    for s in stdevs:
        if isinstance(s, torch.Tensor):
            tensors.append(s)
        else:
            scalar *= s
    if p == 0.0 or n == 0 or (not tensors and scalar == 0.0):
        return values if inplace else values.clone(memory_format=torch.contiguous_format)

    if p > _DENSE_MUTATION_ABOVE:
        noise = torch.randn(shape, dtype=dtype, device=rng_dev, generator=generator).to(device)
        if p < 1.0:
            keep = _bernoulli_positions(n, 1.0 - p, device=device, generator=generator)
            noise.view(-1).index_fill_(0, keep, 0.0)
        if scalar != 1.0:
            noise.mul_(scalar)
        for t in tensors:
            noise.mul_(t)
        return values.add_(noise) if inplace else noise.add_(values)

    pos = _bernoulli_positions(n, p, device=device, generator=generator)
    noise = torch.randn(pos.numel(), dtype=dtype, device=rng_dev, generator=generator).to(device)
    if scalar != 1.0:
        noise.mul_(scalar)
    for t in tensors:
        noise.mul_(_gather_broadcast(t, pos, shape))
    out = values if inplace else values.clone(memory_format=torch.contiguous_format)
    # Positions are distinct, so index_add_ adds each normal exactly once (and it is
    # faster here than index_put_/put_/scatter_add_ or gather + index_copy_).
    out.view(-1).index_add_(0, pos, noise)
    return out
