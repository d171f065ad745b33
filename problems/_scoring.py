"""Per-individual losses and accuracies of population outputs against shared targets.

Outputs carry the population axis ``P`` in front of the targets' shape and the
class (vocabulary) axis ``V`` last: ``(P, *S, V)`` against targets ``S`` (e.g.
``S = (B, T)`` for per-position outputs, ``S = (B,)`` for pooled ones). Target
entries equal to :data:`IGNORE` are not scored (e.g. the input-echo positions of
a seq2seq task).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE", "masked_cross_entropy", "accuracies"]

IGNORE = -100
"""Target value of positions that are not scored (PyTorch's ``ignore_index`` default)."""


def _check(outputs: Tensor, targets: Tensor) -> None:
    if outputs.dim() != targets.dim() + 2 or outputs.shape[1:-1] != targets.shape:
        raise ValueError(
            f"outputs {tuple(outputs.shape)} must be (P, *targets.shape, V) for targets "
            f"{tuple(targets.shape)}"
        )


def masked_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats) over the scored targets, per individual.

    Args:
        outputs: logits ``(P, *S, V)``.
        targets: class ids ``S`` in ``[0, V)``, or :data:`IGNORE`.
    Returns:
        ``(P,)``, differentiable in ``outputs``. Uniform logits give exactly ``log V``.
    """
    _check(outputs, targets)
    P, V = outputs.shape[0], outputs.shape[-1]
    count = (targets != IGNORE).sum()
    if int(count) == 0:
        raise ValueError("targets hold no scored position (all are IGNORE)")
    flat_targets = targets.reshape(1, -1).expand(P, -1).reshape(-1)
    nll = F.cross_entropy(outputs.reshape(-1, V), flat_targets, ignore_index=IGNORE,
                          reduction="none")  # (P * prod(S),), 0 where ignored
    return nll.view(P, -1).sum(dim=1) / count


def accuracies(outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Argmax accuracy per individual.

    Args:
        outputs: logits ``(P, B, *R, V)``; ``R`` may be empty (pooled outputs).
        targets: ``(B, *R)``, class ids or :data:`IGNORE`.
    Returns:
        ``token_accuracy`` (share of scored targets predicted right) and
        ``exact_accuracy`` (share of the B examples with every scored target
        right), each ``(P,)``.
    """
    _check(outputs, targets)
    P, B = outputs.shape[0], targets.shape[0]
    scored = (targets != IGNORE).reshape(B, -1)  # (B, R)
    hit = outputs.argmax(dim=-1).reshape(P, B, -1) == targets.reshape(1, B, -1)  # (P, B, R)
    token = (hit & scored).sum(dim=(1, 2)) / scored.sum()
    exact = (hit | ~scored).all(dim=2).float().mean(dim=1)
    return {"token_accuracy": token.float(), "exact_accuracy": exact}
