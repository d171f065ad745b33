"""``addition``: the seq2seq addition task of EvoJAX, as digit tokens for an encoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_choice, check_int
from evotorch_mqa_moe.model import TransformerConfig

from ._scoring import IGNORE
from ._synthetic import SyntheticTask

__all__ = ["AdditionTask", "PLUS", "EQUALS", "BLANK"]

PLUS, EQUALS, BLANK = 10, 11, 12
"""Token ids after the digits 0-9: the ``+`` and ``=`` separators and an empty answer slot."""


class AdditionTask(SyntheticTask):
    """Add two ``n``-digit numbers written as digit tokens; answer with ``n + 1`` digits.

    Layout (``T = 3n + 3`` tokens, vocabulary 13), e.g. ``n = 3``, 123 + 989 = 1112
    with ``digit_order="lsb"``::

        inputs   3 2 1 + 9 8 9 =  _ _ _ _
        targets  . . . . . . . .  2 1 1 1     (. = not scored)

    Operands are uniform in ``[0, 10**n)``, zero-padded to ``n`` digits; the sum is
    zero-padded to ``n + 1`` digits. Only the answer slots are scored, and the
    head has 10 outputs (the digits), so outputs are ``(P, B, T, 10)``.

    Digit order: ``"lsb"`` (default) writes operands and answer least-significant
    digit first, so answer digit ``i`` depends on operand digits ``<= i`` only
    (the carry flows the way the digits are written); this is much easier to
    learn than ``"msb"`` (ordinary writing), also offered.

    Metrics: ``token_accuracy`` (per answer digit) and ``exact_accuracy`` (whole
    sum right; the target metric). Chance (uniform guessing): ``1/10`` per digit,
    ``10**-(n+1)`` per sum; ceiling 1.0 (loss 0).

    Options: ``num_digits=1`` (1..15), ``digit_order="lsb"``, ``batch_size=64``,
    ``test_size=1024``, ``seed=0`` (of the test set), ``fitness="loss"`` (``"metric"``:
    the exact-match rate of the training batch, for gradient-free searchers).

    The default is sized so that the task measures search, not model capacity or
    budget (``bench/learnability.py``, seeds 0-2, batch 64, Adam lr 1e-2, default
    model; figures in ``docs/problems.md``): with ``num_digits=1`` (a digit sum and
    its carry) Adam reaches 95% exact in 200-250 steps and PGPE (popsize 200) 72%
    exact in 100k evaluations. ``num_digits=2`` adds carry propagation: Adam needs
    450-600 steps, PGPE reached 2% exact in 100k evaluations. ``num_digits=3`` (the
    former default) takes Adam 950-2,200 steps.
    """

    name = "addition"
    vocab_size = 13
    output_dim = 10

    def __init__(self, *, num_digits: int = 1, digit_order: str = "lsb", batch_size: int = 64,
                 test_size: int = 1024, seed: int = 0, fitness: str = "loss"):
        super().__init__(batch_size=batch_size, test_size=test_size, seed=seed,
                         fitness=fitness)
        self.num_digits = check_int("num_digits", num_digits, 1, 15)
        self.digit_order = check_choice("digit_order", digit_order, ("lsb", "msb"))

    @property
    def seq_len(self) -> int:
        return 3 * self.num_digits + 3

    def digits(self, numbers: Tensor, width: int) -> Tensor:
        """(B,) non-negative integers -> (B, width) digit tokens in ``digit_order``."""
        powers = 10 ** torch.arange(width, device=numbers.device)  # least significant first
        digits = torch.div(numbers[:, None], powers, rounding_mode="floor") % 10
        return digits if self.digit_order == "lsb" else digits.flip(-1)

    def make_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """inputs (B, 3n+3) tokens in [0, 13); targets (B, 3n+3): sum digits or IGNORE."""
        n = self.num_digits
        a, b = torch.randint(10**n, (2, batch_size), generator=generator)
        column = torch.full((batch_size, 1), 0, dtype=torch.long)
        inputs = torch.cat([
            self.digits(a, n), column + PLUS, self.digits(b, n), column + EQUALS,
            torch.full((batch_size, n + 1), BLANK, dtype=torch.long),
        ], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, 2 * n + 2:] = self.digits(a + b, n + 1)
        return inputs, targets

    def default_config(self) -> TransformerConfig:
        """Embed 16, 2 layers, 2 query heads sharing one key/value head, 2 experts of 32,
        learned positions, a 10-digit head (6,622 parameters at 1 digit, 6,718 at 3).

        Two layers are needed: with one, Adam stayed below 35% exact on one digit
        after 3,000 steps."""
        return TransformerConfig(
            vocab_size=self.vocab_size, output_dim=self.output_dim, embed_dim=16, num_layers=2,
            num_heads=2, num_kv_heads=1, expert_dim=32, num_experts=2,
            max_seq_len=self.seq_len, positional="learned",
        )

    def chance(self) -> dict[str, float]:
        """Metrics of uniform guessing over the 10 digits."""
        return {"loss": math.log(10), "token_accuracy": 0.1,
                "exact_accuracy": 10.0 ** -(self.num_digits + 1)}

    def ceiling(self) -> dict[str, float]:
        return {"loss": 0.0, "token_accuracy": 1.0, "exact_accuracy": 1.0}
