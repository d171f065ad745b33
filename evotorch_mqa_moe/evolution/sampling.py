"""Random draws shared by the flat kernels: Bernoulli masks from random bits, and the
argument checks for probabilities.

On a CPU, random-number generation, not memory traffic, is the bottleneck of the
GA operators (measured on a 2-core Xeon, 256 x 100k float32; a ``clone`` is the
unit): ``torch.rand`` of one float per gene costs ~4 clones and ``torch.randn`` ~6,
while 64 random bits drawn as one int64 word cost ~1/60 of a float each; so masks
are drawn as bits here.
"""

from __future__ import annotations

import numbers

import torch

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# One bit per byte position; broadcast over a (rows, 1, K) byte tensor it unpacks
# 8 bits per byte into a (rows, 8, K) bit-plane layout with a long inner loop.
_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, -128)

# Above this mutation probability, drawing a normal for every gene and zeroing the
# (1 - p) untouched ones beats drawing positions + normals for the mutated ones.
_DENSE_MUTATION_ABOVE = 0.5


# --------------------------------------------------------------------------- helpers


def _check_probability(name: str, value: float) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"`{name}` must be a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"`{name}` must be in [0, 1], got {value!r}")
    return value


def _rng_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """The device to draw random numbers on: the generator's, if one is given."""
    return device if generator is None else generator.device


def _random_int64(count: int, *, device: torch.device, generator) -> torch.Tensor:
    """``count`` uniformly random int64 words (all 64 bits random), shape ``(count,)``."""
    rng_dev = _rng_device(generator, device)
    # random_() with no bounds leaves the sign bit 0 for int64; ask for the full range.
    words = torch.empty(count, dtype=torch.int64, device=rng_dev).random_(
        -(2**63), None, generator=generator
    )
    return words.to(device)


def _bernoulli_mask(
    rows: int, cols: int, p: float, *, device, generator, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """A ``(rows, cols)`` bool mask, each entry True with probability ``p``, independently.

    ``p == 0.5`` uses one random bit per entry; other ``p`` compare 32 random bits
    with ``round(p * 2**32)`` (resolution 2**-32, finer than ``torch.rand``'s 2**-24).
    The result may be a non-contiguous view. ``scratch``: an optional int8 buffer of at
    least ``rows * 8 * ceil(cols / 8)`` elements to build the mask in.
    """
    if p == 0.0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=device)
    if p == 1.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    if p == 0.5:
        k = (cols + 7) // 8  # bytes per row
        words = _random_int64((rows * k + 7) // 8, device=device, generator=generator)
        octets = words.view(torch.int8)[: rows * k].view(rows, 1, k)
        bits = torch.tensor(_BIT_VALUES, dtype=torch.int8, device=device).view(1, 8, 1)
        # (rows, 8, k): bit j of byte i lands at gene j * k + i. Any bijection from bits
        # to genes gives independent fair coins.
        out = None if scratch is None else scratch[: rows * 8 * k].view(rows, 8, k)
        planes = torch.bitwise_and(octets, bits, out=out).ne_(0).view(torch.bool)
        return planes.view(rows, 8 * k)[:, :cols]
    words = _random_int64((rows * cols + 1) // 2, device=device, generator=generator)
    r = words.view(torch.int32)[: rows * cols].view(rows, cols)  # uniform on [-2**31, 2**31)
    threshold = round(p * 2**32) - 2**31
    return r < threshold


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``(..., P, N)`` (or ``(N,)``) as ``(R, N)``; copies only if it must."""
    return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
