"""Vectorised optimisers: :class:`PopulationSGD` and :class:`PopulationAdam` update all
``P`` rows of a population at once, each with its own learning rate and state,
exactly as ``P`` independent ``torch.optim.SGD`` / ``torch.optim.Adam`` would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_int

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
