"""Unigram and bigram baselines: bits per character of add-one-smoothed counts."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._scoring import IGNORE

__all__ = ["ngram_bits_per_char"]


def ngram_bits_per_char(train: Tensor, inputs: Tensor, targets: Tensor, vocab_size: int,
                        order: int) -> float:
    """Bits per scored target of an n-gram model fitted on training sequences.

    Args:
        train: (N, L) token sequences to count n-grams in (within each row).
        inputs: (B, T) test inputs; ``inputs[:, t]`` is the token before ``targets[:, t]``.
        targets: (B, T) test next tokens, or IGNORE.
        order: 1 (unigram: ``P(x)``) or 2 (bigram: ``P(x | previous token)``), with
            add-one (Laplace) smoothing so unseen events keep a finite cost.
    """
    V = vocab_size
    scored = targets != IGNORE
    nxt = targets[scored]
    if order == 1:
        counts = torch.bincount(train.reshape(-1), minlength=V).double() + 1
        logp = (counts / counts.sum()).log()[nxt]
    elif order == 2:
        pairs = train[:, :-1] * V + train[:, 1:]
        counts = torch.bincount(pairs.reshape(-1), minlength=V * V).double().view(V, V) + 1
        table = (counts / counts.sum(dim=1, keepdim=True)).log()
        logp = table[inputs[scored], nxt]
    else:
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    return float(-logp.mean() / math.log(2))
