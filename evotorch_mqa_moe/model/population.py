"""The population front door: :func:`population_forward` evaluates a whole ``(P, N)``
population in one vectorised pass, chunk by chunk, and :class:`PopulationModel` is that
pass as the one callable a task receives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evotorch_mqa_moe._internal.validate import check_int

from .config import TransformerConfig
from .forward import transformer_forward
from .inputs import _raise_unless_in_vocab, prepare_inputs
from .layout import _weight_views, num_parameters
from .memory import default_chunk_size
from .modules import MQAMoETransformer


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
