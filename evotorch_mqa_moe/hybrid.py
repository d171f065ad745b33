"""Gradients inside the population: per-individual gradients and vectorised optimisers.

The population pass (:func:`~evotorch_mqa_moe.model.population_forward`) slices every
individual's weights out of one ``(P, N)`` matrix, so one backward of the *summed*
per-individual losses gives every row its own gradient (individual ``i``'s loss
depends only on row ``i``). :func:`population_loss_and_grad` does that, chunked to a
memory budget; :class:`PopulationSGD` and :class:`PopulationAdam` then update all
``P`` rows at once, each with its own learning rate and optimiser state, exactly as
``P`` independent ``torch.optim.SGD`` / ``torch.optim.Adam`` instances would.

The searchers built on them live in :mod:`evotorch_mqa_moe.lamarck` (``lamarck``,
``baldwin``: a GA whose children learn) and :mod:`evotorch_mqa_moe.pbt` (population-based
training); their builders and tuning spaces are re-exported here
(:func:`build_lamarck`, :func:`build_baldwin`, :func:`build_pbt`, :data:`SEARCH_SPACES`).
Their cost is counted in forward-equivalents: one forward of one individual on one task
batch is 1, a backward 2 more, so one gradient step of one individual costs 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._validate import check_float, check_int
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
    "train_population",
    "evaluate_population",
    "build_lamarck",
    "build_baldwin",
    "build_pbt",
    "SEARCH_SPACES",
]

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

    def _setup(self, popsize: int, device: torch.device | str | None) -> dict[str, Any]:
        """Validate and set ``popsize`` and ``device``; the keywords for :func:`_per_row`."""
        self.popsize, self.device = check_int("popsize", popsize), torch.device(device or "cpu")
        return dict(device=self.device)

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
        kw = self._setup(popsize, device)
        self.nesterov = nesterov
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
        kw = self._setup(popsize, device)
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.eps, self.decoupled = float(eps), decoupled
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


# ----------------------------------------------------------------------------
# Training and evaluation on the problem's data stream (shared by the hybrid searchers)
# ----------------------------------------------------------------------------


def train_population(problem: Any, values: Tensor, optimizer: PopulationAdam | PopulationSGD,
                     steps: int, *, batch_size: int | None = None) -> Tensor:
    """``steps`` gradient steps of every row of ``values`` (P, N), in place.

    Each step starts a new data epoch of ``problem`` (:meth:`next_generation`) and
    draws one batch of ``batch_size`` examples (default the task's) that all
    individuals share, so a seeded run repeats exactly and every searcher over the
    problem sees the same stream.

    Returns:
        (steps, P) the loss of every step, measured before its update.
    """
    loss_fn = supervised_loss(problem.task)
    batch_size = batch_size or problem.task.batch_size
    losses = torch.empty(steps, values.shape[0], dtype=values.dtype, device=values.device)
    for s in range(steps):
        problem.next_generation()
        inputs, targets = problem.task.sample(batch_size, problem.data_generator())
        losses[s], grad = population_loss_and_grad(problem, values, inputs, targets,
                                                   loss=loss_fn)
        optimizer.step(values, grad)
    return losses


def evaluate_population(problem: Any, values: Tensor) -> Tensor:
    """(P,) fitness of ``values`` (P, N) on one fresh batch: ``task.fitness`` (maximised).

    Starts a new data epoch first; NaN/inf fitness becomes a finite value worse than
    every finite one (as in :class:`~evotorch_mqa_moe.problem.TransformerProblem`).
    """
    from .problem import worst_for_nonfinite  # the problem imports EvoTorch: only when used

    problem.next_generation()
    with torch.no_grad():
        fitness = problem.task.fitness(problem.population_model(values), problem.data_generator())
    fitness = torch.as_tensor(fitness).reshape(-1).to(values.device, values.dtype)
    return worst_for_nonfinite(fitness)[0]


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite float ``> 0`` (:func:`~evotorch_mqa_moe._validate.check_float`)."""
    return check_float(name, value)


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float strictly inside (0, 1), else ValueError naming it."""
    return check_float(name, value, 0.0, 1.0, high_open=True)


class HybridSearcher:
    """Protocol plumbing shared by the hybrid searchers (see ``searchers.Searcher``).

    Subclasses implement :meth:`_step`, which sets ``self._fitness`` (P,) of the step
    (``pop_best_eval`` / ``mean_eval``) and pays with :meth:`_pay`, and list their
    tensors and numbers in ``_state_keys``. The cost is counted in examples and
    reported in forward-equivalents of one task batch: forward 1, backward 2 more.
    """

    _state_keys: tuple[str, ...] = ()

    def __init__(self, problem: Any, popsize: int, batch_size: int | None):
        supervised_loss(problem.task, type(self).name)
        self.problem = problem
        self.popsize = popsize
        self.batch_size = check_int(
            "batch_size", problem.task.batch_size if batch_size is None else batch_size, 1)
        self.steps = 0
        self._examples = 0  # forward-equivalent examples spent
        self._best_eval = -math.inf
        self._fitness: Tensor | None = None

    def _pay(self, rows: int, batch: int, backward: bool) -> None:
        self._examples += rows * batch * (3 if backward else 1)

    def _train(self, values: Tensor, optimizer: PopulationAdam | PopulationSGD, steps: int
               ) -> Tensor:
        losses = train_population(self.problem, values, optimizer, steps,
                                  batch_size=self.batch_size)
        self._pay(values.shape[0] * steps, self.batch_size, backward=True)
        return losses

    def _evaluate(self, values: Tensor) -> Tensor:
        fitness = evaluate_population(self.problem, values)
        self._pay(values.shape[0], self.problem.task.batch_size, backward=False)
        return fitness

    def step(self) -> None:
        """One generation (GA) or one training step (PBT)."""
        self._step()
        self.steps += 1
        best = float(self._fitness.max())
        if not self._best_eval >= best:
            self._best_eval = best

    def _step(self) -> None:
        raise NotImplementedError

    @property
    def evaluations(self) -> int:
        """Forward-equivalents so far (one forward of one individual on one task batch = 1)."""
        return self._examples // self.problem.task.batch_size

    def _solution_values(self) -> Tensor:
        raise NotImplementedError

    def current_solution(self) -> Tensor:
        """(N,) the individual with the best fitness of the last step."""
        if self._fitness is None:
            raise RuntimeError(f"{type(self).__name__} has not stepped yet")
        return self._solution_values()[int(self._fitness.argmax())].clone()

    @property
    def status(self) -> dict[str, Any]:
        """``iter``, ``best_eval`` (best so far), ``pop_best_eval``, ``mean_eval``, ``center``."""
        status: dict[str, Any] = {"iter": self.steps, "best_eval": self._best_eval}
        if self._fitness is not None:
            status.update(pop_best_eval=float(self._fitness.max()),
                          mean_eval=float(self._fitness.mean()),
                          center=self.current_solution())
        return status

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as tensors and numbers (weights_only-safe)."""
        state: dict[str, Any] = {
            "kind": type(self).__name__, "steps": self.steps, "examples": self._examples,
            "best_eval": self._best_eval, "data_epoch": self.problem.data_epoch,
            "data_root": self.problem.data_root,
            "generator": self.problem.generator.get_state(),
        }
        for key in self._state_keys:
            value = getattr(self, key)
            if hasattr(value, "state_dict"):
                value = value.state_dict()
            elif isinstance(value, Tensor):
                value = value.clone()
            state[key] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != type(self).__name__:
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a {type(self).__name__} state_dict (it holds {kind!r})")
        self.steps, self._examples = state["steps"], state["examples"]
        self._best_eval = state["best_eval"]
        self.problem.data_epoch = state["data_epoch"]
        self.problem.data_root = state["data_root"]
        self.problem.generator.set_state(state["generator"])
        device = self.problem.device
        for key in self._state_keys:
            current, value = getattr(self, key), state[key]
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(value)
            else:
                setattr(self, key, value.to(device).clone() if isinstance(value, Tensor)
                        else value)


# ----------------------------------------------------------------------------
# Builders (lazy imports: the searcher modules import this one)
# ----------------------------------------------------------------------------


def build_lamarck(problem: Any, **options: Any):
    """:class:`~evotorch_mqa_moe.lamarck.LamarckGA`: children learn and keep what they learnt.

    ``build_lamarck(problem, *, popsize, stdev, **options)``: see
    :func:`evotorch_mqa_moe.lamarck.build_lamarck`.
    """
    from .lamarck import build_lamarck as build

    return build(problem, **options)


def build_baldwin(problem: Any, **options: Any):
    """:class:`~evotorch_mqa_moe.lamarck.BaldwinGA`: fitness after learning, genome untouched.

    See :func:`evotorch_mqa_moe.lamarck.build_baldwin`.
    """
    from .lamarck import build_baldwin as build

    return build(problem, **options)


def build_pbt(problem: Any, **options: Any):
    """:class:`~evotorch_mqa_moe.pbt.PopulationBasedTraining` (``stdev`` does not apply).

    See :func:`evotorch_mqa_moe.pbt.build_pbt`.
    """
    from .pbt import build_pbt as build

    return build(problem, **options)


_GA_SPACE = {
    "popsize": ("int", 8, 128),
    "stdev": ("log", 1e-3, 0.1),
    "k": ("int", 1, 10),
    "lr": ("log", 1e-4, 1e-1),
    "mutation_probability": ("log", 0.01, 1.0),
    "truncation_fraction": ("float", 0.1, 0.6),
}
SEARCH_SPACES: dict[str, dict[str, tuple]] = {
    "lamarck": dict(_GA_SPACE),
    "baldwin": dict(_GA_SPACE),
    "pbt": {
        "popsize": ("int", 4, 64),
        "lr": ("log", 1e-4, 1e-1),
        "interval": ("int", 2, 50),
        "exploit_fraction": ("float", 0.1, 0.5),
        "lr_spread": ("log", 1.0, 100.0),
    },
}
"""Declarative tuning ranges per hybrid searcher (keys are builder options, popsize, stdev)."""
