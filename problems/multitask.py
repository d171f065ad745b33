"""``multitask``: the first token names an operation (reverse, sort, copy) on the rest."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_int
from evotorch_mqa_moe.model import TransformerConfig

from ._scoring import IGNORE
from ._synthetic import SyntheticTask

__all__ = ["MultitaskTask", "OPERATIONS"]

OPERATIONS = ("reverse", "sort", "copy")
"""The operations, in the order of their tokens: operation ``i`` is token ``vocab_size + i``."""


class MultitaskTask(SyntheticTask):
    """An operation token, then ``L`` random symbols; the target is the operation applied.

    Inputs ``(B, 1 + L)``: position 0 holds the operation token ``vocab_size + i``
    for operation ``OPERATIONS[i]`` (``reverse``, ``sort`` ascending, ``copy``),
    drawn uniformly per example; positions ``1..L`` hold symbols in
    ``[0, vocab_size)``. Targets ``(B, 1 + L)``: :data:`IGNORE` at position 0,
    the operation's output at positions ``1..L``. The same symbols must be routed
    to different computations depending on the first token, which a per-token
    gate cannot see (an attention gate can: ``gating="attention"``).

    Metrics: ``token_accuracy``, ``exact_accuracy`` (target) on a fixed test set.
    Chance (uniform guessing over the ``V`` symbols): ``1/V`` per token,
    ``V**-L`` per sequence, loss ``ln V``; ceiling 1.0 (loss 0).

    Options: ``vocab_size=8`` symbols (>= 2), ``seq_len=8`` input length (2..4095),
    ``batch_size=64``, ``test_size=1024``, ``seed=0`` (of the test set).
    """

    name = "multitask"
    operations = OPERATIONS

    def __init__(self, *, vocab_size: int = 8, seq_len: int = 8, batch_size: int = 64,
                 test_size: int = 1024, seed: int = 0):
        super().__init__(batch_size=batch_size, test_size=test_size, seed=seed)
        self.vocab_size = check_int("vocab_size", vocab_size, 2)
        self.seq_len = check_int("seq_len", seq_len, 2, 4095)

    def operation_token(self, operation: str) -> int:
        """The input token that names ``operation`` (one of :data:`OPERATIONS`)."""
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
        return self.vocab_size + OPERATIONS.index(operation)

    def apply(self, operations: Tensor, symbols: Tensor) -> Tensor:
        """Targets (B, L) of operation indices (B,) into :data:`OPERATIONS` on symbols (B, L)."""
        results = torch.stack([symbols.flip(-1), symbols.sort(dim=-1).values, symbols])
        index = operations.view(1, -1, 1).expand(1, *symbols.shape)
        return results.gather(0, index).squeeze(0)

    def make_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """inputs (B, 1+L) tokens in [0, V+3); targets (B, 1+L): IGNORE, then the result."""
        operations = torch.randint(len(OPERATIONS), (batch_size,), generator=generator)
        symbols = torch.randint(self.vocab_size, (batch_size, self.seq_len), generator=generator)
        inputs = torch.cat([(operations + self.vocab_size)[:, None], symbols], dim=1)
        targets = torch.cat([torch.full((batch_size, 1), IGNORE, dtype=torch.long),
                             self.apply(operations, symbols)], dim=1)
        return inputs, targets

    def default_config(self) -> TransformerConfig:
        """Embed 16, 2 layers, 2 query heads sharing one key/value head, 4 experts of 16,
        learned positions, ``V + 3`` input tokens and a ``V``-way head (6,736 parameters
        at vocab 8, length 8)."""
        return TransformerConfig(
            vocab_size=self.vocab_size + len(OPERATIONS), output_dim=self.vocab_size,
            embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, expert_dim=16,
            num_experts=4, max_seq_len=self.seq_len + 1, positional="learned",
        )

    def chance(self) -> dict[str, float]:
        """Metrics of uniform guessing over the symbols."""
        return {"loss": math.log(self.vocab_size), "token_accuracy": 1 / self.vocab_size,
                "exact_accuracy": self.vocab_size ** -self.seq_len}

    def ceiling(self) -> dict[str, float]:
        """Metrics of a perfect model."""
        return {"loss": 0.0, "token_accuracy": 1.0, "exact_accuracy": 1.0}
