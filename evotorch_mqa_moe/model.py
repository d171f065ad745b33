"""The MQA/MoE transformer, written once for one network and for a whole population.

Every layer is a function over weights that may carry one leading population
axis ``P``: the :class:`MQAMoETransformer` module calls them with its own
parameters (no population axis), :func:`population_forward` with views sliced
out of a flat ``(P, N)`` matrix of solutions. Both therefore run the same code.

Shape legend: ``P`` population, ``B`` batch, ``T`` sequence length, ``M = B*T``
token rows, ``D`` embed_dim, ``H`` query heads, ``K`` key/value heads,
``G = H // K`` query heads per key/value head, ``hd`` head_dim, ``E`` experts,
``F`` expert_dim, ``O`` output_dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_int
from .config import TransformerConfig

__all__ = [
    "MultiQueryAttention",
    "MixtureOfExperts",
    "gate_logits",
    "moe_gates",
    "EncoderLayer",
    "MQAMoETransformer",
    "PopulationModel",
    "population_forward",
    "parameter_layout",
    "init_parameters",
    "num_parameters",
    "default_chunk_size",
    "prepare_inputs",
    "COMPUTE_DTYPES",
    "resolve_dtype",
]


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
                dtype: torch.dtype) -> Tensor:
    """Additive attention bias for query rows folded as (T*G): row t*G + g is position t."""
    bias = torch.zeros(seq_len * group, seq_len, device=device, dtype=dtype)
    if causal:
        t = torch.arange(seq_len, device=device)
        future = (t[None, :] > t[:, None]).repeat_interleave(group, dim=0)
        bias.masked_fill_(future, float("-inf"))
    return bias


def attention(
    x: Tensor,
    w_qkv: Tensor,
    b_qkv: Tensor,
    w_out: Tensor,
    b_out: Tensor,
    config: TransformerConfig,
    batch: int,
) -> Tensor:
    """Multi-query (grouped-query) self-attention on token rows.

    Args:
        x: (M, D) or (P, M, D) with M = batch * T.
        w_qkv: fused projection (D, (H + 2K) * hd), with optional leading P.
        b_qkv: ((H + 2K) * hd,), optional leading P.
        w_out, b_out: output projection (H * hd, D) and (D,).
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
    if K == 1:
        q = q.view(-1, T * H, hd)  # (lead*B, T*G, hd), row t*G + g
        k, v = k.reshape(-1, T, hd), v.reshape(-1, T, hd)  # views: (lead*B, T, hd)
    else:
        # (*lead, B, T, K, G, hd) -> (*lead, B, K, T, G, hd) -> (lead*B*K, T*G, hd)
        q = q.view(*lead, batch, T, K, G, hd).transpose(n + 1, n + 2).reshape(-1, T * G, hd)
        k = k.transpose(n + 1, n + 2).reshape(-1, T, hd)
        v = v.transpose(n + 1, n + 2).reshape(-1, T, hd)
    bias = _score_bias(T, G, config.causal, x.device, x.dtype)
    scores = torch.baddbmm(bias, q, k.transpose(-1, -2), alpha=hd**-0.5)  # (.., T*G, T)
    y = torch.bmm(scores.softmax(dim=-1), v)  # (.., T*G, hd)
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
) -> Tensor:
    """Gate logits (*lead, M, E) of token rows x (*lead, M, D), M = batch * T.

    ``config.gating == "linear"``: ``x @ w_gate + b_gate``, each token alone.
    ``"attention"``: those linear logits ``v`` (M, E) plus their mix over the
    token's sequence, ``v + softmax(q k^T / sqrt(hd)) v`` with ``q, k`` from
    ``x @ w_gate_qk + b_gate_qk`` ((D, 2 hd), (2 hd,): query columns first), one
    head, causal when ``config.causal``: routing then depends on context.
    ``batch`` (B) is needed for attention gating only.
    """
    logits = linear(x, w_gate, b_gate)  # (*lead, M, E)
    if config.gating == "linear":
        return logits
    if w_gate_qk is None or b_gate_qk is None or batch is None:
        raise ValueError("gating='attention' needs w_gate_qk, b_gate_qk and batch")
    lead, M, E = x.shape[:-2], x.shape[-2], logits.shape[-1]
    T, dg = M // batch, w_gate_qk.shape[-1] // 2
    q, k = linear(x, w_gate_qk, b_gate_qk).view(-1, T, 2, dg).unbind(-2)  # (lead*B, T, dg)
    bias = _score_bias(T, 1, config.causal, x.device, x.dtype)  # (T, T)
    scores = torch.baddbmm(bias, q, k.transpose(-1, -2), alpha=dg**-0.5)  # (lead*B, T, T)
    context = torch.bmm(scores.softmax(dim=-1), logits.reshape(-1, T, E))  # (lead*B, T, E)
    return logits + context.view(*lead, M, E)


def moe_gates(
    x: Tensor,
    w_gate: Tensor,
    b_gate: Tensor,
    config: TransformerConfig,
    batch: int | None = None,
    w_gate_qk: Tensor | None = None,
    b_gate_qk: Tensor | None = None,
) -> Tensor:
    """Expert weights (*lead, M, E) of token rows (*lead, M, D): :func:`gate_logits`, then
    the dense softmax or the top-k softmax (:func:`gate_weights`). Rows sum to 1."""
    return gate_weights(gate_logits(x, w_gate, b_gate, config, batch, w_gate_qk, b_gate_qk),
                        config.top_k)


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
) -> Tensor:
    """Gated mixture of expert MLPs on token rows.

    Args:
        x: (M, D) or (P, M, D), M = batch * T.
        w_gate, b_gate: (D, E), (E,).
        batch, w_gate_qk, b_gate_qk: B and the gate's query/key projection
            (D, 2 hd), (2 hd,), for ``config.gating == "attention"`` only
            (see :func:`gate_logits`).
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
    gates = moe_gates(x, w_gate, b_gate, config, batch, w_gate_qk, b_gate_qk)  # (*lead, M, E)
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


def transformer_forward(
    config: TransformerConfig, weights: Mapping[str, Tensor], inputs: Tensor,
    *, gates: list[Tensor] | None = None,
) -> Tensor:
    """The whole network on validated inputs.

    Args:
        weights: parameter name -> tensor, named as in :class:`MQAMoETransformer`,
            each with no leading axis (one network) or a leading population axis P.
        inputs: tokens (B, T) or (P, B, T); vectors (B, T, I) or (P, B, T, I);
            a leading P only when the weights have one.
        gates: if a list, each layer appends its expert weights (*lead, B*T, E).
    Returns:
        (B, T, O), or (B, O) when pooled, with the weights' leading P in front.
    """
    c = config
    pop = weights["head.weight"].dim() == 3
    shared = inputs.dim() == (2 if c.token_inputs else 3)
    B, T = inputs.shape[-2:] if c.token_inputs else inputs.shape[-3:-1]
    # --- embedding: (*lead, M, D)
    if c.token_inputs:
        table = weights["embed.weight"]  # (V, D) or (P, V, D)
        if _structured(table):
            x = table.lookup(inputs.reshape(*inputs.shape[:-2], B * T))  # (P, M, D)
        elif not pop:
            x = F.embedding(inputs.reshape(B * T), table)
        elif shared:
            x = table[:, inputs.reshape(B * T)]
        else:
            rows = torch.arange(table.shape[0], device=inputs.device)[:, None]
            x = table[rows, inputs.reshape(-1, B * T)]
    else:
        vec = inputs.reshape(*inputs.shape[:-3], B * T, inputs.shape[-1])
        if pop and shared:
            vec = vec.expand(weights["embed.weight"].shape[0], *vec.shape)
        x = linear(vec, weights["embed.weight"], weights["embed.bias"])
    lead = x.shape[:-2]
    if c.positional in ("learned", "both"):
        pos = weights["pos_embed"]  # (T_max, D) or (P, T_max, D)
        if _structured(pos):
            pos = pos.lookup(torch.arange(T, device=x.device))  # (P, T, D)
        else:
            pos = pos[..., :T, :]  # (T, D) or (P, T, D)
        x = (x.view(*lead, B, T, -1) + pos.unsqueeze(-3)).view(*lead, B * T, -1)
    if c.positional in ("sinusoidal", "both"):
        table = sinusoidal_positions(T, c.embed_dim, x.device, x.dtype)
        x = (x.view(*lead, B, T, -1) + table).view(*lead, B * T, -1)
    # --- encoder layers
    for i in range(c.num_layers):
        prefix = f"layers.{i}."
        w = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        x = encoder_layer(x, w, c, B, gates)
    if c.norm == "pre":
        x = layer_norm(x, weights["final_norm.weight"], weights["final_norm.bias"], c.norm_eps)
    # --- pooling and head
    if c.pooling is not None:
        seq = x.view(*lead, B, T, -1)
        if c.pooling == "mean":
            x = seq.mean(dim=-2)
        else:
            x = seq[..., 0 if c.pooling == "first" else -1, :]
        return linear(x, weights["head.weight"], weights["head.bias"])  # (*lead, B, O)
    out = linear(x, weights["head.weight"], weights["head.bias"])
    return out.view(*lead, B, T, c.output_dim)


def encoder_layer(x: Tensor, w: Mapping[str, Tensor], c: TransformerConfig, batch: int,
                  gates: list[Tensor] | None = None) -> Tensor:
    """One encoder layer (attention + mixture of experts) on token rows (*lead, M, D).

    ``gates``: if a list, the layer appends its expert weights (*lead, M, E) to it."""

    def attn(h: Tensor) -> Tensor:
        return attention(h, w["attn.qkv_weight"], w["attn.qkv_bias"], w["attn.out_weight"],
                         w["attn.out_bias"], c, batch)

    def moe(h: Tensor) -> Tensor:
        if gates is not None:
            gates.append(moe_gates(h, w["moe.gate_weight"], w["moe.gate_bias"], c, batch,
                                   w.get("moe.gate_qk_weight"), w.get("moe.gate_qk_bias")))
        return mixture_of_experts(h, w["moe.gate_weight"], w["moe.gate_bias"],
                                  w["moe.in_weight"], w["moe.in_bias"], w["moe.out_weight"],
                                  w["moe.out_bias"], c, batch, w.get("moe.gate_qk_weight"),
                                  w.get("moe.gate_qk_bias"))

    def norm(h: Tensor, which: str) -> Tensor:
        return layer_norm(h, w[f"{which}.weight"], w[f"{which}.bias"], c.norm_eps)

    if c.norm == "pre":
        x = x + attn(norm(x, "norm1"))
        return x + moe(norm(x, "norm2"))
    x = norm(x + attn(x), "norm1")
    return norm(x + moe(x), "norm2")


# ----------------------------------------------------------------------------
# nn.Module front door
# ----------------------------------------------------------------------------


# Every parameter carries its initialisation rule, so that one network
# (MQAMoETransformer.reset_parameters) and a whole population
# (init_parameters) are drawn from exactly the same distributions.
#   ("uniform", b): U(-b, b), b = 1/sqrt(fan_in), nn.Linear's default
#   ("normal", s):  N(0, s^2)
#   ("const", c):   filled with c (LayerNorm weight 1, bias 0)


def _param(*shape: int, init: tuple[str, float], device=None, dtype=None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))
    p.init_rule = init
    return p


def _fan_in(fan_in: int) -> tuple[str, float]:
    return ("uniform", 1.0 / math.sqrt(fan_in))


def _apply_init(tensor: Tensor, rule: tuple[str, float], generator=None) -> None:
    kind, value = rule
    if kind == "uniform":
        tensor.uniform_(-value, value, generator=generator)
    elif kind == "normal":
        tensor.normal_(0.0, value, generator=generator)
    else:
        tensor.fill_(value)


class _Initialised(nn.Module):
    """A module whose parameters carry init rules; ``reset_parameters`` draws them."""

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh weights, in registration order, from ``generator`` (or torch's RNG)."""
        for p in self.parameters():
            _apply_init(p, p.init_rule, generator)

    def _init_unless_meta(self, skip: bool) -> None:
        if not skip and next(self.parameters()).device.type != "meta":
            self.reset_parameters()


class _LayerNorm(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = _param(dim, init=("const", 1.0), device=device, dtype=dtype)
        self.bias = _param(dim, init=("const", 0.0), device=device, dtype=dtype)


class MultiQueryAttention(_Initialised):
    """Self-attention where all query heads share ``num_kv_heads`` key/value heads.

    Parameters: ``qkv_weight`` (D, (H + 2K) * hd) fusing the query, key and value
    projections (in that order), ``qkv_bias``, ``out_weight`` (H * hd, D), ``out_bias``.
    Input and output: (B, T, D).
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None, _skip_init=False):
        super().__init__()
        self.config = config
        D, width = config.embed_dim, (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        kw = dict(device=device, dtype=dtype)
        self.qkv_weight = _param(D, width, init=_fan_in(D), **kw)
        self.qkv_bias = _param(width, init=_fan_in(D), **kw)
        self.out_weight = _param(config.num_heads * config.head_dim, D, init=_fan_in(D), **kw)
        self.out_bias = _param(D, init=_fan_in(D), **kw)
        self._init_unless_meta(_skip_init)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        y = attention(x.reshape(B * T, D), self.qkv_weight, self.qkv_bias, self.out_weight,
                      self.out_bias, self.config, B)
        return y.view(B, T, D)


class MixtureOfExperts(_Initialised):
    """A softmax gate (dense or top-k) over ``num_experts`` two-layer MLPs, per token.

    Parameters: ``gate_weight`` (D, E), ``gate_bias`` (E,), then, with
    ``config.gating == "attention"`` only, ``gate_qk_weight`` (D, 2 hd) and
    ``gate_qk_bias`` (2 hd,) (the gate's query/key projection, see
    :func:`gate_logits`), then ``in_weight`` (D, E, F), ``in_bias`` (E, F),
    ``out_weight`` (E, F, D), ``out_bias`` (E, D).
    Input and output: (B, T, D).
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None, _skip_init=False):
        super().__init__()
        self.config = config
        D, E, Fd = config.embed_dim, config.num_experts, config.expert_dim
        kw = dict(device=device, dtype=dtype)
        self.gate_weight = _param(D, E, init=_fan_in(D), **kw)
        self.gate_bias = _param(E, init=_fan_in(D), **kw)
        if config.gating == "attention":
            width = 2 * config.head_dim
            self.gate_qk_weight = _param(D, width, init=_fan_in(D), **kw)
            self.gate_qk_bias = _param(width, init=_fan_in(D), **kw)
        self.in_weight = _param(D, E, Fd, init=_fan_in(D), **kw)
        self.in_bias = _param(E, Fd, init=_fan_in(D), **kw)
        self.out_weight = _param(E, Fd, D, init=_fan_in(Fd), **kw)
        self.out_bias = _param(E, D, init=_fan_in(Fd), **kw)
        self._init_unless_meta(_skip_init)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        y = mixture_of_experts(x.reshape(B * T, D), self.gate_weight, self.gate_bias,
                               self.in_weight, self.in_bias, self.out_weight, self.out_bias,
                               self.config, B, *self._gate_qk())
        return y.view(B, T, D)

    def _gate_qk(self) -> tuple[Tensor | None, Tensor | None]:
        return getattr(self, "gate_qk_weight", None), getattr(self, "gate_qk_bias", None)

    def gates(self, x: Tensor) -> Tensor:
        """Expert weights (B, T, E) this block gives the tokens of its input x (B, T, D)."""
        B, T, D = x.shape
        return moe_gates(x.reshape(B * T, D), self.gate_weight, self.gate_bias, self.config, B,
                         *self._gate_qk()).view(B, T, -1)


class EncoderLayer(_Initialised):
    """Attention then mixture of experts, each with a residual and LayerNorm (pre or post)."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None, _skip_init=False):
        super().__init__()
        self.config = config
        self.norm1 = _LayerNorm(config.embed_dim, device, dtype)
        self.attn = MultiQueryAttention(config, device, dtype, _skip_init=True)
        self.norm2 = _LayerNorm(config.embed_dim, device, dtype)
        self.moe = MixtureOfExperts(config, device, dtype, _skip_init=True)
        self._init_unless_meta(_skip_init)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return encoder_layer(x.reshape(B * T, D), dict(self.named_parameters()), self.config,
                             B).view(B, T, D)


class _Embedding(nn.Module):
    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        if config.token_inputs:
            # nn.Embedding's N(0, 1): on the scale of the sinusoidal code.
            self.weight = _param(config.vocab_size, config.embed_dim, init=("normal", 1.0), **kw)
        else:
            fan_in = _fan_in(config.input_dim)
            self.weight = _param(config.input_dim, config.embed_dim, init=fan_in, **kw)
            self.bias = _param(config.embed_dim, init=fan_in, **kw)


class _Head(nn.Module):
    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        D, kw = config.embed_dim, dict(device=device, dtype=dtype)
        self.weight = _param(D, config.output_dim, init=_fan_in(D), **kw)
        self.bias = _param(config.output_dim, init=_fan_in(D), **kw)


class MQAMoETransformer(_Initialised):
    """A transformer encoder of multi-query attention and mixture-of-experts layers.

    ``forward(inputs)``: tokens (B, T) (or vectors (B, T, input_dim)) ->
    (B, T, output_dim), or (B, output_dim) when ``config.pooling`` is set.

    The parameters are registered in the order of the flat solution vectors that
    EvoTorch evolves (``parameters_to_vector(model.parameters())``), so
    ``vector_to_parameters(values[i], model.parameters())`` gives the network that
    :func:`population_forward` evaluated as row ``i``.
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embed = _Embedding(config, device, dtype)
        if config.positional in ("learned", "both"):
            self.pos_embed = _param(config.max_seq_len, config.embed_dim, init=("normal", 0.5),
                                    device=device, dtype=dtype)
        self.layers = nn.ModuleList(EncoderLayer(config, device, dtype, _skip_init=True)
                                    for _ in range(config.num_layers))
        if config.norm == "pre":
            self.final_norm = _LayerNorm(config.embed_dim, device, dtype)
        self.head = _Head(config, device, dtype)
        self._init_unless_meta(False)

    def forward(self, inputs: Tensor) -> Tensor:
        check_inputs(self.config, inputs, popsize=None)
        if self.config.token_inputs:
            inputs = _as_index(inputs)
        return transformer_forward(self.config, dict(self.named_parameters()), inputs)

    def routing(self, inputs: Tensor) -> Tensor:
        """Expert weights (num_layers, B, T, E) every layer's gate gives each token of
        ``inputs`` (tokens (B, T) or vectors (B, T, I)); rows sum to 1."""
        check_inputs(self.config, inputs, popsize=None)
        if self.config.token_inputs:
            inputs = _as_index(inputs)
        gates: list[Tensor] = []
        transformer_forward(self.config, dict(self.named_parameters()), inputs, gates=gates)
        B, T = inputs.shape[:2]
        return torch.stack(gates).view(self.config.num_layers, B, T, -1)


# ----------------------------------------------------------------------------
# Population front door
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _layout_with_init(config: TransformerConfig) -> tuple[tuple[str, tuple[int, ...], tuple], ...]:
    model = MQAMoETransformer(config, device="meta")
    return tuple((n, tuple(p.shape), p.init_rule) for n, p in model.named_parameters())


def parameter_layout(config: TransformerConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter, in flat-vector (registration) order."""
    return tuple((name, shape) for name, shape, _ in _layout_with_init(config))


def init_parameters(
    config: TransformerConfig,
    popsize: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """(popsize, N) independently initialised networks, as flat solution vectors.

    The distributions are the module's own (LayerNorm weights 1, linear layers
    U(+-1/sqrt(fan_in)), token embeddings N(0, 1)), so a population starts as
    real networks rather than EvoTorch's default of near-zero vectors.
    ``generator`` (on ``device``) makes the draw repeatable.
    """
    popsize = check_int("popsize", popsize)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    out = torch.empty(popsize, num_parameters(config), device=device,
                      dtype=dtype or torch.get_default_dtype())
    offset = 0
    for _, shape, rule in _layout_with_init(config):
        block = out[:, offset : offset + math.prod(shape)]
        _apply_init(block, rule, generator)
        offset += block.shape[1]
    return out


def num_parameters(config: TransformerConfig) -> int:
    """N, the length of one solution vector."""
    return sum(math.prod(shape) for _, shape in parameter_layout(config))


def check_inputs(config: TransformerConfig, inputs: Tensor, popsize: int | None, *,
                 token_range: bool = True) -> None:
    """Raise ``ValueError``/``TypeError`` naming the problem if ``inputs`` do not fit.

    Shapes and dtypes are checked without touching the data. ``token_range``:
    also check that token ids lie in ``[0, vocab_size)``, which reads one pair of
    numbers back from the device (one host synchronisation): check once per batch,
    not per chunk; :func:`population_forward` defers it to the end of its pass.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    base = 2 if config.token_inputs else 3
    what = "tokens (B, T)" if config.token_inputs else f"vectors (B, T, {config.input_dim})"
    ranks = (base,) if popsize is None else (base, base + 1)
    if inputs.dim() not in ranks:
        per = "" if popsize is None else f" or per individual (P={popsize}, ...)"
        raise ValueError(f"inputs must be {what}{per}, got shape {tuple(inputs.shape)}")
    if popsize is not None and inputs.dim() == base + 1 and inputs.shape[0] != popsize:
        raise ValueError(
            f"per-individual inputs have {inputs.shape[0]} rows but the population has {popsize}"
        )
    T = inputs.shape[-1] if config.token_inputs else inputs.shape[-2]
    if T < 1 or T > config.max_seq_len:
        raise ValueError(f"sequence length {T} is outside [1, max_seq_len={config.max_seq_len}]")
    if inputs.numel() == 0:
        raise ValueError(f"inputs are empty: shape {tuple(inputs.shape)}")
    if config.token_inputs:
        if inputs.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"token inputs must be an integer tensor, got dtype {inputs.dtype}")
        if token_range:
            _raise_unless_in_vocab(config, _token_bounds(inputs))
    else:
        if not inputs.is_floating_point():
            raise TypeError(f"vector inputs must be floating point, got dtype {inputs.dtype}")
        if inputs.shape[-1] != config.input_dim:
            raise ValueError(
                f"vector inputs have width {inputs.shape[-1]}, "
                f"expected input_dim={config.input_dim}"
            )


def _as_index(tokens: Tensor) -> Tensor:
    """Token ids as int64/int32, the dtypes embedding lookups accept (uint8 would be a mask)."""
    return tokens if tokens.dtype in (torch.int64, torch.int32) else tokens.long()


def _token_bounds(inputs: Tensor) -> Tensor:
    """(2,) int64 smallest and largest token id, left on ``inputs``' device (no read-back)."""
    lo, hi = torch.aminmax(inputs)
    return torch.stack([lo, hi]).long()


def _raise_unless_in_vocab(config: TransformerConfig, bounds: Tensor) -> None:
    """Read ``bounds`` (from :func:`_token_bounds`) back, once, and name a token id out of range."""
    lo, hi = bounds.tolist()
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside [0, vocab_size={config.vocab_size})")


def _seq_len_for(config: TransformerConfig, rows: int, seq_len: int | None) -> int:
    """T for a memory estimate: the given one, else the worst case for ``rows`` token rows."""
    if seq_len is None:
        return max(1, min(rows, config.max_seq_len))  # B*T*T = rows*T grows with T
    return check_int("seq_len", seq_len, none_ok=True)


def _bytes_per_individual(config: TransformerConfig, rows: int, element_size: int,
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
    estimate counts the real tensors of the pass (see ``_bytes_per_individual``);
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
    per = _bytes_per_individual(config, rows, size, T)
    return max(1, (memory_budget - _fixed_bytes(config, T, size)) // max(per, 1))


def _weight_views(config: TransformerConfig, params: Tensor) -> dict[str, Tensor]:
    """name -> (P, *shape) views into the (P, N) matrix (no copies)."""
    views, offset = {}, 0
    for name, shape in parameter_layout(config):
        size = math.prod(shape)
        views[name] = params[:, offset : offset + size].view(params.shape[0], *shape)
        offset += size
    return views


def prepare_inputs(config: TransformerConfig, inputs: Tensor, popsize: int,
                   device: torch.device, dtype: torch.dtype, *, validate: bool = True
                   ) -> tuple[Tensor, Tensor | None, bool]:
    """Check ``inputs`` for a population pass and make them ready for the layer math.

    Shared by both population front doors (:func:`population_forward` and
    :func:`evotorch_mqa_moe.lowrank.lowrank_population_forward`). Token ids become
    int64/int32 and, with ``validate``, are clamped into ``[0, vocab_size)`` for the
    pass: the returned ``bounds`` (2,) (left on the device, no read-back) go to
    :func:`_raise_unless_in_vocab` once the pass is queued. Vectors take ``dtype``.

    Returns:
        ``(inputs, bounds or None, per_individual)``; ``per_individual`` is True for
        inputs with a leading population axis (P, B, T[, I]).
    """
    check_inputs(config, inputs, popsize=popsize, token_range=False)
    if inputs.device != torch.device(device):
        raise ValueError(f"inputs are on {inputs.device} but params on {device}")
    bounds = None
    if config.token_inputs and validate:
        # No read-back before the pass is queued: out-of-range ids would fail inside
        # the embedding (a device-side assert on a GPU), so they are clamped for the
        # pass and reported, by value, at its end.
        bounds = _token_bounds(inputs)
        inputs = _as_index(inputs).clamp(0, config.vocab_size - 1)
    elif config.token_inputs:
        inputs = _as_index(inputs)
    if not config.token_inputs and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    return inputs, bounds, inputs.dim() == (3 if config.token_inputs else 4)


def population_forward(
    config: TransformerConfig,
    params: Tensor,
    inputs: Tensor,
    *,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    validate: bool = True,
) -> Tensor:
    """Evaluate a whole population of networks in one vectorised pass.

    Args:
        config: the architecture shared by all individuals.
        params: (P, N) flat parameter vectors, N = :func:`num_parameters`, in the
            order of ``parameters_to_vector(MQAMoETransformer(config).parameters())``.
        inputs: shared by all individuals, tokens (B, T) / vectors (B, T, I), or
            one batch per individual, (P, B, T) / (P, B, T, I).
        chunk_size: individuals per vectorised chunk; default from ``memory_budget``.
        memory_budget: activation bytes a chunk may use (see :func:`default_chunk_size`).
        validate: check that token ids lie in ``[0, vocab_size)``; ``False`` when the
            caller has already done so for this batch (:func:`check_inputs`), e.g.
            when it runs one batch chunk by chunk. Shapes are always checked.
    Returns:
        (P, B, T, O), or (P, B, O) when the config pools. Row ``i`` equals
        ``MQAMoETransformer(config)`` loaded with ``params[i]`` applied to the inputs.

    The pass reads nothing back from the device until all its work is queued: the
    token range is reduced on the device, the ids are clamped for the pass, and
    the one read-back comes at the end (a ``ValueError`` names a bad id).
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    if not isinstance(params, Tensor) or params.dim() != 2:
        shape = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
        raise ValueError(f"params must be a (P, N) tensor, got {shape}")
    N = num_parameters(config)
    if params.shape[1] != N:
        raise ValueError(f"params have {params.shape[1]} columns; this config has N={N} parameters")
    if not params.is_floating_point():
        raise TypeError(f"params must be floating point, got dtype {params.dtype}")
    P = params.shape[0]
    if P == 0:
        raise ValueError("params hold no individuals (P=0)")
    if type(params) is not Tensor:  # e.g. EvoTorch's ReadOnlyTensor: compute on plain tensors
        params = params.as_subclass(Tensor)
    if params.stride(-1) != 1:
        params = params.contiguous()
    inputs, bounds, per_individual = prepare_inputs(config, inputs, P, params.device,
                                                    params.dtype, validate=validate)
    if chunk_size is None:
        B, T = (inputs.shape[-2:] if config.token_inputs else inputs.shape[-3:-1])
        chunk_size = default_chunk_size(config, B * T, params.device, params.dtype,
                                        memory_budget, seq_len=T)
    else:
        chunk_size = check_int("chunk_size", chunk_size)
    outputs = []
    for start in range(0, P, chunk_size):
        stop = min(P, start + chunk_size)
        chunk_inputs = inputs[start:stop] if per_individual else inputs
        outputs.append(transformer_forward(config, _weight_views(config, params[start:stop]),
                                           chunk_inputs))
    if bounds is not None:
        _raise_unless_in_vocab(config, bounds)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
"""Names accepted by :func:`resolve_dtype` (``--dtype``) and the dtypes they stand for."""


def _dtype_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` does matrix arithmetic in ``dtype`` (a CUDA GPU must report bf16)."""
    if dtype == torch.bfloat16 and device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return False
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        return bool(torch.isfinite((a @ a).softmax(-1).float().cpu()).all())
    except (RuntimeError, TypeError):  # the backend has no kernel for it
        return False


def resolve_dtype(dtype: str | torch.dtype | None,
                  device: str | torch.device | None = None) -> torch.dtype:
    """The compute dtype named by ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float64"``
    or that torch dtype; ``None``: float32), checked to work on ``device``.

    Raises:
        ValueError: an unknown name, or a dtype that ``device`` cannot compute in (e.g.
            bfloat16 on a GPU older than NVIDIA Ampere); the message names both.
    """
    if dtype is None:
        return torch.float32
    resolved = COMPUTE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in COMPUTE_DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    device = torch.device(device if device is not None else "cpu")
    if resolved != torch.float32 and device.type != "meta" and not _dtype_works(resolved, device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(f"dtype {str(resolved).removeprefix('torch.')} is not supported on "
                         f"device {device} ({name}); use float32 there")
    return resolved


class PopulationModel:
    """A population of networks as one callable: ``model(inputs) -> outputs``.

    This is what tasks receive: they sample inputs, call the model and score
    the outputs, without caring how the population is chunked or where it lives.

    ``compute_dtype`` (e.g. ``torch.bfloat16``): run the forward pass in that dtype
    (the weights are cast for the pass) and hand the outputs back in ``params``'
    dtype, so that tasks score and accumulate fitness in float32.

    Attributes:
        config, params (P, N), popsize, device, dtype (of ``params`` and the
        outputs), compute_dtype.
    """

    def __init__(self, config: TransformerConfig, params: Tensor, *,
                 chunk_size: int | None = None, memory_budget: int | None = None,
                 compute_dtype: torch.dtype | None = None):
        if not isinstance(params, Tensor) or params.dim() != 2:
            raise ValueError("params must be a (P, N) tensor")
        self.config = config
        self.params = params
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.compute_dtype = params.dtype if compute_dtype is None else compute_dtype

    @classmethod
    def from_module(cls, module: MQAMoETransformer) -> PopulationModel:
        """A population of one: the given network (its current parameters)."""
        vector = nn.utils.parameters_to_vector(module.parameters())
        return cls(module.config, vector.unsqueeze(0))

    @property
    def popsize(self) -> int:
        return self.params.shape[0]

    @property
    def device(self) -> torch.device:
        return self.params.device

    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    def __call__(self, inputs: Tensor) -> Tensor:
        """(B, T[, I]) shared or (P, B, T[, I]) per individual -> (P, B, T, O) or (P, B, O)."""
        params = self.params
        if self.compute_dtype != params.dtype:
            params = params.to(self.compute_dtype)
        out = population_forward(self.config, params, inputs, chunk_size=self.chunk_size,
                                 memory_budget=self.memory_budget)
        return out.to(self.params.dtype)
