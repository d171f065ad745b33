"""Sequence metrics of slot outputs: decoding up to the first end token, Levenshtein
distance, word and phoneme error rates against one or several references.

A *slot model* outputs one token per position ``(P, B, T)``; its decoded sequence is
the tokens before the first :data:`END` (all ``T`` when there is none). References
``(B, R, T)`` hold up to ``R`` sequences per example, each written the same way (its
tokens, then :data:`END`); a reference row whose first entry is ``IGNORE`` is
absent (an example with fewer than ``R`` references). Everything is vectorised over
the population and the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._scoring import IGNORE

__all__ = ["END", "decode_lengths", "masked_tokens", "levenshtein", "edit_distance_reference",
           "sequence_errors"]

END = 0
"""Output id of the end / pad token: the decoded sequence stops before the first one."""


def decode_lengths(tokens: Tensor) -> Tensor:
    """Length of the decoded sequence of each row ``(..., T)``: index of the first
    :data:`END` (or of an ``IGNORE``), ``T`` when there is none."""
    stop = (tokens == END) | (tokens == IGNORE)
    T = tokens.shape[-1]
    index = torch.arange(T, device=tokens.device).expand_as(tokens)
    return torch.where(stop, index, torch.full_like(index, T)).min(dim=-1).values


def masked_tokens(tokens: Tensor) -> Tensor:
    """``tokens`` with every position from the first :data:`END` on set to :data:`END`, so
    two rows are equal exactly when their decoded sequences are."""
    lengths = decode_lengths(tokens)
    index = torch.arange(tokens.shape[-1], device=tokens.device)
    return torch.where(index < lengths.unsqueeze(-1), tokens, torch.zeros_like(tokens))


def levenshtein(a: Tensor, a_len: Tensor, b: Tensor, b_len: Tensor) -> Tensor:
    """Edit distance (insertions, deletions, substitutions; each costs 1) between the
    first ``a_len`` tokens of each row of ``a`` ``(M, Ta)`` and the first ``b_len`` of
    ``b`` ``(M, Tb)``; returns ``(M,)`` int64.

    Row-by-row dynamic programming: one row ``D[i, :]`` per token of ``a``; within a
    row the insertions chain is a running minimum (``cummin``), so the cost is
    ``O(Ta)`` vector operations of width ``M x Tb``.
    """
    M, Ta = a.shape
    Tb = b.shape[1]
    j = torch.arange(Tb + 1, device=a.device)
    prev = j.expand(M, Tb + 1).clone()  # D[0, j] = j
    result = prev.gather(1, b_len.view(M, 1)).view(M).clone()  # a_len == 0
    for i in range(1, Ta + 1):
        substitute = prev[:, :-1] + (a[:, i - 1:i] != b).long()  # (M, Tb)
        delete = prev[:, 1:] + 1
        tmp = torch.cat([torch.full((M, 1), i, device=a.device, dtype=prev.dtype),
                         torch.minimum(substitute, delete)], dim=1)
        cur = torch.cummin(tmp - j, dim=1).values + j  # D[i, j] = min_k tmp[k] + (j - k)
        row = cur.gather(1, b_len.view(M, 1)).view(M)
        result = torch.where(a_len == i, row, result)
        prev = cur
    return result


def edit_distance_reference(a: list, b: list) -> int:
    """The textbook O(len(a) len(b)) Levenshtein distance of two lists (for tests)."""
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, d[0] = d[0], i
        for k, y in enumerate(b, 1):
            previous, d[k] = d[k], min(d[k] + 1, d[k - 1] + 1, previous + (x != y))
    return d[len(b)]


def sequence_errors(hyp: Tensor, refs: Tensor, *, edits: bool = True) -> dict[str, Tensor]:
    """Word and token errors of decoded outputs against several references.

    Args:
        hyp: output tokens ``(P, B, T)`` (argmax or samples), decoded up to the first
            :data:`END`.
        refs: ``(B, R, T)`` references (tokens, then :data:`END`; absent rows start
            with ``IGNORE``); every example has at least one.
        edits: also compute Levenshtein distances (not needed for word correctness).
    Returns:
        ``correct`` ``(P, B)`` bool: the sequence equals one of the references;
        with ``edits``, ``edits`` ``(P, B)``: the distance to the closest reference
        (ties: the first listed) and ``ref_length`` ``(P, B)``: that reference's length.
    """
    P, B, T = hyp.shape
    R = refs.shape[1]
    present = refs[:, :, 0] != IGNORE  # (B, R)
    if not bool(present[:, 0].all()):
        raise ValueError("every example needs its first reference (refs[:, 0, 0] != IGNORE)")
    hyp_masked = masked_tokens(hyp)
    ref_masked = masked_tokens(refs)  # absent rows (IGNORE first) become empty
    if ref_masked.shape[-1] < T:
        pad = torch.zeros(B, R, T - ref_masked.shape[-1], dtype=refs.dtype, device=refs.device)
        ref_masked = torch.cat([ref_masked, pad], dim=-1)
    elif ref_masked.shape[-1] > T:
        raise ValueError(f"references are longer ({refs.shape[-1]}) than the outputs ({T})")
    equal = (hyp_masked.unsqueeze(2) == ref_masked.unsqueeze(0)).all(dim=-1)  # (P, B, R)
    result = {"correct": (equal & present).any(dim=-1)}
    if not edits:
        return result
    hyp_len = decode_lengths(hyp)  # (P, B)
    ref_len = decode_lengths(ref_masked)  # (B, R); absent rows: 0 (masked below)
    a = hyp.unsqueeze(2).expand(P, B, R, T).reshape(-1, T)
    a_len = hyp_len.unsqueeze(2).expand(P, B, R).reshape(-1)
    b = ref_masked.unsqueeze(0).expand(P, B, R, T).reshape(-1, T)
    b_len = ref_len.unsqueeze(0).expand(P, B, R).reshape(-1)
    dist = levenshtein(a, a_len, b, b_len).view(P, B, R)
    # absent rows never win; ties go to the first listed (made explicit: key = d R + r)
    dist = torch.where(present.unsqueeze(0), dist, torch.full_like(dist, 2 * T + 1))
    key = dist * R + torch.arange(R, device=dist.device)
    which = key.min(dim=-1).values % R
    result["edits"] = dist.gather(2, which.unsqueeze(-1)).squeeze(-1)
    result["ref_length"] = ref_len.unsqueeze(0).expand(P, B, R).gather(
        2, which.unsqueeze(-1)).squeeze(-1)
    return result
