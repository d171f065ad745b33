"""The flat parameter layout: which parameter sits where in a solution vector, and
whole populations initialised as the module initialises one network.

Flat order = registration order of :class:`~evotorch_mqa_moe.model.modules.MQAMoETransformer`
= ``parameters_to_vector(module.parameters())``, so row ``i`` of a population is
exactly ``vector_to_parameters(values[i], module.parameters())``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_int

from .config import TransformerConfig
from .modules import MQAMoETransformer, _apply_init


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


def _weight_views(config: TransformerConfig, params: Tensor) -> dict[str, Tensor]:
    """name -> (P, *shape) views into the (P, N) matrix (no copies)."""
    views, offset = {}, 0
    for name, shape in parameter_layout(config):
        size = math.prod(shape)
        views[name] = params[:, offset : offset + size].view(params.shape[0], *shape)
        offset += size
    return views
