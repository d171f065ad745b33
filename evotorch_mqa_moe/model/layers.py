"""The layer math, written once: linear maps, LayerNorm, multi-query attention, the
mixture-of-experts gate and experts, and the sinusoidal position code.

Every function works on weights that may carry one leading population axis ``P``:
the :class:`~evotorch_mqa_moe.model.modules.MQAMoETransformer` module calls them with
its own parameters, the population pass with views sliced out of a flat ``(P, N)``
matrix, so one network and a whole population run the same code.

Shape legend: ``P`` population, ``B`` batch, ``T`` sequence length, ``M = B*T``
token rows, ``D`` embed_dim, ``H`` query heads, ``K`` key/value heads,
``G = H // K`` query heads per key/value head, ``hd`` head_dim, ``E`` experts,
``F`` expert_dim, ``O`` output_dim.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import LayerCache
from .config import TransformerConfig

# ----------------------------------------------------------------------------
# Layer math over weights with an optional leading population axis.
# Activations are (M, D) for one network and (P, M, D) for a population; weight
# matrices are (D_in, D_out) or (P, D_in, D_out); vectors (D,) or (P, D).
#
# A population's weight matrix may also be a *structured* weight instead of a
# (P, D_in, D_out) tensor: an object that stands for one and knows its own GEMM
# (:class:`evotorch_mqa_moe.lowrank.LowRankWeight`: shared W plus per-individual
# low-rank factors). The layer math reaches it through four operations only:
# ``linear(x, bias)`` (``x @ weight (+ bias)``), ``lookup(index)`` (rows of a table),
# ``weight[..., a:b]`` (a column slice) and ``.shape`` / ``.dim()``. Everything else
# (attention, gating, experts, norms, heads) is the same code for both kinds.
# ----------------------------------------------------------------------------


def _structured(weight: object) -> bool:
    """True for a structured population weight (not a plain tensor); see the note above."""
    return not isinstance(weight, Tensor)


def _row(vector: Tensor) -> Tensor:
    """(..., D) -> (..., 1, D): a per-network vector that broadcasts over token rows."""
    return vector.unsqueeze(-2)


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x @ weight + bias``: (..., M, I) x (..., I, O) -> (..., M, O), one GEMM per network.

    A structured population weight (see the note above) computes its own product."""
    if _structured(weight):
        return weight.linear(x, bias)
    if x.dim() == 2:
        return torch.addmm(bias, x, weight)
    return torch.baddbmm(_row(bias), x, weight)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last axis with per-network affine weights."""
    return torch.addcmul(_row(bias), F.layer_norm(x, x.shape[-1:], eps=eps), _row(weight))


@functools.lru_cache(maxsize=32)
def _score_bias(seq_len: int, group: int, causal: bool, device: torch.device,
                dtype: torch.dtype, offset: int = 0) -> Tensor:
    """Additive attention bias (T*G, offset + T) for query rows folded as (T*G): row
    t*G + g is position offset + t, and sees the keys of positions <= offset + t."""
    bias = torch.zeros(seq_len * group, offset + seq_len, device=device, dtype=dtype)
    if causal:
        t = torch.arange(seq_len, device=device)
        s = torch.arange(offset + seq_len, device=device)
        future = (s[None, :] > offset + t[:, None]).repeat_interleave(group, dim=0)
        bias.masked_fill_(future, float("-inf"))
    return bias


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, group: int, causal: bool,
            offset: int) -> Tensor:
    """softmax(q k^T * scale + mask) v over folded rows: q (.., T*G, d), k (.., L, d),
    v (.., L, e) with L = offset + T. One new query row per head (decoding, T = 1)
    sees every cached key, so it needs no mask."""
    T = q.shape[-2] // group
    if offset == 0 or T > 1:
        bias = _score_bias(T, group, causal, q.device, q.dtype, offset)
        scores = torch.baddbmm(bias, q, k.transpose(-1, -2), alpha=scale)
    else:
        scores = torch.bmm(q, k.transpose(-1, -2)).mul_(scale)
    return torch.bmm(scores.softmax(dim=-1), v)


def attention(
    x: Tensor,
    w_qkv: Tensor,
    b_qkv: Tensor,
    w_out: Tensor,
    b_out: Tensor,
    config: TransformerConfig,
    batch: int,
    cache: LayerCache | None = None,
) -> Tensor:
    """Multi-query (grouped-query) self-attention on token rows.

    Args:
        x: (M, D) or (P, M, D) with M = batch * T.
        w_qkv: fused projection (D, (H + 2K) * hd), with optional leading P.
        b_qkv: ((H + 2K) * hd,), optional leading P.
        w_out, b_out: output projection (H * hd, D) and (D,).
        cache: for incremental decoding (causal models): the tokens of ``x`` sit at
            positions ``[cache.offset, cache.offset + T)``; their keys and values are
            appended to the cache, (*lead, B, K, T, hd), and the queries attend over
            all cached positions.
    Returns:
        Same shape as ``x``.

    The G query heads that share one key/value head are folded into the query
    rows, (T*G, hd) against (T, hd), instead of repeating keys and values. For
    MQA (K = 1) every reshape here is a view: the query columns of the fused
    weight are projected on their own so the (M, H*hd) result is contiguous
    and reads as (B, T*H, hd) rows, and attention is two batched GEMMs.
    """
    H, K, hd = config.num_heads, config.num_kv_heads, config.head_dim
    G = H // K
    lead = x.shape[:-2]
    n = len(lead)
    T = x.shape[-2] // batch
    q = linear(x, w_qkv[..., : H * hd], b_qkv[..., : H * hd])  # (*lead, M, H*hd)
    kv = linear(x, w_qkv[..., H * hd :], b_qkv[..., H * hd :])  # (*lead, M, 2*K*hd)
    k, v = kv.view(*lead, batch, T, 2, K, hd).unbind(-3)  # (*lead, B, T, K, hd) each
    k, v = k.transpose(n + 1, n + 2), v.transpose(n + 1, n + 2)  # (*lead, B, K, T, hd)
    offset = 0
    if cache is not None:
        offset = cache.offset
        k, v = cache.append("k", k), cache.append("v", v)  # (*lead, B, K, offset + T, hd)
    L = offset + T
    if K == 1:
        q = q.view(-1, T * H, hd)  # (lead*B, T*G, hd), row t*G + g
    else:
        # (*lead, B, T, K, G, hd) -> (*lead, B, K, T, G, hd) -> (lead*B*K, T*G, hd)
        q = q.view(*lead, batch, T, K, G, hd).transpose(n + 1, n + 2).reshape(-1, T * G, hd)
    k, v = k.reshape(-1, L, hd), v.reshape(-1, L, hd)  # views for K = 1 and for a cache
    y = _attend(q, k, v, hd**-0.5, G, config.causal, offset)  # (.., T*G, hd)
    if K == 1:
        y = y.view(*lead, batch * T, H * hd)
    else:
        y = y.view(*lead, batch, K, T, G, hd).transpose(n + 1, n + 2).reshape(*lead, -1, H * hd)
    return linear(y, w_out, b_out)


def _stack_bias_row(weight: Tensor, bias: Tensor) -> Tensor:
    """(..., I, O) and (..., O) -> (..., I+1, O) with the bias as last row.

    A view when the bias follows the weight in memory, as it does for weights
    sliced out of flat solution vectors; a small copy otherwise, and always when
    autograd records: through the view, the bias genes got no gradient (0).
    """
    I, O = weight.shape[-2:]
    if torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad):
        return torch.cat([weight, bias.unsqueeze(-2)], dim=-2)
    try:
        adjacent = (
            weight.stride(-1) == 1 and weight.stride(-2) == O and bias.stride(-1) == 1
            and weight.stride()[:-2] == bias.stride()[:-1]
            and bias.data_ptr() == weight.data_ptr() + I * O * weight.element_size()
        )
    except RuntimeError:  # tensors without storage (torch.func transforms)
        adjacent = False
    if adjacent:
        return weight.as_strided((*weight.shape[:-2], I + 1, O), weight.stride())
    return torch.cat([weight, bias.unsqueeze(-2)], dim=-2)


def gate_weights(logits: Tensor, top_k: int | None) -> Tensor:
    """Expert weights (..., E) from gate logits: dense softmax, or softmax over the top k."""
    if top_k is None:
        return logits.softmax(dim=-1)
    top, index = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(-1, index, top.softmax(dim=-1))


def gate_logits(
    x: Tensor,
    w_gate: Tensor,
    b_gate: Tensor,
    config: TransformerConfig,
    batch: int | None = None,
    w_gate_qk: Tensor | None = None,
    b_gate_qk: Tensor | None = None,
    cache: LayerCache | None = None,
) -> Tensor:
    """Gate logits (*lead, M, E) of token rows x (*lead, M, D), M = batch * T.

    ``config.gating == "linear"``: ``x @ w_gate + b_gate``, each token alone.
    ``"attention"``: those linear logits ``v`` (M, E) plus their mix over the
    token's sequence, ``v + softmax(q k^T / sqrt(hd)) v`` with ``q, k`` from
    ``x @ w_gate_qk + b_gate_qk`` ((D, 2 hd), (2 hd,): query columns first), one
    head, causal when ``config.causal``: routing then depends on context.
    ``batch`` (B) is needed for attention gating only. ``cache``: as for
    :func:`attention`; the gate's keys and linear logits of past tokens are cached.
    """
    logits = linear(x, w_gate, b_gate)  # (*lead, M, E)
    if config.gating == "linear":
        return logits
    if w_gate_qk is None or b_gate_qk is None or batch is None:
        raise ValueError("gating='attention' needs w_gate_qk, b_gate_qk and batch")
    lead, M, E = x.shape[:-2], x.shape[-2], logits.shape[-1]
    T, dg = M // batch, w_gate_qk.shape[-1] // 2
    q, k = linear(x, w_gate_qk, b_gate_qk).view(-1, T, 2, dg).unbind(-2)  # (lead*B, T, dg)
    values, offset = logits.reshape(-1, T, E), 0
    if cache is not None:
        offset = cache.offset
        k, values = cache.append("gate_k", k), cache.append("gate_v", values)
    context = _attend(q, k, values, dg**-0.5, 1, config.causal, offset)  # (lead*B, T, E)
    return logits + context.view(*lead, M, E)


def moe_gates(
    x: Tensor,
    w_gate: Tensor,
    b_gate: Tensor,
    config: TransformerConfig,
    batch: int | None = None,
    w_gate_qk: Tensor | None = None,
    b_gate_qk: Tensor | None = None,
    cache: LayerCache | None = None,
) -> Tensor:
    """Expert weights (*lead, M, E) of token rows (*lead, M, D): :func:`gate_logits`, then
    the dense softmax or the top-k softmax (:func:`gate_weights`). Rows sum to 1."""
    return gate_weights(gate_logits(x, w_gate, b_gate, config, batch, w_gate_qk, b_gate_qk,
                                    cache), config.top_k)


def mixture_of_experts(
    x: Tensor,
    w_gate: Tensor,
    b_gate: Tensor,
    w_in: Tensor,
    b_in: Tensor,
    w_out: Tensor,
    b_out: Tensor,
    config: TransformerConfig,
    batch: int | None = None,
    w_gate_qk: Tensor | None = None,
    b_gate_qk: Tensor | None = None,
    cache: LayerCache | None = None,
) -> Tensor:
    """Gated mixture of expert MLPs on token rows.

    Args:
        x: (M, D) or (P, M, D), M = batch * T.
        w_gate, b_gate: (D, E), (E,).
        batch, w_gate_qk, b_gate_qk: B and the gate's query/key projection
            (D, 2 hd), (2 hd,), for ``config.gating == "attention"`` only
            (see :func:`gate_logits`); ``cache`` for its context in incremental decoding.
        w_in, b_in: (D, E, F), (E, F): input dim first, so all experts'
            first layers run as one (M, D) x (D, E*F) GEMM.
        w_out, b_out: (E, F, D), (E, D): the second layers, run as one
            (M, E*F) x (E*F, D) GEMM on gate-weighted hidden units.
    Returns:
        Same shape as ``x``: ``sum_e gate_e * expert_e(x)``.

    With ``top_k`` the unchosen experts get weight exactly 0; all experts are
    still computed, which for a handful of small experts is faster than
    gathering tokens per expert and keeps the pass a fixed set of GEMMs.
    """
    E, Fd, D = config.num_experts, config.expert_dim, config.embed_dim
    lead = x.shape[:-2]
    M = x.shape[-2]
    gates = moe_gates(x, w_gate, b_gate, config, batch, w_gate_qk, b_gate_qk, cache)
    if _structured(w_in):  # its own GEMM over the (D, E*F) matrix view
        hidden = linear(x, w_in, b_in.flatten(-2))  # (*lead, M, E*F)
    else:
        # The bias rides in the GEMM as an extra input row against a ones column:
        # cheaper than broadcasting it into the wide (M, E*F) output first.
        ones = torch.ones(*lead, M, 1, device=x.device, dtype=x.dtype)
        w_in_b = _stack_bias_row(w_in.flatten(-2), b_in.flatten(-2))  # (*lead, D+1, E*F)
        hidden = torch.matmul(torch.cat([x, ones], dim=-1), w_in_b)  # (*lead, M, E*F)
    hidden = F.gelu(hidden) if config.activation == "gelu" else hidden.relu_()
    if hidden.requires_grad:  # backprop needs the activation's output intact
        hidden = (hidden.view(*lead, M, E, Fd) * gates.unsqueeze(-1)).view(*lead, M, E * Fd)
    else:  # in place: this is the largest tensor of the pass
        hidden.view(*lead, M, E, Fd).mul_(gates.unsqueeze(-1))
    if _structured(w_out):  # its own GEMM over the (E*F, D) matrix view
        out = w_out.linear(hidden, None)
    else:
        out = torch.matmul(hidden, w_out.reshape(*w_out.shape[:-3], E * Fd, D))
    return out.add_(torch.matmul(gates, b_out))  # gate-weighted expert biases


@functools.lru_cache(maxsize=32)
def sinusoidal_positions(seq_len: int, dim: int, device=None, dtype=None) -> Tensor:
    """The fixed sine/cosine position code of Vaswani et al. (2017): (T, D).

    Cached (built once per shape, device and dtype); do not modify the result in place.
    """
    position = torch.arange(seq_len, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(seq_len, dim, device=device, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.to(dtype or torch.get_default_dtype())
