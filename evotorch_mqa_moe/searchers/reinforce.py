"""``reinforce``: policy gradient on the task's sequence reward with a group-mean baseline
(GRPO-like), one network, the baseline an RL practitioner would run against evolution.

Each step draws one training batch from the problem's data stream, runs the network
once, and samples ``popsize`` (the *group size* ``G``) outputs per example from the
model's own distribution: every output position independently from its softmax (the
example tasks' outputs are one token per position, e.g. g2p's slots). Each sample is
scored with the task's reward (:meth:`rewards`: 1 if the decoded sequence is right,
the quantity ``fitness="metric"`` averages) and its advantage is its reward minus the
mean reward of its group (the other samples of the same example), divided by the
group's standard deviation when ``normalize`` (GRPO). The loss is

    ``- mean over samples and examples of advantage * log p(sample)``

where ``log p`` sums the log-probabilities of the positions that decide the sample's
decoded sequence (:meth:`decision_mask`: g2p's slots up to and including the first
END; the scored positions of reverse/sort/addition). Adam takes one step on it.

Cost in forward-equivalents, as for ``adam``: one forward of one network on one task
batch (1) plus its backward (2) = 3 per step of ``task.batch_size`` examples. The
``G`` samples are drawn from that one forward pass (the outputs factorise over
positions), so they cost no further forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from evotorch_mqa_moe._internal.validate import check_bool, check_float, check_int
from evotorch_mqa_moe.model import MQAMoETransformer
from evotorch_mqa_moe.problem import TransformerProblem

from .backprop import FORWARD_EQUIVALENTS_PER_STEP
from .registry import SearcherSpec, register

__all__ = ["ReinforceSearcher", "policy_loss", "group_advantages"]


def group_advantages(rewards: Tensor, normalize: bool) -> Tensor:
    """(G, B) advantages: each reward minus the mean of its example's group of ``G``
    samples, over the group's standard deviation (+1e-6) when ``normalize``."""
    advantages = rewards - rewards.mean(dim=0, keepdim=True)
    if normalize:
        advantages = advantages / (rewards.std(dim=0, keepdim=True, unbiased=False) + 1e-6)
    return advantages


def policy_loss(logits: Tensor, samples: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """The REINFORCE loss ``-mean(advantage * log p(sample))``.

    Args:
        logits: ``(B, T, V)`` one network's outputs.
        samples: ``(G, B, T)`` sampled output ids.
        advantages: ``(G, B)`` (no gradient flows through them).
        mask: ``(G, B, T)`` the positions whose log-probabilities make up ``log p``.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    G = samples.shape[0]
    picked = log_probs.unsqueeze(0).expand(G, *log_probs.shape).gather(
        -1, samples.unsqueeze(-1)).squeeze(-1)  # (G, B, T)
    sequence = (picked * mask).sum(dim=-1)  # (G, B)
    return -(advantages.detach() * sequence).mean()


class ReinforceSearcher:
    """Policy gradient with a group-mean baseline on one :class:`MQAMoETransformer`.

    Args:
        problem: its task must have ``sample``, ``rewards``, ``decision_mask`` and
            ``metric_fitness`` (reverse, sort, addition, g2p, ...).
        group_size: samples per example ``G`` (>= 2; the registry's ``popsize``).
        lr: Adam's learning rate.
        batch_size: examples per step; default the task's ``batch_size``.
        normalize: divide the advantages by the group's reward standard deviation.

    The network starts from :meth:`TransformerProblem.init_center` (``init`` gives a
    pretrained one). ``status``: ``"pop_best_eval"`` / ``"mean_eval"`` are the task's
    ``metric_fitness`` of the network's argmax outputs on the step's batch (measured
    before the update), ``"mean_reward"`` the samples' mean reward, ``"best_eval"``
    the best ``pop_best_eval`` so far.
    """

    def __init__(self, problem: TransformerProblem, *, group_size: int = 8, lr: float = 1e-3,
                 batch_size: int | None = None, normalize: bool = True):
        task = problem.task
        missing = [m for m in ("sample", "rewards", "decision_mask", "metric_fitness")
                   if not callable(getattr(task, m, None))]
        if missing:
            raise ValueError(f"reinforce needs a task with sequence rewards (sample, rewards, "
                             f"decision_mask, metric_fitness); {task.name!r} has no "
                             f"{', '.join(missing)}")
        self.problem = problem
        self.popsize = self.group_size = check_int("group_size", group_size, 2)
        self.lr = check_float("lr", lr)
        self.batch_size = check_int("batch_size", batch_size, none_ok=True) or task.batch_size
        self._task_batch = task.batch_size
        self.normalize = check_bool("normalize", normalize)
        self.model = MQAMoETransformer(problem.config).to(problem.device)
        torch.nn.utils.vector_to_parameters(problem.init_center().to(problem.device),
                                            self.model.parameters())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        seed = int(torch.randint(0, 2**62, (), generator=problem.generator,
                                 device=problem.generator.device))
        self.generator = torch.Generator(device=problem.device).manual_seed(seed)
        self.steps = 0
        self._fitness = float("nan")
        self._reward = float("nan")
        self._best_eval = -math.inf

    def sample_outputs(self, logits: Tensor) -> Tensor:
        """``(G, B, T)`` outputs sampled position by position from logits ``(B, T, V)``."""
        B, T, V = logits.shape
        probs = torch.softmax(logits.detach().float(), dim=-1).reshape(B * T, V)
        drawn = torch.multinomial(probs, self.group_size, replacement=True,
                                  generator=self.generator)  # (B*T, G)
        return drawn.t().reshape(self.group_size, B, T)

    def step(self) -> None:
        """One policy-gradient step on the next batch of the problem's data stream."""
        problem, task = self.problem, self.problem.task
        problem.next_generation()
        inputs, targets = task.sample(self.batch_size, problem.data_generator())
        inputs, targets = inputs.to(problem.device), targets.to(problem.device)
        logits = self.model(inputs)  # (B, T, V)
        samples = self.sample_outputs(logits)
        with torch.no_grad():
            rewards = task.rewards(samples, targets).float()  # (G, B)
            mask = task.decision_mask(samples, targets).float()
            fitness = float(task.metric_fitness(logits.detach().unsqueeze(0), targets)[0])
        loss = policy_loss(logits, samples, group_advantages(rewards, self.normalize), mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self._fitness, self._reward = fitness, float(rewards.mean())
        if not self._best_eval >= fitness:  # also replaces a NaN
            self._best_eval = fitness

    @property
    def evaluations(self) -> int:
        """Forward-equivalents so far: 3 per step of ``task.batch_size`` examples."""
        return FORWARD_EQUIVALENTS_PER_STEP * self.steps * self.batch_size // self._task_batch

    def current_solution(self) -> Tensor:
        """(N,) the network's parameters as one flat vector."""
        return parameters_to_vector(self.model.parameters()).detach()

    @property
    def status(self) -> dict[str, Any]:
        return {"iter": self.steps, "best_eval": self._best_eval, "mean_eval": self._fitness,
                "pop_best_eval": self._fitness, "mean_reward": self._reward,
                "center": self.current_solution()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "steps": self.steps,
                "fitness": self._fitness, "reward": self._reward,
                "best_eval": self._best_eval, "data_epoch": self.problem.data_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"model", "optimizer", "generator", "steps", "fitness", "reward", "best_eval",
                "data_epoch"}
        missing = keys - set(state if isinstance(state, dict) else ())
        if missing:
            raise ValueError(f"not a ReinforceSearcher state_dict: missing {sorted(missing)}")
        self.problem.data_epoch = state["data_epoch"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.steps, self._fitness = state["steps"], state["fitness"]
        self._reward, self._best_eval = state["reward"], state["best_eval"]


def _build(problem: Any, *, popsize: int, stdev: float, **options: Any) -> ReinforceSearcher:
    # popsize is the group size; stdev does not apply (the model's own distribution)
    return ReinforceSearcher(problem, group_size=popsize, **options)


register(SearcherSpec("reinforce", "policy gradient on the sequence reward, group-mean "
                      "baseline (GRPO-like; one network, popsize = samples per example)",
                      _build, default_popsize=8, min_popsize=2,
                      search_space={"lr": ("log", 1e-5, 1e-2), "popsize": ("int", 2, 32)}))
