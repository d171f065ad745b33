"""Input checks: the shapes, dtypes and token ids a model accepts, each refusal naming
the bad value, and the preparation of a batch for a population pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import TransformerConfig


def check_inputs(config: TransformerConfig, inputs: Tensor, popsize: int | None, *,
                 token_range: bool = True) -> None:
    """Raise ``ValueError``/``TypeError`` naming the problem if ``inputs`` do not fit.

    Shapes and dtypes are checked without touching the data. ``token_range``:
    also check that token ids lie in ``[0, vocab_size)``, which reads one pair of
    numbers back from the device (one host synchronisation): check once per batch,
    not per chunk; :func:`population_forward` defers it to the end of its pass.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    base = 2 if config.token_inputs else 3
    what = "tokens (B, T)" if config.token_inputs else f"vectors (B, T, {config.input_dim})"
    ranks = (base,) if popsize is None else (base, base + 1)
    if inputs.dim() not in ranks:
        per = "" if popsize is None else f" or per individual (P={popsize}, ...)"
        raise ValueError(f"inputs must be {what}{per}, got shape {tuple(inputs.shape)}")
    if popsize is not None and inputs.dim() == base + 1 and inputs.shape[0] != popsize:
        raise ValueError(
            f"per-individual inputs have {inputs.shape[0]} rows but the population has {popsize}"
        )
    T = inputs.shape[-1] if config.token_inputs else inputs.shape[-2]
    if T < 1 or T > config.max_seq_len:
        raise ValueError(f"sequence length {T} is outside [1, max_seq_len={config.max_seq_len}]")
    if inputs.numel() == 0:
        raise ValueError(f"inputs are empty: shape {tuple(inputs.shape)}")
    if config.token_inputs:
        if inputs.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"token inputs must be an integer tensor, got dtype {inputs.dtype}")
        if token_range:
            _raise_unless_in_vocab(config, _token_bounds(inputs))
    else:
        if not inputs.is_floating_point():
            raise TypeError(f"vector inputs must be floating point, got dtype {inputs.dtype}")
        if inputs.shape[-1] != config.input_dim:
            raise ValueError(
                f"vector inputs have width {inputs.shape[-1]}, "
                f"expected input_dim={config.input_dim}"
            )


def _as_index(tokens: Tensor) -> Tensor:
    """Token ids as int64/int32, the dtypes embedding lookups accept (uint8 would be a mask)."""
    return tokens if tokens.dtype in (torch.int64, torch.int32) else tokens.long()


def _token_bounds(inputs: Tensor) -> Tensor:
    """(2,) int64 smallest and largest token id, left on ``inputs``' device (no read-back)."""
    lo, hi = torch.aminmax(inputs)
    return torch.stack([lo, hi]).long()


def _raise_unless_in_vocab(config: TransformerConfig, bounds: Tensor) -> None:
    """Read ``bounds`` (from :func:`_token_bounds`) back, once, and name a token id out of range."""
    lo, hi = bounds.tolist()
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside [0, vocab_size={config.vocab_size})")


def prepare_inputs(config: TransformerConfig, inputs: Tensor, popsize: int,
                   device: torch.device, dtype: torch.dtype, *, validate: bool = True
                   ) -> tuple[Tensor, Tensor | None, bool]:
    """Check ``inputs`` for a population pass and make them ready for the layer math.

    Shared by both population front doors (:func:`population_forward` and
    :func:`evotorch_mqa_moe.lowrank.lowrank_population_forward`). Token ids become
    int64/int32 and, with ``validate``, are clamped into ``[0, vocab_size)`` for the
    pass: the returned ``bounds`` (2,) (left on the device, no read-back) go to
    :func:`_raise_unless_in_vocab` once the pass is queued. Vectors take ``dtype``.

    Returns:
        ``(inputs, bounds or None, per_individual)``; ``per_individual`` is True for
        inputs with a leading population axis (P, B, T[, I]).
    """
    check_inputs(config, inputs, popsize=popsize, token_range=False)
    if inputs.device != torch.device(device):
        raise ValueError(f"inputs are on {inputs.device} but params on {device}")
    bounds = None
    if config.token_inputs and validate:
        # No read-back before the pass is queued: out-of-range ids would fail inside
        # the embedding (a device-side assert on a GPU), so they are clamped for the
        # pass and reported, by value, at its end.
        bounds = _token_bounds(inputs)
        inputs = _as_index(inputs).clamp(0, config.vocab_size - 1)
    elif config.token_inputs:
        inputs = _as_index(inputs)
    if not config.token_inputs and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    return inputs, bounds, inputs.dim() == (3 if config.token_inputs else 4)
