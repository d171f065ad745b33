"""A fixed random Markov chain over tokens, with its exact entropy rate."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_float, check_int

__all__ = ["MarkovSource"]

MAX_CONTEXTS = 1 << 16
"""Largest number of contexts ``vocab_size ** order`` a chain may have."""


class MarkovSource:
    """An order-``k`` Markov chain over ``V`` tokens with Dirichlet-random transitions.

    Context ``s`` (the last ``k`` tokens, oldest first, read as a base-``V``
    number) emits the next token with probabilities ``transition[s]``, each row
    drawn from a symmetric Dirichlet(``concentration``) by NumPy's generator
    seeded with ``seed``: smaller concentrations give more predictable chains.
    Every sequence starts from the stationary distribution over contexts, so
    samples are stationary and the expected log-loss of the true model on any
    token with a full context is the entropy rate.

    Attributes:
        transition: (V**k, V) float64 next-token probabilities.
        stationary: (V**k,) float64 stationary distribution over contexts.
        entropy_rate: bits per token, ``-sum_s pi(s) sum_x P(x|s) log2 P(x|s)``.
    """

    def __init__(self, vocab_size: int, order: int, concentration: float, seed: int):
        self.vocab_size = check_int("vocab_size", vocab_size, 2, 256)
        self.order = check_int("order", order, 1, 8)
        if self.vocab_size ** self.order > MAX_CONTEXTS:
            raise ValueError(f"vocab_size ** order must be <= {MAX_CONTEXTS}, got "
                             f"{vocab_size}**{order} = {vocab_size ** order}")
        self.concentration = check_float("concentration", concentration)
        self.seed = check_int("seed", seed, 0)
        V, S = self.vocab_size, self.vocab_size ** self.order
        rng = np.random.default_rng(seed)
        probs = rng.dirichlet(np.full(V, self.concentration), size=S)
        probs = np.maximum(probs, 1e-12)  # keep every transition possible (irreducible chain)
        self.transition = torch.from_numpy(probs / probs.sum(axis=1, keepdims=True))
        self.stationary = self._stationary()
        plogp = torch.special.xlogy(self.transition, self.transition).sum(dim=1)
        self.entropy_rate = float(-(self.stationary * plogp).sum() / math.log(2))
        self._cdf = self.transition.cumsum(dim=1)
        self._cdf[:, -1] = 1.0
        self._start_cdf = self.stationary.cumsum(dim=0)
        self._start_cdf[-1] = 1.0

    def step(self, dist: Tensor) -> Tensor:
        """Distribution over contexts (..., S) one token later."""
        V, S = self.vocab_size, self.transition.shape[0]
        # context s = (oldest, rest) -> (rest, next): sum over the oldest token
        flow = dist.reshape(*dist.shape[:-1], V, S // V, 1) * self.transition.view(V, S // V, V)
        return flow.sum(dim=-3).reshape(*dist.shape[:-1], S)

    def _stationary(self, tol: float = 1e-14, max_steps: int = 100_000) -> Tensor:
        S = self.transition.shape[0]
        dist = torch.full((S,), 1.0 / S, dtype=torch.float64)
        for _ in range(max_steps):
            new = self.step(dist)
            if (new - dist).abs().sum() < tol:
                return new / new.sum()
            dist = new
        raise RuntimeError("the Markov chain's stationary distribution did not converge")

    def context_ids(self, tokens: Tensor) -> Tensor:
        """(..., L) tokens -> (..., L) context id of the last ``k`` tokens ending at each
        position; positions ``< k - 1`` (incomplete context) get -1."""
        V, k = self.vocab_size, self.order
        ids = torch.zeros_like(tokens)
        for back in range(k):
            shifted = torch.roll(tokens, back, dims=-1)
            ids = ids + shifted * V**back
        ids[..., : k - 1] = -1
        return ids

    def sample(self, num: int, length: int, generator: torch.Generator) -> Tensor:
        """``num`` independent stationary sequences (num, length) (int64, CPU)."""
        V, k = self.vocab_size, self.order
        if length < k:
            raise ValueError(f"length must be >= order={k}, got {length}")
        # one uniform per drawn context/token, step-major so each step's slice is contiguous
        uniforms = torch.rand(length - k + 1, num, 1, generator=generator, dtype=torch.float64)
        state = torch.searchsorted(self._start_cdf, uniforms[0, :, 0]).clamp_(max=V**k - 1)
        digits = V ** torch.arange(k - 1, -1, -1)
        out = torch.empty(num, length, dtype=torch.long)
        out[:, :k] = torch.div(state[:, None], digits, rounding_mode="floor") % V
        for t in range(k, length):
            nxt = torch.searchsorted(self._cdf[state], uniforms[t - k + 1])  # (num, 1)
            nxt = nxt.squeeze(1).clamp_(max=V - 1)
            out[:, t] = nxt
            state = (state * V) % V**k + nxt
        return out

    def log_probs(self, tokens: Tensor) -> Tensor:
        """The true model's next-token log-probabilities (..., L, V) (float64) for the
        tokens (..., L); zeros (not normalised) where the context is incomplete."""
        ids = self.context_ids(tokens)
        out = self.transition.log()[ids.clamp(min=0)]
        return out.masked_fill((ids < 0)[..., None], 0.0)
