"""Generation for a whole population: :func:`population_generate` decodes P individuals
x B prompts at once, chunk by chunk, dense or low-rank (no materialised individuals),
on the decoding loop of :mod:`.decoding` that the ``nn.Module``'s
:meth:`~evotorch_mqa_moe.model.MQAMoETransformer.generate` runs too. A population of
one repeats the module's ``generate`` with the same generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_int

from .config import TransformerConfig
from .decoding import check_generation, decode, draw_uniforms
from .layout import _weight_views, num_parameters
from .lowrank import LowRankPopulation
from .memory import default_chunk_size


def population_generate(
    config: TransformerConfig,
    params: Tensor | LowRankPopulation,
    prompts: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    use_cache: bool = True,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Every individual of a population continues every prompt: (P, B, T0 + n) tokens.

    Args:
        params: (P, N) flat parameter vectors (their dtype is the compute dtype, e.g.
            bf16), or a :class:`~evotorch_mqa_moe.model.LowRankPopulation` (decoded
            without materialising its individuals).
        prompts: (B, T0) token ids (or (T0,) for one prompt), shared by all individuals.
        max_new_tokens: n; ``T0 + n <= config.max_seq_len``.
        temperature, top_k, greedy, generator: sampling from softmax(logits / T) over
            the top k tokens, or the argmax when ``greedy``.
        chunk_size, memory_budget: individuals decoded together (as for
            :func:`population_forward`); the tokens do not depend on it.
        use_cache: False recomputes the whole prefix at every step.
        return_logits: also return the (P, B, n, V) logits the new tokens came from.
    """
    if isinstance(params, LowRankPopulation):
        P, device, dtype = params.popsize, params.device, params.compute_dtype
        if params.config != config:
            raise ValueError("the low-rank population was built for another config")
    else:
        if not isinstance(params, Tensor) or params.dim() != 2:
            raise ValueError("params must be a (P, N) tensor or a LowRankPopulation")
        if params.shape[1] != num_parameters(config):
            raise ValueError(f"params have {params.shape[1]} columns; this config has "
                             f"N={num_parameters(config)} parameters")
        if not params.is_floating_point():
            raise TypeError(f"params must be floating point, got dtype {params.dtype}")
        params = params.as_subclass(Tensor)
        P, device, dtype = params.shape[0], params.device, params.dtype
    if P == 0:
        raise ValueError("params hold no individuals (P=0)")
    single = isinstance(prompts, Tensor) and prompts.dim() == 1
    if single:
        prompts = prompts.unsqueeze(0)
    n = check_generation(config, prompts, max_new_tokens, temperature=temperature,
                         top_k=top_k, greedy=greedy)
    if prompts.device != torch.device(device):
        raise ValueError(f"prompts are on {prompts.device} but params on {device}")
    B, T0 = prompts.shape
    uniforms = None if greedy else draw_uniforms((n, P, B), generator, device)
    if chunk_size is None:
        chunk_size = default_chunk_size(config, B * (T0 + n), device, dtype, memory_budget,
                                        seq_len=T0 + n)
    else:
        chunk_size = check_int("chunk_size", chunk_size)
    tokens, logits = [], []
    with torch.no_grad():
        for start in range(0, P, chunk_size):
            stop = min(P, start + chunk_size)
            weights = (params.weights(start, stop) if isinstance(params, LowRankPopulation)
                       else _weight_views(config, params[start:stop]))
            u = None if uniforms is None else uniforms[:, start:stop]
            t, lg = decode(config, weights, prompts, n, uniforms=u, temperature=temperature,
                           top_k=top_k, use_cache=use_cache)
            tokens.append(t)
            logits.append(lg)
    out = torch.cat(tokens)
    if single:
        out = out[:, 0]
    if not return_logits:
        return out
    lg = torch.cat(logits)
    return out, (lg[:, 0] if single else lg)


def cache_nbytes(config: TransformerConfig, batch: int, length: int, popsize: int = 1,
                 dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the attention key/value cache, computed: layers x 2 x P x B x K x T x hd.
    (:meth:`KVCache.nbytes` measures a real one.)"""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (config.num_layers * 2 * popsize * batch * config.num_kv_heads * length
            * config.head_dim * itemsize)

