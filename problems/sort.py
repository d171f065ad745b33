"""``sort``: output the input tokens sorted."""

from __future__ import annotations

from torch import Tensor

from ._synthetic import TokenMapTask

__all__ = ["SortTask"]


class SortTask(TokenMapTask):
    """Random tokens ``x`` (B, L) in (with repeats); the target is ``x`` sorted ascending.

    Output position ``t`` holds the ``t``-th smallest input token: the model must
    count, over the whole input, how many tokens are smaller than each value.
    Metrics: ``token_accuracy``, ``exact_accuracy`` (the target metric) on a fixed
    test set. Chance (uniform guessing): ``1/V`` per token, ``V**-L`` per sequence;
    ceiling 1.0 (loss 0).

    Options: ``vocab_size=8``, ``seq_len=8``, ``batch_size=64``, ``test_size=1024``,
    ``seed=0`` (of the test set), ``fitness="loss"`` (``"metric"``: the exact-match rate
    of the training batch, for gradient-free searchers).
    """

    name = "sort"

    def transform(self, tokens: Tensor) -> Tensor:
        return tokens.sort(dim=-1).values
