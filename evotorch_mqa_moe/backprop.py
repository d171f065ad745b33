"""The backprop reference: Adam on the same model, task loss and data stream as the searchers.

:class:`BackpropTrainer` looks like a searcher to the runner (``step()``,
``status``, ``problem``), so ``adam`` can be compared with the evolutionary
searchers under the same budget, checkpointing and reporting.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parameters_to_vector

from .model import MQAMoETransformer
from .problem import TransformerProblem

__all__ = ["BackpropTrainer"]


class BackpropTrainer:
    """Adam on one :class:`MQAMoETransformer`, minimising ``task.loss`` on fresh batches.

    Each step draws one batch from the problem's data stream (the same batches
    a searcher over this problem sees, one per generation) and takes one Adam
    step. The network starts from the problem's initialisation
    (:meth:`TransformerProblem.init_center`), like the ES searchers' centre.

    Args:
        problem: its task must be supervised (``sample`` and ``loss``).
        lr: Adam's learning rate. 3e-3 trained ``reverse`` to 100% exact in
            ~250 steps of batch 64 in the design measurements.
        batch_size: examples per step; default the task's ``batch_size``.
    """

    def __init__(self, problem: TransformerProblem, *, lr: float = 3e-3,
                 batch_size: int | None = None, weight_decay: float = 0.0):
        task = problem.task
        if not (callable(getattr(task, "sample", None)) and callable(getattr(task, "loss", None))):
            raise ValueError(f"adam needs a supervised task (sample + loss); "
                             f"{task.name!r} is not one")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.problem = problem
        self.batch_size = batch_size or task.batch_size
        self.model = MQAMoETransformer(problem.config).to(problem.device)
        torch.nn.utils.vector_to_parameters(problem.init_center().to(problem.device),
                                            self.model.parameters())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr,
                                          weight_decay=weight_decay)
        self.steps = 0
        self._loss = float("nan")

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

    @property
    def status(self) -> dict[str, Any]:
        fitness = -self._loss
        return {"iter": self.steps, "best_eval": fitness, "mean_eval": fitness,
                "pop_best_eval": fitness,
                "center": parameters_to_vector(self.model.parameters()).detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": self.steps, "loss": self._loss,
                "data_epoch": self.problem._data_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps, self._loss = state["steps"], state["loss"]
        self.problem._data_epoch = state["data_epoch"]
