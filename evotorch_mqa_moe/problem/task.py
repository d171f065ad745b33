"""The `Task` protocol: what a problem must provide to be evolved (or trained).

A task owns its data (or environment) and its scoring; the population is handed
to it as a :class:`~evotorch_mqa_moe.model.PopulationModel`, a callable that maps
inputs to outputs for every individual at once. That one shape fits both

* supervised tasks: sample a batch, call the model once, score the outputs;
* episodic tasks: step a vectorised environment, call the model every step on
  each individual's own observations ``(P, B, T, I)``, sum the rewards.

Fitness is always maximised. Held-out metrics are computed on data that search
never sees (a fixed test set, fresh episodes) and reported for the best
individual; the task names the one that matters in ``target_metric``.

Optional: ``sensitivity_inputs(batch_size, generator) -> Tensor``, a batch of
typical inputs for measuring how sensitive the outputs are to each weight (safe
mutation, :mod:`evotorch_mqa_moe.safe_mutation`); supervised tasks answer with a
training batch's inputs, episodic ones (cartpole) with observation windows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from evotorch_mqa_moe.model import PopulationModel, TransformerConfig

__all__ = ["Task", "SupervisedTask"]


@runtime_checkable
class Task(Protocol):
    """What :class:`~evotorch_mqa_moe.problem.TransformerProblem` consumes.

    Attributes:
        name: short identifier, e.g. ``"reverse"``.
        target_metric: the key of :meth:`metrics` that summarises success
            (higher is better), e.g. ``"exact_accuracy"`` or ``"mean_return"``.
    """

    name: str
    target_metric: str

    def default_config(self) -> TransformerConfig:
        """A model configuration sized to learn this task on a small CPU."""
        ...

    def fitness(self, model: PopulationModel, generator: torch.Generator) -> Tensor:
        """(P,) fitness of every individual, higher is better.

        ``generator`` (a CPU generator) is the only source of randomness: all
        individuals of one call must see the same data (common random numbers),
        and the same generator state must give the same data.
        """
        ...

    def metrics(self, model: PopulationModel) -> dict[str, Tensor]:
        """Held-out metrics, each a (P,) tensor; deterministic for given weights."""
        ...


class SupervisedTask(ABC):
    """Base for tasks that map input batches to target batches.

    Subclasses implement :meth:`sample`, :meth:`loss`, :meth:`test_set` and
    :meth:`score`; the fitness is ``-loss`` on a freshly sampled batch, which
    is also what backprop minimises, so evolution and training optimise the
    same objective.

    Attributes:
        batch_size: examples per fitness evaluation (shared by the population).
    """

    name: str = "supervised"
    target_metric: str = "accuracy"
    batch_size: int = 64

    @abstractmethod
    def default_config(self) -> TransformerConfig: ...

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A batch ``(inputs, targets)`` on the CPU, drawn with ``generator``."""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """(P,) differentiable loss of outputs (P, B, ...) against targets (B, ...)."""

    @abstractmethod
    def test_set(self) -> tuple[Tensor, Tensor]:
        """The fixed held-out ``(inputs, targets)`` (CPU), the same on every call."""

    @abstractmethod
    def score(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Held-out metrics, each (P,), of outputs (P, B, ...) against targets."""

    def sensitivity_inputs(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Typical inputs for output-sensitivity measurements: a training batch's inputs."""
        return self.sample(batch_size, generator)[0]

    def fitness(self, model: PopulationModel, generator: torch.Generator) -> Tensor:
        inputs, targets = self.sample(self.batch_size, generator)
        with torch.no_grad():
            outputs = model(inputs.to(model.device))
        return -self.loss(outputs, targets.to(model.device))

    def metrics(self, model: PopulationModel) -> dict[str, Tensor]:
        inputs, targets = self.test_set()
        with torch.no_grad():
            outputs = model(inputs.to(model.device))
            targets = targets.to(model.device)
            return {"loss": self.loss(outputs, targets), **self.score(outputs, targets)}
