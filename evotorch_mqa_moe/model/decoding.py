"""The decoding loop: incremental decoding with a key/value cache over any weights the
layer math takes (one network, a dense population, a low-rank population), and the
token choice (greedy, or sampling with temperature and top-k by inverse CDF).

The prompt runs through :func:`~evotorch_mqa_moe.model.transformer_forward` once,
filling a :class:`~evotorch_mqa_moe.model.cache.KVCache`; each new token then costs
one token row per sequence. Sampling takes one uniform draw per (individual, prompt,
step), drawn up front by the caller, so the tokens do not depend on how a population
is chunked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_bool, check_float, check_int

from .cache import KVCache
from .config import TransformerConfig
from .forward import transformer_forward
from .inputs import _as_index, check_inputs


def check_generation(config: TransformerConfig, prompts: Tensor, max_new_tokens: int, *,
                     temperature: float = 1.0, top_k: int | None = None,
                     greedy: bool = False) -> int:
    """Refuse, naming the value, what cannot be generated; return ``max_new_tokens``.

    Needs a causal token model whose head predicts the vocabulary (no pooling,
    ``output_dim == vocab_size``), prompts (B, T0) of valid ids, and
    ``T0 + max_new_tokens <= max_seq_len``.
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    if not config.causal:
        raise ValueError("generation needs a causal model; this config has causal=False")
    if not config.token_inputs:
        raise ValueError("generation needs token inputs; this config reads vectors "
                         f"(input_dim={config.input_dim})")
    if config.pooling is not None:
        raise ValueError(f"generation needs per-token outputs; this config pools "
                         f"(pooling={config.pooling!r})")
    if config.output_dim != config.vocab_size:
        raise ValueError(f"generation needs next-token logits: output_dim={config.output_dim} "
                         f"!= vocab_size={config.vocab_size}")
    check_inputs(config, prompts, popsize=None)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    T0 = prompts.shape[-1]
    if T0 + max_new_tokens > config.max_seq_len:
        raise ValueError(f"prompt length {T0} + max_new_tokens={max_new_tokens} exceeds "
                         f"max_seq_len={config.max_seq_len}")
    check_float("temperature", temperature)
    check_int("top_k", top_k, 1, config.vocab_size, none_ok=True)
    check_bool("greedy", greedy)
    return max_new_tokens


def _choose(logits: Tensor, uniforms: Tensor | None, temperature: float,
            top_k: int | None) -> Tensor:
    """Next tokens (...,) from logits (..., V): argmax when ``uniforms`` is None, else
    the inverse CDF of softmax(logits / temperature), restricted to the top k, at
    ``uniforms`` (...,) in [0, 1). Computed in float32 whatever the logits' dtype."""
    logits = logits.float()
    if uniforms is None:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    # Scaled by the total so rounding never points past the last token; the first
    # index whose CDF exceeds the draw never is a zero-probability token.
    threshold = (uniforms * cdf[..., -1]).unsqueeze(-1)
    return (cdf <= threshold).sum(dim=-1).clamp_(max=logits.shape[-1] - 1)


def decode(config: TransformerConfig, weights: Mapping[str, Any], prompts: Tensor,
           max_new_tokens: int, *, uniforms: Tensor | None = None, temperature: float = 1.0,
           top_k: int | None = None, use_cache: bool = True
           ) -> tuple[Tensor, Tensor]:
    """Generate on checked inputs (see :func:`check_generation`).

    Args:
        weights: as for :func:`transformer_forward`: one network, or a population
            (leading P, plain or low-rank).
        prompts: (B, T0) token ids shared by every individual.
        uniforms: (max_new_tokens, *lead, B) draws in [0, 1) for sampling; None: greedy.
        use_cache: False recomputes the whole prefix at every step (the reference the
            cache is checked and benchmarked against).
    Returns:
        ``(tokens, logits)``: (*lead, B, T0 + max_new_tokens) prompts and new tokens,
        and (*lead, B, max_new_tokens, V) the logits each new token was chosen from.
    """
    prompts = _as_index(prompts)
    B, T0 = prompts.shape
    total = T0 + max_new_tokens
    cache = KVCache(config, total) if use_cache else None
    step_logits = transformer_forward(config, weights, prompts, cache=cache)[..., -1, :]
    lead = step_logits.shape[:-2]
    tokens = prompts.new_empty(*lead, B, total)
    tokens[..., :T0] = prompts
    chosen = []
    for step in range(max_new_tokens):
        chosen.append(step_logits)
        u = None if uniforms is None else uniforms[step]
        tokens[..., T0 + step] = _choose(step_logits, u, temperature, top_k)
        if step + 1 == max_new_tokens:  # the last token is chosen, never read back
            break
        t = T0 + step + 1
        if cache is not None:
            step_logits = transformer_forward(config, weights, tokens[..., t - 1 : t],
                                              cache=cache)[..., -1, :]
        else:
            step_logits = transformer_forward(config, weights, tokens[..., :t])[..., -1, :]
    return tokens, torch.stack(chosen, dim=-2)


def draw_uniforms(shape: tuple[int, ...], generator: torch.Generator | None,
                  device: torch.device) -> Tensor:
    """Sampling draws (float32) from ``generator`` (on its own device), moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)
