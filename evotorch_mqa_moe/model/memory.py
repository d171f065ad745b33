"""Activation memory of the population pass and the chunk size that keeps it within a
budget (:func:`default_chunk_size`).
"""

from __future__ import annotations

import torch

from evotorch_mqa_moe._internal.validate import check_int

from .config import TransformerConfig


def _seq_len_for(config: TransformerConfig, rows: int, seq_len: int | None) -> int:
    """T for a memory estimate: the given one, else the worst case for ``rows`` token rows."""
    if seq_len is None:
        return max(1, min(rows, config.max_seq_len))  # B*T*T = rows*T grows with T
    return check_int("seq_len", seq_len, none_ok=True)


def bytes_per_individual(config: TransformerConfig, rows: int, element_size: int,
                          seq_len: int | None = None) -> int:
    """Peak activation bytes one individual adds to a chunk of the (no-grad) forward pass.

    ``rows`` = B*T token rows, ``seq_len`` = T (``None``: the worst case,
    ``min(rows, max_seq_len)``). Counts the tensors alive together at the widest
    point of the pass, per individual (M = B*T rows):

    * attention: residual ``x`` and its LayerNorm ``(M, D)`` each, the query and
      fused key/value projections ``(M, (H + 2K) hd)``, the scores and their
      softmax ``(B, H, T, T)`` each, the attended values ``(M, H hd)`` and the
      output projection ``(M, D)`` (+ transposed copies of q, k, v when K > 1);
    * mixture of experts: residual, LayerNorm, the input with a ones column and
      the expert output ``(M, D)`` each (plus the gate-weighted biases ``(M, D)``),
      gate logits and weights ``(M, E)``, the expert hidden units ``(M, E F)``
      (twice for GELU, which is not applied in place); attention gating adds its
      query/key ``(M, 2 hd)``, scores and softmax ``(B, T, T)`` and context ``(M, E)``;
    * the head: residual, final LayerNorm ``(M, D)`` and the outputs ``(M, O)``.

    The peak is the largest of the three; the chunk's outputs ``(M, O)``, kept
    until the pass ends, are added. Checked against measured peak memory in
    tests/test_memory.py.
    """
    c = config
    T = _seq_len_for(c, rows, seq_len)
    B = max(1, -(-rows // T))
    M, D, H, K, hd = rows, c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    E, Fd, O = c.num_experts, c.expert_dim, c.output_dim
    scores = B * H * T * T
    qkv = M * (H + 2 * K) * hd
    attn = 3 * M * D + qkv + M * H * hd + 2 * scores + (qkv + M * H * hd if K > 1 else 0)
    gates = M * E * (2 if c.top_k is None else 5)  # top-k: values, int64 indices, scatter
    hidden = M * E * Fd * (2 if c.activation == "gelu" else 1)
    if c.gating == "attention":  # gate query/key, (B, T, T) scores and softmax, context
        gates += M * 2 * hd + 2 * B * T * T + 2 * M * E
    moe = M * (5 * D + 2) + gates + hidden
    head = M * (2 * D + O)
    outputs = M * O
    return (max(attn, moe, head) + outputs) * element_size


def _fixed_bytes(config: TransformerConfig, seq_len: int, element_size: int) -> int:
    """Bytes the pass keeps once, whatever the chunk: the cached (T*G, T) attention bias
    and the (T, D) sinusoidal position table."""
    G = config.num_heads // config.num_kv_heads
    table = seq_len * config.embed_dim if config.positional in ("sinusoidal", "both") else 0
    return (seq_len * G * seq_len + table) * element_size


def default_chunk_size(config: TransformerConfig, rows: int, device: torch.device | str,
                       dtype: torch.dtype = torch.float32, memory_budget: int | None = None,
                       *, seq_len: int | None = None) -> int:
    """How many individuals to run at once so activations stay within ``memory_budget`` bytes.

    ``rows`` is B*T, the token rows each individual processes, and ``seq_len`` T
    (``None``: the worst case for ``rows``, ``min(rows, max_seq_len)``; pass it,
    as :func:`population_forward` does, since attention grows with B*T*T). The
    estimate counts the real tensors of the pass (see ``bytes_per_individual``);
    the chunk is at least 1, even when one individual alone exceeds the budget.
    The outputs of all chunks, ``P * B * T * O`` values (twice while they are
    concatenated at the end), come on top of the budget.

    The default budget keeps a chunk's expert hidden tensor in a CPU's cache
    (measured in bench/forward.py: chunks of ~16 at config A beat one big batch)
    and is far larger on accelerators, where big batches pay.
    """
    if memory_budget is None:
        memory_budget = (2 << 30) if torch.device(device).type != "cpu" else (24 << 20)
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    size = torch.empty(0, dtype=dtype).element_size()
    T = _seq_len_for(config, rows, seq_len)
    per = bytes_per_individual(config, rows, size, T)
    return max(1, (memory_budget - _fixed_bytes(config, T, size)) // max(per, 1))
