"""Per-individual gradients of a whole population in one backward pass.

The population pass slices every individual's weights out of one ``(P, N)`` matrix,
so one backward of the *summed* per-individual losses gives every row its own
gradient (individual ``i``'s loss depends only on row ``i``).
:func:`population_loss_and_grad` does that, chunked to a memory budget. Cost is
counted in forward-equivalents: one forward of one individual on one task batch is
1, a backward 2 more, so one gradient step of one individual costs 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_int
from evotorch_mqa_moe.model import (
    TransformerConfig,
    check_inputs,
    default_chunk_size,
    num_parameters,
    parameter_layout,
    transformer_forward,
)

LossFn = Callable[[Tensor, Tensor], Tensor]


def supervised_loss(task: Any, who: str = "population gradients") -> LossFn:
    """``task.loss`` if ``task`` is supervised (has ``sample`` and ``loss``), else ValueError.

    Tasks whose fitness is not a differentiable loss (e.g. ``cartpole``, scored by
    episode returns) cannot give gradients; the error names ``who`` needed them.
    """
    if not (callable(getattr(task, "sample", None)) and callable(getattr(task, "loss", None))):
        name = getattr(task, "name", type(task).__name__)
        raise ValueError(f"{who} needs a supervised task (sample + loss) for its gradients; "
                         f"{name!r} is not one")
    return task.loss


def gradient_chunk_size(config: TransformerConfig, rows: int, device: torch.device | str,
                        dtype: torch.dtype = torch.float32,
                        memory_budget: int | None = None) -> int:
    """Individuals per chunk of a forward + backward pass within ``memory_budget`` bytes.

    A forward without autograd frees each layer's activations as it goes; with
    autograd every layer's activations are kept for the backward, about
    ``num_layers + 1`` times the forward's working set at once (the backward then
    frees them as it walks back). So the forward's budget
    (:func:`~evotorch_mqa_moe.model.default_chunk_size`, 24 MiB on CPU, 2 GiB on an
    accelerator) is divided by ``num_layers + 1``. At config A on CPU this gives
    chunks of 4 (the forward's: 14); bench/gradient.py measured chunks of 2, 3, 4 and
    8 within 6% of each other and 1 about 30% slower (docs/benchmarks.md).
    """
    if memory_budget is None:
        memory_budget = (2 << 30) if torch.device(device).type != "cpu" else (24 << 20)
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    share = max(1, memory_budget // (config.num_layers + 1))
    return default_chunk_size(config, rows, device, dtype, share)


def _leaves(config: TransformerConfig, chunk: Tensor) -> dict[str, Tensor]:
    """name -> (p, *shape) leaf tensor copied out of the chunk (p, N), requiring grad.

    One leaf per parameter tensor rather than views of one (p, N) leaf: the backward of
    each view would otherwise scatter its gradient into a zero (p, N) buffer and add
    it up (two full passes over the chunk per parameter tensor; 27% of the whole
    gradient's time at config A).
    """
    leaves, offset = {}, 0
    for name, shape in parameter_layout(config):
        size = math.prod(shape)
        block = chunk[:, offset : offset + size].reshape(chunk.shape[0], *shape)
        leaves[name] = block.clone().requires_grad_(True)
        offset += size
    return leaves


def _plain(values: Tensor) -> Tensor:
    return values.as_subclass(Tensor) if type(values) is not Tensor else values


def population_loss_and_grad(
    source: Any,
    values: Tensor,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: LossFn | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Every individual's loss and its gradient, in one vectorised pass per chunk.

    Args:
        source: a :class:`~evotorch_mqa_moe.problem.TransformerProblem` (its config,
            its task's loss and its chunking settings), a supervised task's owner, or
            a :class:`~evotorch_mqa_moe.config.TransformerConfig` together with ``loss``.
        values: (P, N) flat parameter vectors (not modified).
        inputs: shared (B, T) tokens / (B, T, I) vectors, or per individual (P, B, ...).
        targets: (B, ...) shared, or (P, B, ...) when the inputs are per individual.
        loss: ``loss(outputs (p, B, ...), targets (B, ...)) -> (p,)``; default the
            problem's ``task.loss``.
        chunk_size: individuals per chunk; default :func:`gradient_chunk_size`.
        memory_budget: bytes a chunk may use (forward + backward).
    Returns:
        ``(loss (P,), grad (P, N))``, detached, in ``values``' dtype and device. Row
        ``i`` equals ``torch.autograd`` on one ``MQAMoETransformer`` loaded with
        ``values[i]``.
    Raises:
        ValueError: a task without a differentiable loss; mismatched shapes.
    """
    if isinstance(source, TransformerConfig):
        config = source
        if loss is None:
            raise ValueError("give loss= when source is a TransformerConfig")
    else:
        config = getattr(source, "config", None)
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"source must be a TransformerProblem or a TransformerConfig, "
                            f"got {type(source).__name__}")
        if loss is None:
            loss = supervised_loss(getattr(source, "task", None))
        chunk_size = chunk_size if chunk_size is not None else getattr(source, "chunk_size", None)
        if memory_budget is None:
            memory_budget = getattr(source, "memory_budget", None)
    if not isinstance(values, Tensor) or values.dim() != 2:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a (P, N) tensor, got {shape}")
    if values.shape[1] != num_parameters(config):
        raise ValueError(f"values have {values.shape[1]} columns; the config has "
                         f"N={num_parameters(config)} parameters")
    values = _plain(values).detach()
    P = values.shape[0]
    per_individual = inputs.dim() == (3 if config.token_inputs else 4)
    if per_individual and targets.shape[:1] != (P,):
        raise ValueError(f"per-individual inputs need per-individual targets (P={P}, B, ...), "
                         f"got targets of shape {tuple(targets.shape)}")
    inputs = inputs.to(values.device)
    check_inputs(config, inputs, popsize=P)
    if not config.token_inputs and inputs.dtype != values.dtype:
        inputs = inputs.to(values.dtype)
    targets = targets.to(values.device)
    if chunk_size is None:
        B, T = inputs.shape[-2:] if config.token_inputs else inputs.shape[-3:-1]
        chunk_size = gradient_chunk_size(config, B * T, values.device, values.dtype,
                                         memory_budget)
    else:
        chunk_size = check_int("chunk_size", chunk_size)
    losses = torch.empty(P, dtype=values.dtype, device=values.device)
    offsets, offset = {}, 0
    for name, shape in parameter_layout(config):
        offsets[name] = slice(offset, offset + math.prod(shape))
        offset += math.prod(shape)
    grads = torch.empty_like(values)
    with torch.enable_grad():
        for start in range(0, P, chunk_size):
            stop = min(P, start + chunk_size)
            leaves = _leaves(config, values[start:stop])
            chunk_inputs = inputs[start:stop] if per_individual else inputs
            outputs = transformer_forward(config, leaves, chunk_inputs)
            if per_individual:  # the loss scores one batch of targets: one call per row
                chunk_loss = torch.cat([loss(outputs[i : i + 1], targets[start + i])
                                        for i in range(stop - start)])
            else:
                chunk_loss = loss(outputs, targets)
            if chunk_loss.shape != (stop - start,):
                raise ValueError(f"loss returned shape {tuple(chunk_loss.shape)}, expected "
                                 f"({stop - start},): one loss per individual")
            names = list(leaves)
            chunk_grads = torch.autograd.grad(chunk_loss.sum(), [leaves[n] for n in names],
                                              allow_unused=True, materialize_grads=True)
            for name, grad in zip(names, chunk_grads, strict=True):
                grads[start:stop, offsets[name]].view_as(grad).copy_(grad)
            losses[start:stop] = chunk_loss.detach()
    return losses, grads
