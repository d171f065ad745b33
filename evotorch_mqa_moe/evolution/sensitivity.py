"""Output sensitivity of every gene: how far the network's outputs move per unit change
of each parameter, the measure behind safe mutation (Lehman et al. 2018)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_choice, check_float, check_int
from evotorch_mqa_moe.model import (
    TransformerConfig,
    bytes_per_individual,
    check_inputs,
    default_chunk_size,
    num_parameters,
    population_forward,
)

METHODS = ("rms", "sum", "abs")

def _check_method(method: object) -> str:
    return check_choice("method", method, METHODS)  # type: ignore[return-value]


# ----------------------------------------------------------------------------
# Sensitivity
# ----------------------------------------------------------------------------


def _shape_bt(config: TransformerConfig, inputs: Tensor) -> tuple[int, int]:
    return tuple(inputs.shape[-2:] if config.token_inputs else inputs.shape[-3:-1])


def output_sensitivity(
    config: TransformerConfig,
    values: Tensor,
    inputs: Tensor,
    *,
    method: str = "rms",
    projections: int = 4,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """Per-gene sensitivity of every individual's outputs, ``(P, N)``, vectorised.

    With ``y[r, k]`` the output unit ``k`` (of ``O``) at output row ``r`` (of ``M``:
    every batch item and position, or every batch item when the config pools) of
    the network ``values[p]`` on ``inputs``, and ``w_j`` its gene ``j``:

    * ``"sum"`` (SM-G-SUM): ``s_j = sqrt(sum_k ((1/M) sum_r dy[r, k]/dw_j) ** 2)``;
    * ``"abs"`` (SM-G-ABS): ``s_j = sqrt(sum_k ((1/M) sum_r |dy[r, k]/dw_j|) ** 2)``;
    * ``"rms"``: an unbiased estimate of
      ``s_j ** 2 = (1/M) sum_r sum_k (dy[r, k]/dw_j) ** 2`` (the mean over rows of
      the squared output change per unit change of ``w_j``), namely
      ``(1/(M R)) sum_q (sum_{r,k} xi[q, r, k] dy[r, k]/dw_j) ** 2`` with ``R =
      projections`` independent random signs ``xi = +-1`` per individual (the cross
      terms vanish in expectation). Its relative spread falls like
      ``sqrt(2 / R)`` (less when several individuals' estimates are pooled).

    ``"sum"`` and ``"abs"`` are the definitions of the paper's reference code (each
    output unit's gradient summed (``"sum"``) or absolute-value summed (``"abs"``)
    over the examples, then the L2 norm over output units), averaged over rows
    instead of summed, which only rescales ``s`` by ``1/M``. ``"sum"`` lets the
    gradients of different rows cancel; ``"abs"`` and ``"rms"`` do not.

    Args:
        config: the architecture.
        values: ``(P, N)`` flat parameter vectors (not modified; no gradient flows back).
        inputs: shared by all individuals, tokens ``(B, T)`` / vectors ``(B, T, I)``,
            or one batch per individual ``(P, B, T[, I])``.
        method: ``"rms"``, ``"sum"`` or ``"abs"``.
        projections: ``R``, random-sign backward passes per chunk (``"rms"`` only).
        generator: draws the random signs (``"rms"`` only); ``None`` uses torch's
            global generator for ``values``' device. With a CPU generator the result
            does not depend on the chunking.
        chunk_size: individuals (``"rms"``, ``"sum"``) or individual x batch-item
            replicas (``"abs"``) per vectorised chunk; default from ``memory_budget``.
        memory_budget: activation bytes a chunk may use, as for
            :func:`~evotorch_mqa_moe.model.population_forward` (the forward's chunk
            is divided by ``2 * (num_layers + 1)``: autograd keeps every layer's
            activations, and the backward pass holds gradients of the same size).
    Returns:
        ``(P, N)`` non-negative sensitivities, on ``values``' device and dtype.

    Cost: ``"rms"`` is one forward and ``R`` backward passes per chunk, ``"sum"``
    one forward and ``O`` backward passes (one per output unit), each through the
    whole chunk at once (individuals are independent, so the gradient of a sum over
    individuals is every individual's own gradient).
    ``"abs"`` needs every row's gradient separately: each individual is replicated
    once per batch item (a chunk of ``individuals x B`` networks on one sequence each),
    and each of the ``T * O`` (row position, unit) pairs takes one backward pass; that
    is ``T`` times the backward work of ``"sum"`` (the same for pooled configs, T = 1).
    Works under ``torch.no_grad()`` (gradients are enabled inside).
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    method = _check_method(method)
    if not isinstance(values, Tensor) or values.dim() != 2:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a (P, N) tensor, got {shape}")
    N = num_parameters(config)
    if values.shape[1] != N:
        raise ValueError(f"values have {values.shape[1]} columns; this config has N={N} parameters")
    if not values.is_floating_point():
        raise TypeError(f"values must be floating point, got dtype {values.dtype}")
    P = values.shape[0]
    if P == 0:
        raise ValueError("values hold no individuals (P=0)")
    check_inputs(config, inputs, popsize=P)
    if inputs.device != values.device:
        raise ValueError(f"inputs are on {inputs.device} but values on {values.device}")
    check_int("projections", projections)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget!r}")
    values = values.detach()
    if type(values) is not Tensor:  # e.g. EvoTorch's ReadOnlyTensor
        values = values.as_subclass(Tensor)
    if not config.token_inputs and inputs.dtype != values.dtype:
        inputs = inputs.to(values.dtype)
    with torch.enable_grad():
        if method == "abs":
            return _sensitivity_abs(config, values, inputs, chunk_size, memory_budget)
        return _sensitivity_projected(config, values, inputs, method, projections, generator,
                                      chunk_size, memory_budget)


def _chunk(config: TransformerConfig, rows: int, seq_len: int, values: Tensor,
           memory_budget: int | None, extra_bytes: int = 0) -> int:
    """Networks per sensitivity chunk: the forward's chunk for ``rows`` token rows of
    sequences of ``seq_len``, divided by ``2 * (num_layers + 1)`` (autograd keeps every
    layer's activations; the backward holds gradients as large), further limited
    when each network also holds ``extra_bytes`` of its own genes and gradients."""
    forward = default_chunk_size(config, rows, values.device, values.dtype, memory_budget,
                                 seq_len=seq_len)
    factor = 2 * (config.num_layers + 1)
    chunk = max(1, forward // factor)
    if extra_bytes:
        per = bytes_per_individual(config, rows, values.element_size(), seq_len)
        budget = forward * per  # about the budget default_chunk_size worked with
        chunk = max(1, min(chunk, budget // (factor * per + extra_bytes)))
    return chunk


def _sensitivity_projected(config: TransformerConfig, values: Tensor, inputs: Tensor,
                           method: str, projections: int, generator: torch.Generator | None,
                           chunk_size: int | None, memory_budget: int | None) -> Tensor:
    """``"sum"`` (one backward per output unit) and ``"rms"`` (one per random-sign projection)."""
    P, N = values.shape
    B, T = _shape_bt(config, inputs)
    per_individual = inputs.dim() == (3 if config.token_inputs else 4)
    if chunk_size is None:
        chunk_size = _chunk(config, B * T, T, values, memory_budget)
    out = torch.empty_like(values)
    O = config.output_dim
    sign_device = generator.device if generator is not None else values.device
    for start in range(0, P, chunk_size):
        stop, c = min(P, start + chunk_size), min(P, start + chunk_size) - start
        leaf = values[start:stop].clone().requires_grad_(True)
        x = inputs[start:stop] if per_individual else inputs
        y = population_forward(config, leaf, x, chunk_size=c).reshape(c, -1, O)  # (c, M, O)
        M = y.shape[1]
        acc = out[start:stop].zero_()
        if method == "sum":
            y = y.mean(dim=1)  # (c, O): the row mean of every unit
            for k in range(O):
                (grad,) = torch.autograd.grad(y[:, k].sum(), leaf, retain_graph=k + 1 < O)
                acc.addcmul_(grad, grad)
        else:
            # (c, R, M, O) signs, individual-major, so chunks draw the same numbers
            signs = torch.randint(0, 2, (c, projections, M, O), generator=generator,
                                  device=sign_device, dtype=y.dtype).to(y.device)
            signs.mul_(2).sub_(1)
            for q in range(projections):
                (grad,) = torch.autograd.grad(y, leaf, signs[:, q],
                                              retain_graph=q + 1 < projections)
                acc.addcmul_(grad, grad)
            acc.div_(M * projections)
        acc.sqrt_()
    return out


def _sensitivity_abs(config: TransformerConfig, values: Tensor, inputs: Tensor,
                     chunk_size: int | None, memory_budget: int | None) -> Tensor:
    P, N = values.shape
    B, T = _shape_bt(config, inputs)
    O = config.output_dim
    per_individual = inputs.dim() == (3 if config.token_inputs else 4)
    rows = 1 if config.pooling is not None else T  # output rows per replica (one sequence)
    if chunk_size is None:
        # a replica holds its own copy of the genes and their gradient
        chunk_size = _chunk(config, T, T, values, memory_budget,
                            extra_bytes=2 * N * values.element_size())
    # Replica i of the flattened (individual, batch item) grid is individual i // B
    # on sequence i % B.
    flat_inputs = inputs if per_individual else inputs.unsqueeze(0).expand(P, *inputs.shape)
    flat_inputs = flat_inputs.reshape(P * B, 1, *flat_inputs.shape[2:])  # (P*B, 1, T[, I])
    out = torch.zeros_like(values)
    unit = torch.empty_like(values)  # (P, N): sum_r |dy[r, k]/dw| for the current unit k
    for k in range(O):
        unit.zero_()
        for start in range(0, P * B, chunk_size):
            stop = min(P * B, start + chunk_size)
            owner = torch.arange(start, stop, device=values.device) // B  # (c,) individual
            leaf = values.index_select(0, owner).requires_grad_(True)  # (c, N) replicas
            y = population_forward(config, leaf, flat_inputs[start:stop], chunk_size=stop - start)
            y = y.reshape(stop - start, rows, O)
            for r in range(rows):
                (grad,) = torch.autograd.grad(y[:, r, k].sum(), leaf, retain_graph=r + 1 < rows)
                unit.index_add_(0, owner, grad.abs_())
        out.addcmul_(unit, unit)
    return out.sqrt_().div_(B * rows)


# ----------------------------------------------------------------------------
# Sensitivity -> mutation scale
# ----------------------------------------------------------------------------


def sensitivity_to_scale(sensitivity: Tensor, *, floor: float = 0.01,
                         normalize: str = "genes") -> Tensor:
    """Stdev multipliers ``~ 1 / sensitivity``, normalised over the genes.

    For each row (the last axis are the genes): a gene with sensitivity ``s_j > 0``
    gets ``m_j = c / max(s_j, floor * median)``, where ``median`` is the median of the
    row's positive sensitivities (so no multiplier exceeds ``1 / floor`` times a
    median gene's: insensitive genes do not explode); a gene with ``s_j = 0`` (no
    measured effect on the outputs, e.g. a dead unit or an unused position) keeps
    plain mutation, ``m_j = c0`` (1 with ``"genes"``). The constant ``c`` is set by
    ``normalize``:

    * ``"genes"`` (default): the **root mean square of the multipliers over the N
      genes is exactly 1**, so a mutation with stdev ``sigma`` has the same expected
      squared length, ``N * sigma**2``, as plain Gaussian mutation with that stdev;
      only its distribution over the genes changes. Such a mutation changes the
      outputs much less than a plain one (first order: by
      ``sqrt(sum_j s_j**2 m_j**2 / sum_j s_j**2)``; measured 1/13 on the reverse
      task's default model and 1/7 on config A at initialisation), so a GA may need a
      larger ``sigma`` than with plain mutation.
    * ``"outputs"``: all multipliers (zeros' included) times the factor that makes
      ``sum_j s_j**2 m_j**2 = sum_j s_j**2``: to first order, a mutation with stdev
      ``sigma`` moves the outputs by the same expected squared amount as a plain one,
      but spread evenly over the genes.

    A row without any positive sensitivity gets all ones.

    Args:
        sensitivity: ``(..., N)`` non-negative, e.g. from :func:`output_sensitivity`.
        floor: in ``(0, 1]``.
        normalize: ``"genes"`` or ``"outputs"``.
    Returns:
        ``(..., N)`` positive multipliers, same dtype and device.
    """
    if not isinstance(sensitivity, Tensor) or sensitivity.dim() < 1:
        raise ValueError("sensitivity must be a tensor (..., N)")
    _check_floor(floor)
    _check_normalize(normalize)
    if bool((sensitivity < 0).any()) or bool(sensitivity.isnan().any()):
        raise ValueError("sensitivity must be non-negative and not NaN")
    s = sensitivity
    positive = s > 0
    pos = torch.where(positive, s, torch.full_like(s, math.nan))
    median = pos.nanmedian(dim=-1, keepdim=True).values  # NaN for a row with no positive gene
    raw = torch.where(positive, 1.0 / torch.maximum(s, floor * median), torch.zeros_like(s))
    measured = positive.sum(dim=-1, keepdim=True)
    mean_sq = raw.square().sum(dim=-1, keepdim=True) / measured.clamp(min=1)
    m = torch.where(positive, raw * mean_sq.rsqrt(), torch.ones_like(s))
    if normalize == "outputs":
        plain = s.square().sum(dim=-1, keepdim=True)
        safe = (s * m).square().sum(dim=-1, keepdim=True)
        m = m * torch.where(plain > 0, (plain / safe).sqrt(), torch.ones_like(plain))
    return m


def _check_floor(floor: object) -> float:
    return check_float("floor", floor, 0.0, 1.0)  # type: ignore[return-value]


#: How :func:`sensitivity_to_scale` normalises the multipliers.
NORMALIZATIONS = ("genes", "outputs")


def _check_normalize(normalize: object) -> str:
    return check_choice("normalize", normalize, NORMALIZATIONS)  # type: ignore[return-value]


# ----------------------------------------------------------------------------
# Inputs of any task
# ----------------------------------------------------------------------------


def sensitivity_inputs(task: Any, batch_size: int, generator: torch.Generator) -> Tensor:
    """A batch of typical inputs of ``task`` (CPU), drawn with ``generator``.

    Uses ``task.sensitivity_inputs(batch_size, generator)`` when the task has it
    (episodic tasks such as cartpole: observation windows of short rollouts), else
    the inputs of ``task.sample(batch_size, generator)`` (supervised tasks).
    """
    check_int("batch_size", batch_size)
    own = getattr(task, "sensitivity_inputs", None)
    if callable(own):
        return own(batch_size, generator)
    sample = getattr(task, "sample", None)
    if callable(sample):
        return sample(batch_size, generator)[0]
    raise TypeError(
        f"task {getattr(task, 'name', type(task).__name__)!r} has neither "
        "sensitivity_inputs(batch_size, generator) nor sample(batch_size, generator): "
        "safe mutation needs a batch of its inputs"
    )
