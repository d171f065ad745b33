"""The whole network as a function of a weight dictionary: embedding, positions, the
encoder layers, the final norm, pooling and the head (:func:`transformer_forward`).

Shared by the ``nn.Module`` front door, the dense population pass and the low-rank
population pass; only the weights differ (plain tensors, with or without a leading
population axis, or structured low-rank weights).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import KVCache, LayerCache
from .config import TransformerConfig
from .layers import (
    _structured,
    attention,
    layer_norm,
    linear,
    mixture_of_experts,
    moe_gates,
    sinusoidal_positions,
)


def transformer_forward(
    config: TransformerConfig, weights: Mapping[str, Tensor], inputs: Tensor,
    *, gates: list[Tensor] | None = None, cache: KVCache | None = None,
) -> Tensor:
    """The whole network on validated inputs.

    Args:
        weights: parameter name -> tensor, named as in :class:`MQAMoETransformer`,
            each with no leading axis (one network) or a leading population axis P.
        inputs: tokens (B, T) or (P, B, T); vectors (B, T, I) or (P, B, T, I);
            a leading P only when the weights have one.
        gates: if a list, each layer appends its expert weights (*lead, B*T, E).
        cache: incremental decoding (causal models): ``inputs`` are the tokens at
            positions ``[cache.length, cache.length + T)``, after those already in the
            cache; every layer appends their keys/values and the cache advances by T.
            The outputs equal the same positions' outputs of the whole sequence.
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
    start = 0 if cache is None else cache.length  # position of the first token
    if c.positional in ("learned", "both"):
        pos = weights["pos_embed"]  # (T_max, D) or (P, T_max, D)
        if _structured(pos):
            pos = pos.lookup(torch.arange(start, start + T, device=x.device))  # (P, T, D)
        else:
            pos = pos[..., start : start + T, :]  # (T, D) or (P, T, D)
        x = (x.view(*lead, B, T, -1) + pos.unsqueeze(-3)).view(*lead, B * T, -1)
    if c.positional in ("sinusoidal", "both"):
        length = T if cache is None else cache.max_len  # one table for a whole decode
        table = sinusoidal_positions(length, c.embed_dim, x.device, x.dtype)[start : start + T]
        x = (x.view(*lead, B, T, -1) + table).view(*lead, B * T, -1)
    # --- encoder layers
    for i in range(c.num_layers):
        prefix = f"layers.{i}."
        w = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        x = encoder_layer(x, w, c, B, gates, None if cache is None else cache.layers[i])
    if cache is not None:
        cache.advance(T)
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
                  gates: list[Tensor] | None = None, cache: LayerCache | None = None
                  ) -> Tensor:
    """One encoder layer (attention + mixture of experts) on token rows (*lead, M, D).

    ``gates``: if a list, the layer appends its expert weights (*lead, M, E) to it.
    ``cache``: this layer's key/value cache for incremental decoding (see
    :func:`transformer_forward`)."""

    def attn(h: Tensor) -> Tensor:
        return attention(h, w["attn.qkv_weight"], w["attn.qkv_bias"], w["attn.out_weight"],
                         w["attn.out_bias"], c, batch, cache)

    def moe(h: Tensor) -> Tensor:
        if gates is not None:
            if cache is not None:
                raise ValueError("gates cannot be recorded while decoding with a cache")
            gates.append(moe_gates(h, w["moe.gate_weight"], w["moe.gate_bias"], c, batch,
                                   w.get("moe.gate_qk_weight"), w.get("moe.gate_qk_bias")))
        return mixture_of_experts(h, w["moe.gate_weight"], w["moe.gate_bias"],
                                  w["moe.in_weight"], w["moe.in_bias"], w["moe.out_weight"],
                                  w["moe.out_bias"], c, batch, w.get("moe.gate_qk_weight"),
                                  w.get("moe.gate_qk_bias"), cache)

    def norm(h: Tensor, which: str) -> Tensor:
        return layer_norm(h, w[f"{which}.weight"], w[f"{which}.bias"], c.norm_eps)

    if c.norm == "pre":
        x = x + attn(norm(x, "norm1"))
        return x + moe(norm(x, "norm2"))
    x = norm(x + attn(x), "norm1")
    return norm(x + moe(x), "norm2")
