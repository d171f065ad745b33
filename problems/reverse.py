"""``reverse``: output the input sequence reversed."""

from __future__ import annotations

from torch import Tensor

from ._synthetic import TokenMapTask

__all__ = ["ReverseTask"]


class ReverseTask(TokenMapTask):
    """Random tokens ``x`` (B, L) in; at every position ``t`` the target is ``x[L-1-t]``.

    The encoder sees the whole input (bidirectional attention), so each output
    position must attend to its mirror position: positions matter, hence learned
    position embeddings. Metrics: ``token_accuracy``, ``exact_accuracy`` (the
    target metric) on a fixed test set. Chance: ``1/V`` per token, ``V**-L`` per
    sequence; ceiling 1.0 (loss 0).

    Options: ``vocab_size=8``, ``seq_len=8``, ``batch_size=64``, ``test_size=1024``,
    ``seed=0`` (of the test set), ``fitness="loss"`` (``"metric"``: the exact-match rate
    of the training batch, for gradient-free searchers).
    """

    name = "reverse"

    def transform(self, tokens: Tensor) -> Tensor:
        return tokens.flip(-1)
