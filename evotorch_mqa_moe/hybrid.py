"""Gradients inside the population: per-individual gradients and vectorised optimisers.

The population pass (:func:`~evotorch_mqa_moe.model.population_forward`) slices every
individual's weights out of one ``(P, N)`` matrix, so one backward of the *summed*
per-individual losses gives every row its own gradient (individual ``i``'s loss
depends only on row ``i``). :func:`population_loss_and_grad` does that, chunked to a
memory budget; :class:`PopulationSGD` and :class:`PopulationAdam` then update all
``P`` rows at once, each with its own learning rate and optimiser state, exactly as
``P`` independent ``torch.optim.SGD`` / ``torch.optim.Adam`` instances would.

The searchers built on them (``lamarck``, ``baldwin``, ``pbt``) live in
:mod:`evotorch_mqa_moe.hybrid_search`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .config import TransformerConfig
from .model import (
    check_inputs,
    default_chunk_size,
    num_parameters,
    parameter_layout,
    transformer_forward,
)

__all__ = [
    "population_loss_and_grad",
    "gradient_chunk_size",
    "supervised_loss",
    "PopulationSGD",
    "PopulationAdam",
    "make_optimizer",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def supervised_loss(task: Any) -> LossFn:
    """``task.loss`` if ``task`` is supervised (has ``sample`` and ``loss``), else ValueError.

    Tasks whose fitness is not a differentiable loss (e.g. ``cartpole``, scored by
    episode returns) cannot give gradients.
    """
    if not (callable(getattr(task, "sample", None)) and callable(getattr(task, "loss", None))):
        name = getattr(task, "name", type(task).__name__)
        raise ValueError(f"gradient searchers need a supervised task with a differentiable "
                         f"loss (sample + loss); task {name!r} has none")
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
    chunks of 3 (the forward's: 9); bench/gradient.py measured chunks of 2, 4 and 8
    within 10% of each other and 1 about 15% slower.
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
    it up (two full passes over the chunk per parameter tensor; 35% of the whole
    gradient's time at config A). Separate leaves also keep the expert input biases
    apart from the expert weights, so the forward concatenates them instead of
    reading them through an ``as_strided`` view of the weights, through which
    autograd passes no gradient to the bias genes.
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
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
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


# ----------------------------------------------------------------------------
# Vectorised optimisers: P independent optimisers as (P,) hyperparameters and (P, N) state.
# ----------------------------------------------------------------------------


def _per_row(name: str, value: float | Tensor, popsize: int, *, low: float, high: float | None,
             low_open: bool, device, dtype=torch.float64) -> Tensor:
    """A (P,) float64 tensor of hyperparameter ``name``, validated against its range."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(popsize).clone()
    if t.shape != (popsize,):
        raise ValueError(f"{name} must be a number or a ({popsize},) tensor, "
                         f"got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t) | ((t <= low) if low_open else (t < low))
    if high is not None:
        bad |= t >= high
    if bool(bad.any()):
        if high is not None:
            where = f"in {'(' if low_open else '['}{low}, {high})"
        else:
            where = f"{'>' if low_open else '>='} {low}"
        raise ValueError(f"{name} must be {where}, got {t[bad][0].item()!r}")
    return t


class _PopulationOptimizer:
    """Shared bookkeeping: (P,) hyperparameters, (P, N) state rows, checkpoints, row copies."""

    _hyper: tuple[str, ...] = ()
    _buffers: tuple[str, ...] = ()

    popsize: int

    def _init_state(self) -> None:
        self.steps = torch.zeros(self.popsize, dtype=torch.int64, device=self.device)
        for name in self._buffers:
            setattr(self, name, None)

    def _buffer(self, name: str, values: Tensor) -> Tensor:
        buf = getattr(self, name)
        if buf is None or buf.shape != values.shape:
            buf = torch.zeros_like(values)
            setattr(self, name, buf)
        return buf

    def _check(self, values: Tensor, grad: Tensor) -> None:
        if values.dim() != 2 or values.shape[0] != self.popsize:
            raise ValueError(f"values must be ({self.popsize}, N), got {tuple(values.shape)}")
        if grad.shape != values.shape:
            raise ValueError(f"grad shape {tuple(grad.shape)} differs from values "
                             f"{tuple(values.shape)}")

    def _col(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return t.to(dtype).unsqueeze(1)  # (P, 1): broadcasts over the N genes

    def reset(self, rows: Tensor | None = None) -> None:
        """Forget the optimiser state of ``rows`` (a (P,) bool mask or indices; all if None)."""
        if rows is None:
            self._init_state()
            return
        self.steps[rows] = 0
        for name in self._buffers:
            buf = getattr(self, name)
            if buf is not None:
                buf[rows] = 0

    def take(self, index: Tensor) -> None:
        """Row ``i`` becomes (a copy of) row ``index[i]``: state and hyperparameters."""
        index = torch.as_tensor(index, device=self.device)
        if index.shape != (self.popsize,):
            raise ValueError(f"index must be ({self.popsize},), got {tuple(index.shape)}")
        self.steps = self.steps[index]
        for name in self._buffers:
            buf = getattr(self, name)
            if buf is not None:
                setattr(self, name, buf[index])
        for name in self._hyper:
            setattr(self, name, getattr(self, name)[index])

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (``torch.load(weights_only=True)``-safe)."""
        state = {"steps": self.steps.clone()}
        for name in self._hyper + self._buffers:
            value = getattr(self, name)
            state[name] = None if value is None else value.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("steps",) + self._hyper + self._buffers:
            value = state[name]
            setattr(self, name, None if value is None else value.to(self.device).clone())


class PopulationSGD(_PopulationOptimizer):
    """``P`` independent ``torch.optim.SGD`` optimisers, one per row of a (P, N) population.

    Same update as ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)``
    for every row, with every hyperparameter a number or a (P,) tensor.

    Args:
        popsize: P.
        lr: learning rate(s) > 0.
        momentum: in [0, 1).
        dampening: in [0, 1).
        weight_decay: >= 0 (L2 added to the gradient, as torch's SGD).
        nesterov: Nesterov momentum.
        device: where the state lives (that of the population).
    Attributes:
        lr, momentum, dampening, weight_decay: (P,) float64 tensors (edit to change).
        steps: (P,) int64 steps taken by each row; momentum_buffer: (P, N) or None.
    """

    _hyper = ("lr", "momentum", "dampening", "weight_decay")
    _buffers = ("momentum_buffer",)

    def __init__(self, popsize: int, *, lr: float | Tensor, momentum: float | Tensor = 0.0,
                 dampening: float | Tensor = 0.0, weight_decay: float | Tensor = 0.0,
                 nesterov: bool = False, device: torch.device | str | None = None):
        if isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < 1:
            raise ValueError(f"popsize must be a positive integer, got {popsize!r}")
        self.popsize, self.device, self.nesterov = popsize, torch.device(device or "cpu"), nesterov
        kw = dict(device=self.device)
        self.lr = _per_row("lr", lr, popsize, low=0.0, high=None, low_open=True, **kw)
        self.momentum = _per_row("momentum", momentum, popsize, low=0.0, high=1.0,
                                 low_open=False, **kw)
        self.dampening = _per_row("dampening", dampening, popsize, low=0.0, high=1.0,
                                  low_open=False, **kw)
        self.weight_decay = _per_row("weight_decay", weight_decay, popsize, low=0.0, high=None,
                                     low_open=False, **kw)
        self._init_state()

    @torch.no_grad()
    def step(self, values: Tensor, grad: Tensor) -> None:
        """Update ``values`` (P, N) in place with ``grad`` (P, N)."""
        self._check(values, grad)
        dt = values.dtype
        d_p = grad.add(values * self._col(self.weight_decay, dt))
        buf = self._buffer("momentum_buffer", values)
        first = self._col(self.steps == 0, dt)  # torch's SGD: buffer = grad on the first step
        mom = self._col(self.momentum, dt)
        damp = (1 - self._col(self.dampening, dt)) * (1 - first) + first
        buf.mul_(mom * (1 - first)).add_(d_p * damp)
        uses = self._col(self.momentum != 0, dt)  # rows without momentum step on d_p itself
        direction = d_p.add(mom * buf) if self.nesterov else buf
        direction = uses * direction + (1 - uses) * d_p
        values.sub_(self._col(self.lr, dt) * direction)
        self.steps += 1


class PopulationAdam(_PopulationOptimizer):
    """``P`` independent ``torch.optim.Adam`` (or ``AdamW``) optimisers over a (P, N) population.

    Args:
        popsize: P.
        lr: learning rate(s) > 0 (a number or a (P,) tensor).
        betas: ``(beta1, beta2)``, each a number or (P,) tensor in [0, 1).
        eps: added to the denominator.
        weight_decay: >= 0; L2 added to the gradient (``Adam``), or with ``decoupled``
            a multiplicative decay ``1 - lr * weight_decay`` of the weights (``AdamW``).
        device: where the state lives.
    Attributes:
        lr, beta1, beta2, weight_decay: (P,) float64 tensors; steps (P,) int64;
        exp_avg, exp_avg_sq: (P, N) or None before the first step.
    """

    _hyper = ("lr", "beta1", "beta2", "weight_decay")
    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, popsize: int, *, lr: float | Tensor,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float | Tensor = 0.0, decoupled: bool = False,
                 device: torch.device | str | None = None):
        if isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < 1:
            raise ValueError(f"popsize must be a positive integer, got {popsize!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.popsize, self.device = popsize, torch.device(device or "cpu")
        self.eps, self.decoupled = float(eps), decoupled
        kw = dict(device=self.device)
        self.lr = _per_row("lr", lr, popsize, low=0.0, high=None, low_open=True, **kw)
        self.beta1 = _per_row("beta1", betas[0], popsize, low=0.0, high=1.0, low_open=False, **kw)
        self.beta2 = _per_row("beta2", betas[1], popsize, low=0.0, high=1.0, low_open=False, **kw)
        self.weight_decay = _per_row("weight_decay", weight_decay, popsize, low=0.0, high=None,
                                     low_open=False, **kw)
        self._init_state()

    @torch.no_grad()
    def step(self, values: Tensor, grad: Tensor) -> None:
        """Update ``values`` (P, N) in place with ``grad`` (P, N)."""
        self._check(values, grad)
        dt = values.dtype
        lr, wd = self.lr, self.weight_decay
        if self.decoupled:
            values.mul_(self._col(1 - lr * wd, dt))
        elif bool((wd != 0).any()):
            grad = grad.add(values * self._col(wd, dt))
        m = self._buffer("exp_avg", values)
        v = self._buffer("exp_avg_sq", values)
        self.steps += 1
        m.lerp_(grad, self._col(1 - self.beta1, dt))
        v.mul_(self._col(self.beta2, dt)).addcmul_(grad, grad * self._col(1 - self.beta2, dt))
        step = self.steps.to(torch.float64)
        bias1 = 1 - self.beta1**step  # float64, as torch computes them in Python floats
        bias2_sqrt = (1 - self.beta2**step).sqrt()
        denom = (v.sqrt() / self._col(bias2_sqrt, dt)).add_(self.eps)
        values.addcdiv_(m * self._col(-lr / bias1, dt), denom)


OPTIMIZERS = {"adam": PopulationAdam, "sgd": PopulationSGD}


def make_optimizer(name: str, popsize: int, *, lr: float | Tensor, momentum: float | Tensor,
                   weight_decay: float | Tensor = 0.0,
                   device: torch.device | str | None = None) -> PopulationAdam | PopulationSGD:
    """``"adam"`` (``momentum`` is beta1, beta2 = 0.999) or ``"sgd"`` (heavy-ball momentum)."""
    if name == "adam":
        return PopulationAdam(popsize, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay,
                              device=device)
    if name == "sgd":
        return PopulationSGD(popsize, lr=lr, momentum=momentum, weight_decay=weight_decay,
                             device=device)
    raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")


def _log_uniform(low: float, high: float, size: int, generator: torch.Generator,
                 device) -> Tensor:
    """(size,) float64 draws, log-uniform on [low, high]."""
    u = torch.rand(size, dtype=torch.float64, generator=generator,
                   device=generator.device).to(device)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
