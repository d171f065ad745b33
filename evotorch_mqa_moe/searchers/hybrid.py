"""What the hybrid searchers (``lamarck``, ``baldwin``, ``pbt``) share: training and
scoring a population on the problem's data stream, and :class:`HybridSearcher`, the
protocol plumbing (cost, status, exact resume).

The searchers themselves live in :mod:`evotorch_mqa_moe.searchers.lamarck` (a GA whose
children learn) and :mod:`evotorch_mqa_moe.searchers.pbt` (population-based training).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_float, check_int

from .gradients import population_loss_and_grad, supervised_loss
from .population_optim import PopulationAdam, PopulationSGD

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
    from evotorch_mqa_moe.problem import (
        worst_for_nonfinite,  # the problem imports EvoTorch: only when used
    )

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
