"""The backprop reference: Adam on the same model, task loss and data stream as the searchers.

:class:`BackpropTrainer` implements the searcher protocol
(:class:`~evotorch_mqa_moe.searchers.Searcher`): ``step()``, ``status``,
``current_solution()``, ``evaluations``, ``state_dict()`` / ``load_state_dict()``,
so ``adam`` runs, checkpoints and is compared under the same budgets as the
evolutionary searchers.

Cost in forward-equivalents: one step is one forward of one network on one
batch (1) plus its backward (2), so 3 per step of ``task.batch_size`` examples
(scaled by ``batch_size / task.batch_size`` for another batch size).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from evotorch_mqa_moe._internal.validate import check_float, check_int
from evotorch_mqa_moe.model import MQAMoETransformer
from evotorch_mqa_moe.problem import TransformerProblem

from .registry import SearcherSpec, check_loss_fitness, register

__all__ = ["BackpropTrainer", "FORWARD_EQUIVALENTS_PER_STEP"]

FORWARD_EQUIVALENTS_PER_STEP = 3  # forward 1 + backward 2, for one network on one task batch


class BackpropTrainer:
    """Adam on one :class:`MQAMoETransformer`, minimising ``task.loss`` on fresh batches.

    Each step draws one batch from the problem's data stream (the same batches
    a searcher over this problem sees, one per generation) and takes one Adam
    step. The network starts from the problem's initialisation
    (:meth:`TransformerProblem.init_center`), like the ES searchers' centre.

    Fitness is ``-loss`` on the step's training batch, measured by the forward
    pass of that step (before its update). ``status["best_eval"]`` is the best
    (highest) such fitness over all steps so far; ``"pop_best_eval"`` and
    ``"mean_eval"`` are this step's. Being measured on a different batch each
    step, it is a noisy running maximum, exactly like the searchers' best-so-far
    (also the best of one batch each generation).

    Args:
        problem: its task must be supervised (``sample`` and ``loss``).
        lr: Adam's learning rate. 1e-2 needed 1.2-2.4x fewer steps to each task's
            threshold than 3e-3 and 2-6x fewer than 1e-3 on reverse (16 tokens),
            sort, addition and language (``bench/learnability.py --lr-sweep
            1e-3,3e-3,1e-2``, docs/problems.md).
        batch_size: examples per step; default the task's ``batch_size``.
        weight_decay: Adam's (L2) weight decay.
    Raises:
        ValueError: an unsupervised task, or a non-positive ``lr`` / ``batch_size``,
            or a negative ``weight_decay``.
    """

    popsize = 1  # one network per step

    def __init__(self, problem: TransformerProblem, *, lr: float = 1e-2,
                 batch_size: int | None = None, weight_decay: float = 0.0):
        task = problem.task
        if not (callable(getattr(task, "sample", None)) and callable(getattr(task, "loss", None))):
            raise ValueError(f"adam needs a supervised task (sample + loss) for its gradients; "
                             f"{task.name!r} is not one")
        check_loss_fitness("adam", task)
        lr = check_float("lr", lr)
        batch_size = check_int("batch_size", batch_size, none_ok=True)
        weight_decay = check_float("weight_decay", weight_decay, 0.0, low_open=False)
        self.problem = problem
        self.batch_size = batch_size or task.batch_size
        self._task_batch = task.batch_size
        self.model = MQAMoETransformer(problem.config).to(problem.device)
        torch.nn.utils.vector_to_parameters(problem.init_center().to(problem.device),
                                            self.model.parameters())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr,
                                          weight_decay=weight_decay)
        self.steps = 0
        self._loss = float("nan")
        self._best_eval = -math.inf

    def step(self) -> None:
        """One Adam step on the next batch of the problem's data stream."""
        self.problem.next_generation()
        inputs, targets = self.problem.task.sample(
            self.batch_size, self.problem.data_generator())
        device = self.problem.device
        outputs = self.model(inputs.to(device)).unsqueeze(0)  # (1, B, ...)
        loss = self.problem.task.loss(outputs, targets.to(device))[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self._loss = float(loss.detach())
        if not self._best_eval >= -self._loss:  # also replaces a NaN
            self._best_eval = -self._loss

    @property
    def evaluations(self) -> int:
        """Forward-equivalents so far: 3 per step of ``task.batch_size`` examples."""
        return FORWARD_EQUIVALENTS_PER_STEP * self.steps * self.batch_size // self._task_batch

    def current_solution(self) -> Tensor:
        """(N,) the network's parameters as one flat vector."""
        return parameters_to_vector(self.model.parameters()).detach()

    @property
    def status(self) -> dict[str, Any]:
        fitness = -self._loss
        return {"iter": self.steps, "best_eval": self._best_eval, "mean_eval": fitness,
                "pop_best_eval": fitness, "center": self.current_solution()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": self.steps, "loss": self._loss, "best_eval": self._best_eval,
                "data_epoch": self.problem.data_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"model", "optimizer", "steps", "loss", "best_eval", "data_epoch"} - set(
            state if isinstance(state, dict) else ())
        if missing:
            raise ValueError(f"not a BackpropTrainer state_dict: missing {sorted(missing)}")
        # the problem's public setter checks the epoch first (ValueError naming it)
        self.problem.data_epoch = state["data_epoch"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps, self._loss = state["steps"], state["loss"]
        self._best_eval = state["best_eval"]


def _build_adam(problem: Any, *, popsize: int, stdev: float, **options: Any) -> BackpropTrainer:
    # one network: popsize and stdev do not apply
    return BackpropTrainer(problem, **options)


register(SearcherSpec("adam", "backprop reference: Adam on the same model, loss and data "
                      "(one network; popsize and stdev do not apply)", _build_adam,
                      default_popsize=1, min_popsize=1, needs_gradient=True,
                      search_space={"lr": ("log", 1e-4, 3e-2)}))
