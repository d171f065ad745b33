"""``majority``: which token occurs most often? Sequence classification on the pooled output."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_int
from evotorch_mqa_moe.model import TransformerConfig

from ._synthetic import SyntheticTask

__all__ = ["MajorityTask"]


class MajorityTask(SyntheticTask):
    """Random tokens (B, L) from ``k`` classes in; the target (B,) is the most frequent one.

    Sequences with a tie for the most frequent token are never drawn (rejection
    sampling), so every label is well defined; for ``k = 2`` this needs an odd
    ``seq_len``, which makes rejection unnecessary. Classes are balanced: each
    batch's labels are a shuffled list with every class ``B // k`` or ``B // k + 1``
    times. The model mean-pools over positions before its ``k``-way head
    (``pooling="mean"``): outputs are ``(P, B, k)``. Order does not matter, so the
    default config has no position code.

    Metrics: ``accuracy`` (the target metric). Chance: the share of the most
    frequent class, ``1/k`` up to rounding (:meth:`chance` reports it on the
    test set); ceiling 1.0 (loss 0).

    Options: ``num_classes=2`` (2..64), ``seq_len=15`` (odd when ``num_classes=2``),
    ``batch_size=64``, ``test_size=1024``, ``seed=0`` (of the test set).
    """

    name = "majority"
    target_metric = "accuracy"

    def __init__(self, *, num_classes: int = 2, seq_len: int = 15, batch_size: int = 64,
                 test_size: int = 1024, seed: int = 0):
        super().__init__(batch_size=batch_size, test_size=test_size, seed=seed)
        self.num_classes = check_int("num_classes", num_classes, 2, 64)
        self.seq_len = check_int("seq_len", seq_len, 1, 4096)
        if self.num_classes == 2 and self.seq_len % 2 == 0:
            raise ValueError(f"seq_len must be odd when num_classes=2 (no ties), got {seq_len!r}")
        if self.num_classes > 2 and self.seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 when num_classes > 2, got {seq_len!r}")

    def make_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """inputs (B, L) tokens in [0, k); targets (B,) the strictly most frequent token."""
        k, L = self.num_classes, self.seq_len
        kept: list[Tensor] = []
        have = 0
        while have < batch_size:  # rejection of ties; one round when k = 2
            tokens = torch.randint(k, (batch_size, L), generator=generator)
            counts = torch.zeros(batch_size, k, dtype=torch.long).scatter_add_(
                1, tokens, torch.ones_like(tokens))
            top2 = counts.topk(2, dim=1).values
            tokens = tokens[top2[:, 0] > top2[:, 1]]
            kept.append(tokens)
            have += tokens.shape[0]
        tokens = torch.cat(kept)[:batch_size]
        counts = torch.zeros(batch_size, k, dtype=torch.long).scatter_add_(
            1, tokens, torch.ones_like(tokens))
        # balance the classes: a cyclic shift of the token ids moves the winner to a label
        # from a shuffled, evenly filled list (counts keep their shape)
        labels = torch.randperm(batch_size, generator=generator) % k
        tokens = (tokens - counts.argmax(dim=1, keepdim=True) + labels[:, None]) % k
        return tokens, labels

    def default_config(self) -> TransformerConfig:
        """Embed 16, 1 layer, 2 query heads sharing one key/value head, 2 experts of 32,
        no position code, mean pooling, a k-way head."""
        return TransformerConfig(
            vocab_size=self.num_classes, embed_dim=16, num_layers=1, num_heads=2,
            num_kv_heads=1, expert_dim=32, num_experts=2, max_seq_len=self.seq_len,
            positional="none", pooling="mean",
        )

    def score(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``accuracy`` (P,) of pooled logits (P, B, k) against labels (B,)."""
        if outputs.dim() != 3 or targets.dim() != 1:
            raise ValueError(f"majority scores pooled outputs (P, B, k) against labels (B,), "
                             f"got {tuple(outputs.shape)} and {tuple(targets.shape)}")
        return {"accuracy": super().score(outputs, targets)["token_accuracy"]}

    def chance(self) -> dict[str, float]:
        """Uniform logits' loss, and the accuracy of always answering the test set's most
        frequent class."""
        _, labels = self.test_set()
        share = labels.bincount(minlength=self.num_classes).max().item() / labels.numel()
        return {"loss": math.log(self.num_classes), "accuracy": share}

    def ceiling(self) -> dict[str, float]:
        return {"loss": 0.0, "accuracy": 1.0}
