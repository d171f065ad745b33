"""Supervised tasks whose examples are generated: the shared batch/test-set/scoring plumbing.

A :class:`SyntheticTask` draws training batches with the caller's
``torch.Generator`` and builds its fixed held-out test set from its own ``seed``
option (through a generator seeded from the task name and ``seed``, so a problem
seeded with the same number does not train on the test set). Its loss is the
mean cross-entropy over scored targets (:func:`~._scoring.masked_cross_entropy`),
so ``fitness = -loss`` is at most 0, and 0 is reached by perfect, confident outputs.

:class:`TokenMapTask` specialises it to "random tokens in, a fixed function of
them out, one output token per input position" (``reverse``, ``sort``).
"""

from __future__ import annotations

import math
import zlib
from abc import abstractmethod

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_choice, check_int
from evotorch_mqa_moe.model import TransformerConfig
from evotorch_mqa_moe.problem import SupervisedTask

from ._scoring import IGNORE, accuracies, masked_cross_entropy

__all__ = ["SyntheticTask", "TokenMapTask", "test_generator"]


def test_generator(name: str, seed: int) -> torch.Generator:
    """A CPU generator for the held-out set of task ``name``, from its ``seed`` option.

    The seed is mixed with the name (CRC32), so the test set differs from the
    batches a generator seeded with plain ``seed`` would draw.
    """
    return torch.Generator().manual_seed(zlib.crc32(f"{name}/test/{seed}".encode()))


class SyntheticTask(SupervisedTask):
    """Base of generated supervised tasks (options ``batch_size``, ``test_size``, ``seed``).

    Subclasses implement :meth:`make_batch` and :meth:`default_config`; they may
    override :meth:`build_test_set` and :meth:`score`.

    ``fitness="metric"`` (subclasses that pass it on: ``reverse``, ``sort``,
    ``addition``) makes the fitness the exact-match rate of the argmax outputs on the
    training batch (the held-out ``exact_accuracy`` computed on the batch) instead of
    ``-loss``: a sequence-level objective without a gradient, for the gradient-free
    searchers (the gradient searchers refuse it). :meth:`rewards` scores sampled
    outputs the same way, one 0/1 reward per example (``reinforce``).

    Attributes:
        batch_size: examples per fitness evaluation.
        test_size: examples in the held-out test set.
        seed: seed of the held-out test set (and of any fixed structure the task has).
    """

    target_metric = "exact_accuracy"

    def __init__(self, *, batch_size: int = 64, test_size: int = 1024, seed: int = 0,
                 fitness: str = "loss"):
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.test_size = check_int("test_size", test_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.fitness_mode = check_choice("fitness", fitness, ("loss", "metric"))
        self._test: tuple[Tensor, Tensor] | None = None

    @abstractmethod
    def make_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_size`` fresh examples ``(inputs, targets)`` drawn with ``generator``."""

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A training batch ``(inputs, targets)`` (CPU), a function of the generator's state."""
        check_int("batch_size", batch_size, 1)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return self.make_batch(batch_size, generator)

    def build_test_set(self) -> tuple[Tensor, Tensor]:
        """The held-out set; by default ``test_size`` examples from :func:`test_generator`."""
        return self.make_batch(self.test_size, test_generator(self.name, self.seed))

    def test_set(self) -> tuple[Tensor, Tensor]:
        """The fixed held-out ``(inputs, targets)``, built once and cached."""
        if self._test is None:
            self._test = self.build_test_set()
        return self._test

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """(P,) mean cross-entropy in nats of logits (P, B, ..., V) over the scored targets."""
        return masked_cross_entropy(outputs, targets)

    def score(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``token_accuracy`` and ``exact_accuracy``, each (P,)."""
        return accuracies(outputs, targets)

    def fitness(self, model, generator: torch.Generator) -> Tensor:
        """(P,) ``-loss`` (``fitness="loss"``) or :meth:`metric_fitness` (``"metric"``) of
        one training batch."""
        if self.fitness_mode == "loss":
            return super().fitness(model, generator)
        inputs, targets = self.sample(self.batch_size, generator)
        with torch.no_grad():
            outputs = model(inputs.to(model.device))
            return self.metric_fitness(outputs, targets.to(model.device))

    def metric_fitness(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """(P,) the exact-match rate of the argmax of logits (P, B, ..., V)."""
        return self.rewards(outputs.argmax(dim=-1), targets).mean(dim=1)

    def rewards(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """(S, B) float: 1 where output tokens (S, B, ...) get every scored target right."""
        B = targets.shape[0]
        scored = (targets != IGNORE).reshape(1, B, -1)
        hit = tokens.reshape(tokens.shape[0], B, -1) == targets.reshape(1, B, -1)
        return (hit | ~scored).all(dim=2).float()

    def decision_mask(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """(S, B, ...) bool: the output positions a reward depends on (the scored ones)."""
        return (targets != IGNORE).unsqueeze(0).expand(tokens.shape)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


class TokenMapTask(SyntheticTask):
    """Uniform random tokens ``(B, L)`` in, ``transform(tokens)`` ``(B, L)`` out.

    Every position is scored. Outputs are logits ``(P, B, L, V)``. Chance (uniform
    guessing) is ``1/V`` per token and ``V**-L`` per sequence; the ceiling is 1.0
    with loss 0.

    Options: ``vocab_size`` (>= 2), ``seq_len`` (>= 2), ``batch_size``,
    ``test_size``, ``seed``, ``fitness`` (``"loss"`` or ``"metric"``).
    """

    def __init__(self, *, vocab_size: int = 8, seq_len: int = 8, batch_size: int = 64,
                 test_size: int = 1024, seed: int = 0, fitness: str = "loss"):
        super().__init__(batch_size=batch_size, test_size=test_size, seed=seed,
                         fitness=fitness)
        self.vocab_size = check_int("vocab_size", vocab_size, 2)
        self.seq_len = check_int("seq_len", seq_len, 2, 4096)

    @abstractmethod
    def transform(self, tokens: Tensor) -> Tensor:
        """Targets (B, L) of input tokens (B, L)."""

    def make_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = torch.randint(self.vocab_size, (batch_size, self.seq_len), generator=generator)
        return tokens, self.transform(tokens)

    def default_config(self) -> TransformerConfig:
        """Embed 16, 1 layer, 2 query heads sharing one key/value head, 2 experts of 32,
        learned positions (~3.5k parameters at vocab 8, length 8)."""
        return TransformerConfig(
            vocab_size=self.vocab_size, embed_dim=16, num_layers=1, num_heads=2,
            num_kv_heads=1, expert_dim=32, num_experts=2, max_seq_len=self.seq_len,
            positional="learned",
        )

    def chance(self) -> dict[str, float]:
        """Metrics of uniform guessing."""
        return {"loss": math.log(self.vocab_size), "token_accuracy": 1 / self.vocab_size,
                "exact_accuracy": self.vocab_size ** -self.seq_len}

    def ceiling(self) -> dict[str, float]:
        """Metrics of a perfect model."""
        return {"loss": 0.0, "token_accuracy": 1.0, "exact_accuracy": 1.0}
