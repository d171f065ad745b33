"""The search directions of ``lowrank-es``: antithetic pairs of low-rank perturbations,
either drawn once and stored (:class:`LowRankNoise`) or regenerated on demand from one
seed per generation (:class:`SeededLowRankNoise`), which keeps nothing per individual.

Regenerated noise: pair ``k`` of a generation with seed ``s`` is the flat draw
``randn(size)`` of a ``torch.Generator`` seeded with ``derive_key(s, k)`` (a hash of the
two, :mod:`evotorch_mqa_moe.evolution.counter_rng`): any pair, in any chunk, comes
out the same, and the forward pass and the update each rebuild the chunk they need.
Why a seeded generator per pair rather than a hash per number: in eager torch on a
2-core CPU the vectorised PCG-hash + Box-Muller cost ~35x a plain ``torch.randn`` per
number, a reseeded ``randn`` per pair ~1.6x (``bench/noise.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from evotorch_mqa_moe.evolution.counter_rng import derive_key
from evotorch_mqa_moe.model import (
    LowRankPopulation,
    TransformerConfig,
    check_rank,
    lowrank_layout,
    num_vector_genes,
)

__all__ = ["LowRankNoise", "SeededLowRankNoise"]


class LowRankNoise:
    """Unit-variance search directions of P/2 antithetic pairs, stored as factors.

    Direction ``k`` is, for every matrix, ``A_k B_k^T / sqrt(r)`` (A, B standard normal:
    every entry has variance 1) and, for the vectors, ``e_k`` (standard normal).
    Individual ``2k`` is the centre plus ``sigma`` times direction ``k``, individual
    ``2k + 1`` minus it.

    Attributes:
        config, rank, pairs; ``a``/``b``: ``{name: (pairs, R, r) / (pairs, C, r)}``;
        ``vectors``: (pairs, n). Float32 (or float64), whatever the compute dtype.
    """

    def __init__(self, config: TransformerConfig, pairs: int, rank: int, *,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, _flat: Tensor | None = None):
        self.config, self.rank, self.pairs = config, check_rank(config, rank), pairs
        self.layout = lowrank_layout(config)
        n = num_vector_genes(self.layout)
        sizes = [pairs * n] + [pairs * rank * (b.rows + b.cols) for b in self.layout if b.lowrank]
        if _flat is None:
            rng_device = generator.device if generator is not None else torch.device("cpu")
            flat = torch.randn(sum(sizes), generator=generator, device=rng_device, dtype=dtype)
            flat = flat.to(device if device is not None else rng_device)  # one draw, one copy
        else:
            flat = _flat
        self.vectors = flat[: sizes[0]].view(pairs, n)
        self.a: dict[str, Tensor] = {}
        self.b: dict[str, Tensor] = {}
        offset = sizes[0]
        for block in self.layout:
            if block.lowrank:
                na, nb = pairs * block.rows * rank, pairs * block.cols * rank
                self.a[block.name] = flat[offset : offset + na].view(pairs, block.rows, rank)
                self.b[block.name] = flat[offset + na : offset + na + nb].view(pairs, block.cols,
                                                                               rank)
                offset += na + nb

    def individuals(self, center: Tensor, sigma: float, dtype: torch.dtype
                    ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
        """The 2 * pairs individuals' factors ``{name: (A, B)}`` (signs folded into A)
        and dense vectors (2 * pairs, n), in ``dtype``."""
        factors = {}
        for name, a in self.a.items():
            a = a.to(dtype)
            signed = torch.stack([a, -a], dim=1).flatten(0, 1)  # (2 pairs, R, r): +, -
            factors[name] = (signed, self.b[name].to(dtype).repeat_interleave(2, dim=0))
        base = torch.cat([center[b.offset : b.offset + b.size] for b in self.layout
                          if not b.lowrank])
        step = self.vectors * sigma
        vectors = torch.stack([base + step, base - step], dim=1).flatten(0, 1).to(dtype)
        return factors, vectors

    def population(self, center: Tensor, sigma: float, *, dtype: torch.dtype | None = None,
                   **kwargs: Any) -> LowRankPopulation:
        """The 2 * pairs antithetic individuals around ``center`` (N,), in ``dtype``
        (default ``center``'s); ``kwargs`` go to :class:`LowRankPopulation`."""
        dtype = dtype or center.dtype
        factors, vectors = self.individuals(center, sigma, dtype)
        return LowRankPopulation(self.config, center.to(dtype), factors, vectors,
                                 sigma / math.sqrt(self.rank), **kwargs)

    def gradient(self, utilities: Tensor, sigma: float, popsize: int | None = None) -> Tensor:
        """The ES estimate ``1 / (P sigma) * sum_i u_i d_i`` (N,) from the factors.

        ``utilities`` (2 * pairs,) of the individuals (``d_{2k+1} = -d_{2k}``, so
        only the pair differences ``u_{2k} - u_{2k+1}`` enter); one
        (R, pairs * r) x (pairs * r, C) GEMM per matrix. In the noise's dtype.
        ``popsize``: P of the normalisation, when these pairs are a chunk of a larger
        population (default ``2 * pairs``).
        """
        if utilities.shape != (2 * self.pairs,):
            raise ValueError(f"utilities must be ({2 * self.pairs},), got "
                             f"{tuple(utilities.shape)}")
        P = 2 * self.pairs if popsize is None else popsize
        diff = (utilities[0::2] - utilities[1::2]).to(self.vectors.dtype)  # (pairs,)
        total = self.layout[-1].offset + self.layout[-1].size
        grad = self.vectors.new_empty(total)
        vector_grad = diff @ self.vectors / (P * sigma)  # (n,)
        coef = 1.0 / (P * sigma * math.sqrt(self.rank))
        for block in self.layout:
            if block.lowrank:
                a, b = self.a[block.name], self.b[block.name]  # (pairs, R, r), (pairs, C, r)
                left = (a * diff[:, None, None]).permute(1, 0, 2).reshape(block.rows, -1)
                right = b.permute(0, 2, 1).reshape(-1, block.cols)  # (pairs * r, C)
                value = torch.mm(left, right).mul_(coef)
            else:
                value = vector_grad[block.vector_offset : block.vector_offset + block.size]
            grad[block.offset : block.offset + block.size] = value.reshape(-1)
        return grad


class SeededLowRankNoise:
    """The directions of :class:`LowRankNoise`, regenerated pair by pair from one seed.

    Holds ``seed``, ``pairs`` and the layout: O(1) memory, whatever P. Pair ``k`` is
    ``randn(pair_size)`` of a generator seeded with ``derive_key(seed, k)``, laid out
    as one pair of :class:`LowRankNoise` (vectors, then A and B of every matrix).

    Args:
        config, pairs, rank: as for :class:`LowRankNoise`.
        seed: the generation's seed (an int; ``lowrank-es`` draws it from the problem's
            generator, so resuming repeats it).
        device: where the numbers are used; drawn on ``generator_device`` (default:
            the same) and copied once per chunk.
        chunk_pairs: pairs regenerated together in :meth:`gradient`.
    """

    def __init__(self, config: TransformerConfig, pairs: int, rank: int, seed: int, *,
                 device: torch.device | str | None = None,
                 generator_device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, chunk_pairs: int = 256):
        self.config, self.rank, self.pairs = config, check_rank(config, rank), pairs
        self.seed = int(seed)
        self.layout = lowrank_layout(config)
        self.device = torch.device(device if device is not None else "cpu")
        self.generator_device = (torch.device(generator_device) if generator_device is not None
                                 else self.device)
        self.dtype, self.chunk_pairs = dtype, max(1, int(chunk_pairs))
        self.pair_size = num_vector_genes(self.layout) + sum(
            rank * (b.rows + b.cols) for b in self.layout if b.lowrank)
        self._pair_rng = torch.Generator(device=self.generator_device)

    def pair_draws(self, first: int, last: int) -> Tensor:
        """(last - first, pair_size): the raw draws of pairs ``first .. last-1``."""
        rows = []
        for k in range(first, last):
            self._pair_rng.manual_seed(derive_key(self.seed, k))
            rows.append(torch.randn(self.pair_size, generator=self._pair_rng,
                                    device=self.generator_device, dtype=self.dtype))
        return torch.stack(rows).to(self.device)

    def stored(self, first: int = 0, last: int | None = None) -> LowRankNoise:
        """Pairs ``first .. last-1`` as stored :class:`LowRankNoise` (the same numbers)."""
        last = self.pairs if last is None else last
        draws = self.pair_draws(first, last)
        return LowRankNoise(self.config, last - first, self.rank, _flat=_pair_major(
            draws, self.layout, self.rank))

    def population(self, center: Tensor, sigma: float, *, dtype: torch.dtype | None = None,
                   **kwargs: Any) -> LowRankPopulation:
        """The 2 * pairs individuals around ``center``; each chunk the pass asks for is
        regenerated then (:class:`LowRankPopulation`'s ``source``)."""
        dtype = dtype or center.dtype

        def source(start: int, stop: int):
            first, last = start // 2, (stop + 1) // 2
            factors, vectors = self.stored(first, last).individuals(center, sigma, dtype)
            window = slice(start - 2 * first, stop - 2 * first)
            return ({name: (a[window], b[window]) for name, (a, b) in factors.items()},
                    vectors[window])

        return LowRankPopulation(self.config, center.to(dtype), None, None,
                                 sigma / math.sqrt(self.rank), source=source,
                                 popsize=2 * self.pairs, **kwargs)

    def gradient(self, utilities: Tensor, sigma: float) -> Tensor:
        """:meth:`LowRankNoise.gradient`, summed over chunks of ``chunk_pairs`` pairs."""
        P = 2 * self.pairs
        if utilities.shape != (P,):
            raise ValueError(f"utilities must be ({P},), got {tuple(utilities.shape)}")
        grad = None
        for first in range(0, self.pairs, self.chunk_pairs):
            last = min(self.pairs, first + self.chunk_pairs)
            part = self.stored(first, last).gradient(utilities[2 * first : 2 * last], sigma,
                                                     popsize=P)
            grad = part if grad is None else grad.add_(part)
        return grad


def _pair_major(draws: Tensor, layout, rank: int) -> Tensor:
    """Per-pair rows (k, pair_size) -> the flat layout of :class:`LowRankNoise` for k
    pairs (all pairs' vectors, then every matrix's A of all pairs, then its B)."""
    n = num_vector_genes(layout)
    parts, offset = [draws[:, :n].reshape(-1)], n
    for block in layout:
        if block.lowrank:
            na, nb = block.rows * rank, block.cols * rank
            parts.append(draws[:, offset : offset + na].reshape(-1))
            parts.append(draws[:, offset + na : offset + na + nb].reshape(-1))
            offset += na + nb
    return torch.cat(parts)
