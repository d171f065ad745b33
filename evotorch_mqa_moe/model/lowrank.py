"""Structured low-rank population weights: shared weights plus per-individual rank-r
factors, evaluated without materialising any individual.

After EGGROLL (Sarkar et al. 2025, "Evolution Strategies at the Hyperscale"):
individual ``p`` of a population is the shared weights plus, for every weight
matrix ``W`` (R x C), a rank-``r`` perturbation, and for every small vector
(biases, LayerNorm affine weights) a dense one::

    W_p = W + s * A_p B_p^T        A_p (R, r), B_p (C, r), s = sigma / sqrt(r)
    v_p = v + sigma * e_p          e_p (n,)

so a layer computes ``x_p W + s (x_p A_p) B_p^T``: one large GEMM with the shared
``W`` over the whole population's token rows plus two thin per-individual GEMMs.
The population's own memory is ``P * (r * (R + C) + n)`` numbers instead of
``P * N``: the seed-size model (N = 64M) at P = 256 and r = 1 holds 0.2 GB of factors
where a dense population would hold 66 GB.

Which parameters are matrices: every parameter with two or more axes that is not
a bias, taken as the matrix its GEMM uses (see :func:`lowrank_layout`): the fused
Q/K/V and output projections, the gate (and the attention gate's query/key), the
experts' ``in_weight`` (D, E*F) and ``out_weight`` (E*F, D), the head, and the
**embedding tables** (token embedding (V, D), learned positions (T, D)): a table
row is looked up as ``W[t] + s A_p[t] B_p^T``, so a dense per-individual table (P x
V x D: 5 GB at V = 10,000, P = 256) is never built. The experts' biases
(E, F) / (E, D) are biases: dense, like all 1-D parameters.

The forward pass is :func:`~evotorch_mqa_moe.model.forward.transformer_forward`, the same
layer math as the dense :func:`~evotorch_mqa_moe.model.population_forward`: every
matrix is handed to it as a :class:`LowRankWeight`, which stands for the (P, R, C)
tensor ``W + s A_p B_p^T`` and computes its own GEMM. :meth:`LowRankPopulation.materialize`
builds the dense (P, N) population that the same pass evaluates identically
(tests/test_lowrank.py). The evolution strategy over these populations is
:mod:`evotorch_mqa_moe.searchers.lowrank_es`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_int

from .config import TransformerConfig
from .forward import transformer_forward
from .inputs import _raise_unless_in_vocab, prepare_inputs
from .layout import parameter_layout
from .memory import default_chunk_size

MODES = ("auto", "factors", "materialize")
"""How a :class:`LowRankWeight` multiplies: ``"factors"``: ``x W + s (x A) B^T`` (the
shared GEMM over every individual's rows; never builds an individual's matrix);
``"materialize"``: builds the chunk's matrices ``W + s A B^T`` for one GEMM at a time
(transient, one matrix of one chunk); ``"auto"``: materialise when the individual's
rows M are at least the matrix's rows R (then the matrices are the smaller tensors;
measured in bench/lowrank.py), factors otherwise."""

# How many leading axes of a parameter form the rows of its matrix view (default 1):
# an expert's second layer (E, F, D) runs as one (E*F, D) GEMM.
_ROW_AXES = {"moe.out_weight": 2}


@dataclass(frozen=True)
class Block:
    """One parameter of the flat solution vector, as the low-rank population sees it.

    Attributes:
        name, shape: as in :func:`~evotorch_mqa_moe.model.parameter_layout`.
        offset: its first position in the flat (N,) vector.
        rows, cols: the matrix view (R, C) of a low-rank parameter; ``None`` for a
            dense (vector) one.
        vector_offset: for a dense parameter, its first column in the (P, n) matrix of
            per-individual vectors; ``None`` for a low-rank one.
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    rows: int | None
    cols: int | None
    vector_offset: int | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def lowrank(self) -> bool:
        return self.rows is not None


def lowrank_layout(config: TransformerConfig) -> tuple[Block, ...]:
    """Every parameter in flat-vector order: low-rank matrix (with its (R, C) view) or
    dense vector. Matrices are the parameters with two or more axes whose name does
    not end in ``bias``; the rest (biases, LayerNorm weights) are vectors."""
    blocks, offset, vector_offset = [], 0, 0
    for name, shape in parameter_layout(config):
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if len(shape) >= 2 and not name.endswith("bias"):
            split = _ROW_AXES.get(suffix, 1)
            blocks.append(Block(name, shape, offset, math.prod(shape[:split]),
                                math.prod(shape[split:]), None))
        else:
            blocks.append(Block(name, shape, offset, None, None, vector_offset))
            vector_offset += math.prod(shape)
        offset += math.prod(shape)
    return tuple(blocks)


def num_vector_genes(layout: tuple[Block, ...]) -> int:
    return sum(b.size for b in layout if not b.lowrank)


def check_rank(config: TransformerConfig, rank: Any) -> int:
    """``rank`` as an int in ``[1, min(R, C)]`` over every matrix of ``config``.

    Raises:
        ValueError: naming the rank and, when it is too large, the matrix that limits it.
    """
    rank = check_int("rank", rank)
    smallest = min((b for b in lowrank_layout(config) if b.lowrank),
                   key=lambda b: min(b.rows, b.cols))
    limit = min(smallest.rows, smallest.cols)
    if rank > limit:
        raise ValueError(f"rank must be <= min(rows, cols) = {limit} of every matrix "
                         f"({smallest.name} is {smallest.rows} x {smallest.cols}), got {rank}")
    return rank


# ----------------------------------------------------------------------------- the pass
class LowRankWeight:
    """A population of P matrices ``W + scale * A_p B_p^T`` (R x C), never materialised.

    Stands for the (P, R, C) tensor in the layer math of :mod:`evotorch_mqa_moe.model`
    through the operations it uses: ``.shape``, ``.dim()``, column slices
    ``weight[..., a:b]``, :meth:`linear` and :meth:`lookup`.

    Args:
        shared: W (R, C), the same for every individual.
        a: (P, R, r) and b: (P, C, r) the factors (antithetic signs folded into ``a``).
        scale: ``sigma / sqrt(r)``.
        mode: how :meth:`linear` multiplies, see :data:`MODES` (the result is the same).
    """

    __slots__ = ("shared", "a", "b", "scale", "mode")

    def __init__(self, shared: Tensor, a: Tensor, b: Tensor, scale: float, mode: str = "auto"):
        self.shared, self.a, self.b, self.scale = shared, a, b, float(scale)
        self.mode = mode

    @property
    def shape(self) -> torch.Size:
        """(P, R, C)."""
        return torch.Size((self.a.shape[0], *self.shared.shape))

    def dim(self) -> int:
        return 3

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def __getitem__(self, key: Any) -> LowRankWeight:
        """``weight[..., a:b]``: the population of column slices (no copy)."""
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis
                and isinstance(key[1], slice)):
            raise TypeError(f"a LowRankWeight takes column slices weight[..., a:b] only, "
                            f"got {key!r}")
        return LowRankWeight(self.shared[:, key[1]], self.a, self.b[:, key[1]], self.scale,
                             self.mode)

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """``x_p W_p + bias_p``: x (P, M, R) or shared (M, R), bias (P, C) -> (P, M, C).

        Factors: the shared GEMM runs once over all P*M rows and the bias rides in the
        thin per-individual GEMM as one more rank column, ``[x_p A_p, 1] [s B_p, b_p]^T``.
        That costs two more passes over the (P, M, C) output; when an individual has
        at least as many rows as the matrix (M >= R) it is cheaper to build the chunk's
        P matrices ``W + s A_p B_p^T`` (transient) and run the dense per-individual
        GEMM, which ``mode="auto"`` does.
        """
        P, R, C = self.shape
        if self.mode == "materialize" or (self.mode == "auto" and x.shape[-2] >= R):
            w = self.materialize()  # (P, R, C), transient: one matrix of one chunk
            if x.dim() == 2:
                x = x.expand(P, *x.shape)
            return torch.bmm(x, w) if bias is None else torch.baddbmm(bias.unsqueeze(-2), x, w)
        y = torch.matmul(x, self.shared)  # (P, M, C), or (M, C) for shared rows
        xa = torch.matmul(x, self.a)  # (P, M, r)
        b = self.b * self.scale
        if bias is not None:
            xa = torch.cat([xa, xa.new_ones(*xa.shape[:-1], 1)], dim=-1)
            b = torch.cat([b, bias.unsqueeze(-1)], dim=-1)  # (P, C, r + 1)
        if y.dim() == 2:
            return torch.baddbmm(y, xa, b.transpose(-1, -2))
        return y.baddbmm_(xa, b.transpose(-1, -2))

    def lookup(self, index: Tensor) -> Tensor:
        """Rows ``index`` of every individual's table: (M,) shared or (P, M) -> (P, M, C)."""
        P = self.a.shape[0]
        if index.dim() == 1:
            rows, a = self.shared[index], self.a[:, index]  # (M, C), (P, M, r)
        else:
            rows = self.shared[index]  # (P, M, C)
            a = self.a[torch.arange(P, device=index.device)[:, None], index]
        return torch.baddbmm(rows, a, self.b.transpose(-1, -2), alpha=self.scale)

    def materialize(self) -> Tensor:
        """The dense (P, R, C) population of matrices."""
        return torch.baddbmm(self.shared, self.a, self.b.transpose(-1, -2), alpha=self.scale)


class LowRankPopulation:
    """P networks as shared weights plus per-individual low-rank factors and vectors.

    What tasks receive (like :class:`~evotorch_mqa_moe.model.PopulationModel`):
    ``population(inputs) -> outputs``, with ``popsize``, ``device`` and ``dtype``.

    Args:
        config: the architecture.
        shared: (N,) the shared weights (only the matrices' entries are read; the
            vectors come from ``vectors``), in the compute dtype.
        factors: ``{name: (A (P, R, r), B (P, C, r))}`` for every low-rank parameter of
            :func:`lowrank_layout`.
        vectors: (P, n) every individual's dense parameters, in layout order.
        scale: the factors' multiplier, ``sigma / sqrt(r)``.
        output_dtype: dtype of the outputs handed to the task (default: the compute
            dtype); ``torch.float32`` keeps fitness in float32 under a bf16 pass.
        chunk_size, memory_budget: as for :func:`~evotorch_mqa_moe.model.population_forward`.
        mode: how the matrices multiply, one of :data:`MODES` (same result).
        source: instead of ``factors`` and ``vectors`` (pass ``None`` for both): a
            callable ``source(start, stop) -> (factors, vectors)`` giving individuals
            ``start:stop`` on demand (regenerated noise: nothing per individual is
            stored), with ``popsize``.
    """

    def __init__(self, config: TransformerConfig, shared: Tensor,
                 factors: Mapping[str, tuple[Tensor, Tensor]] | None, vectors: Tensor | None,
                 scale: float, *, output_dtype: torch.dtype | None = None,
                 chunk_size: int | None = None, memory_budget: int | None = None,
                 mode: str = "auto",
                 source: Callable[[int, int], tuple[Mapping[str, tuple[Tensor, Tensor]],
                                                    Tensor]] | None = None,
                 popsize: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.config = config
        self.layout = lowrank_layout(config)
        N = self.layout[-1].offset + self.layout[-1].size
        if shared.dim() != 1 or shared.shape[0] != N:
            raise ValueError(f"shared must be (N,) = ({N},), got {tuple(shared.shape)}")
        if source is not None:
            if factors is not None or vectors is not None or not popsize or popsize < 1:
                raise ValueError("a source replaces factors and vectors (pass None) and needs "
                                 f"popsize >= 1, got popsize={popsize!r}")
            self._popsize = int(popsize)
        else:
            self._check_factors(factors, vectors)
            self._popsize = vectors.shape[0]
        self.source = source
        self.shared = shared
        self.factors = None if factors is None else dict(factors)
        self.vectors = vectors
        self.scale = float(scale)
        self.output_dtype = output_dtype or shared.dtype
        self.chunk_size, self.memory_budget = chunk_size, memory_budget

    def _check_factors(self, factors, vectors) -> None:
        n = num_vector_genes(self.layout)
        if vectors is None or vectors.dim() != 2 or vectors.shape[1] != n:
            shape = None if vectors is None else tuple(vectors.shape)
            raise ValueError(f"vectors must be (P, {n}), got {shape}")
        P = vectors.shape[0]
        for block in self.layout:
            if not block.lowrank:
                continue
            a, b = factors[block.name]
            if a.shape[:2] != (P, block.rows) or b.shape[:2] != (P, block.cols):
                raise ValueError(f"factors of {block.name} must be ({P}, {block.rows}, r) and "
                                 f"({P}, {block.cols}, r), got {tuple(a.shape)} and "
                                 f"{tuple(b.shape)}")

    @property
    def popsize(self) -> int:
        return self._popsize

    @property
    def device(self) -> torch.device:
        return self.shared.device

    @property
    def dtype(self) -> torch.dtype:
        """The outputs' dtype (float inputs may be given in it; the pass casts them)."""
        return self.output_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.shared.dtype

    def weights(self, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        """``name -> LowRankWeight`` (matrices) or (p, *shape) view (vectors), individuals
        ``start:stop``: what :func:`~evotorch_mqa_moe.model.transformer_forward` takes."""
        stop = self.popsize if stop is None else stop
        if self.source is not None:  # individuals start:stop only, made now
            factors, vectors = self.source(start, stop)
            window = slice(None)
        else:
            factors, vectors, window = self.factors, self.vectors, slice(start, stop)
        out: dict[str, Any] = {}
        for b in self.layout:
            if b.lowrank:
                a, f = factors[b.name]
                w = self.shared[b.offset : b.offset + b.size].view(b.rows, b.cols)
                out[b.name] = LowRankWeight(w, a[window], f[window], self.scale, self.mode)
            else:
                block = vectors[window, b.vector_offset : b.vector_offset + b.size]
                out[b.name] = block.view(stop - start, *b.shape)
        return out

    def materialize(self) -> Tensor:
        """The dense (P, N) population (for tests and small models: P x N numbers)."""
        out = self.shared.new_empty(self.popsize, self.shared.shape[0])
        for name, w in self.weights().items():
            b = next(x for x in self.layout if x.name == name)
            value = w.materialize() if b.lowrank else w
            out[:, b.offset : b.offset + b.size] = value.reshape(self.popsize, -1)
        return out

    def nbytes(self) -> int:
        """Bytes of the per-individual state (factors and vectors; not the shared weights):
        0 for a ``source``, which regenerates them."""
        if self.source is not None:
            return 0
        factors = sum(t.numel() * t.element_size() for ab in self.factors.values() for t in ab)
        return factors + self.vectors.numel() * self.vectors.element_size()

    def __call__(self, inputs: Tensor) -> Tensor:
        """(B, T[, I]) shared or (P, B, T[, I]) per individual -> (P, B, T, O) or (P, B, O)."""
        return lowrank_population_forward(self, inputs, chunk_size=self.chunk_size,
                                          memory_budget=self.memory_budget
                                          ).to(self.output_dtype)


def lowrank_population_forward(population: LowRankPopulation, inputs: Tensor, *,
                               chunk_size: int | None = None, memory_budget: int | None = None,
                               validate: bool = True) -> Tensor:
    """The whole low-rank population on ``inputs``, in chunks of individuals.

    The sibling of :func:`~evotorch_mqa_moe.model.population_forward` (same checks,
    same layer math): row ``p`` of the result equals ``population_forward`` of
    ``population.materialize()[p]``.

    Args:
        population: a :class:`LowRankPopulation`.
        inputs: tokens (B, T) / vectors (B, T, I) shared, or (P, B, ...) per individual.
        chunk_size: individuals per chunk; default from ``memory_budget``
            (:func:`~evotorch_mqa_moe.model.default_chunk_size`).
    Returns:
        (P, B, T, O), or (P, B, O) when the config pools, in the compute dtype.
    """
    config, P = population.config, population.popsize
    inputs, bounds, per_individual = prepare_inputs(config, inputs, P, population.device,
                                                    population.compute_dtype, validate=validate)
    if chunk_size is None:
        B, T = inputs.shape[-2:] if config.token_inputs else inputs.shape[-3:-1]
        chunk_size = default_chunk_size(config, B * T, population.device,
                                        population.compute_dtype, memory_budget, seq_len=T)
    else:
        chunk_size = check_int("chunk_size", chunk_size)
    outputs = []
    for start in range(0, P, chunk_size):
        stop = min(P, start + chunk_size)
        chunk_inputs = inputs[start:stop] if per_individual else inputs
        outputs.append(transformer_forward(config, population.weights(start, stop),
                                           chunk_inputs))
    if bounds is not None:
        _raise_unless_in_vocab(config, bounds)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
