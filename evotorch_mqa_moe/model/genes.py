"""Gene groups: which genes of a flat solution vector form one unit of the network.

:func:`gene_groups` ``(config, level) -> (N,)`` int64 group ids, for structure-aware
cross-over (``uniform_cross_over(..., groups=...)``: a child takes each group whole
from one parent). Ids are dense (``0..G-1``, every id used) and numbered in order of
first use along the flat vector (``parameter_layout`` order).

Levels (``D`` embed_dim, ``H`` query heads, ``K`` key/value heads, ``hd`` head_dim,
``E`` experts, ``F`` expert_dim; linear weights are ``(D_in, D_out)``, so a
neuron's incoming weights are a *column*):

``"parameter"``
    every gene its own group (``G = N``; the per-gene cross-over).
``"row"``
    one neuron's incoming weights and its bias entry: column ``j`` of a linear
    weight with entry ``j`` of its bias (vector-input embedding, fused Q/K/V
    projection: one group per output column, attention output projection, MoE
    gate: one per expert logit, the attention gate's query/key projection
    ``gate_qk_weight``/``gate_qk_bias`` (``gating="attention"``): one per
    column, output head); for the experts' first layer
    ``in_weight[:, e, f]`` with ``in_bias[e, f]`` (hidden unit ``f`` of expert
    ``e``), for their second layer ``out_weight[e, :, d]`` with
    ``out_bias[e, d]`` (output ``d`` of expert ``e``); a token embedding's row
    (one token's vector); a learned position table's row (one position);
    LayerNorm feature ``j``: ``weight[j]`` with ``bias[j]``.
    Every gene belongs to exactly one such unit.
``"head"``
    per layer, query head ``h``: its ``hd`` columns ``h*hd:(h+1)*hd`` of the fused
    Q/K/V weight, the same entries of the Q/K/V bias, and its ``hd`` rows of the
    attention output weight (the head's whole contribution). The shared key/value
    projections are not split by head: the K/V columns of the fused weight are one
    group, the K/V entries of its bias another (for MQA, GQA and MHA alike). Every
    other gene is grouped per parameter tensor, as at ``"tensor"``.
``"expert"``
    per layer, expert ``e``: ``in_weight[:, e, :]``, ``in_bias[e]``,
    ``out_weight[e]``, ``out_bias[e]`` and its gate logit, ``gate_weight[:, e]`` and
    ``gate_bias[e]``. Every other gene is grouped per parameter tensor (so the
    attention gate's ``gate_qk_weight`` and ``gate_qk_bias``, which serve all
    experts, are a group each).
``"tensor"``
    each parameter tensor (each entry of ``parameter_layout``) one group.
``"layer"``
    the input stage (embedding weight and bias, learned positions) one group, each
    encoder layer one group, the output stage (final LayerNorm, head) one group.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .config import TransformerConfig
from .layout import parameter_layout

__all__ = ["GENE_GROUP_LEVELS", "gene_groups"]

GENE_GROUP_LEVELS = ("parameter", "row", "head", "expert", "tensor", "layer")


class _Ids:
    """Allocates dense id ranges to named unit families on first use."""

    def __init__(self) -> None:
        self.next = 0
        self.base: dict[str, int] = {}

    def __call__(self, family: str, size: int) -> int:
        if family not in self.base:
            self.base[family] = self.next
            self.next += size
        return self.base[family]


def _columns(shape: tuple[int, ...]) -> Tensor:
    """Local unit id = the last index (a column of a weight, an entry of a bias)."""
    return torch.arange(shape[-1]).expand(shape)


def _rows(shape: tuple[int, ...]) -> Tensor:
    """Local unit id = the first index (a row of an embedding or position table)."""
    return torch.arange(shape[0]).view(-1, *([1] * (len(shape) - 1))).expand(shape)


def _split(name: str) -> tuple[str, str]:
    """``"layers.0.attn.qkv_weight"`` -> (``"layers.0.attn"``, ``"qkv_weight"``)."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _row_level(name: str, shape: tuple[int, ...], ids: _Ids, config: TransformerConfig) -> Tensor:
    module, leaf = _split(name)
    if name == "embed.weight" and config.token_inputs:
        return ids("embed", shape[0]) + _rows(shape)  # one token's vector
    if name == "pos_embed":
        return ids(name, shape[0]) + _rows(shape)  # one position's vector
    if leaf in ("in_weight", "in_bias"):  # (D, E, F) / (E, F): hidden unit (e, f)
        e, f = shape[-2:]
        return ids(f"{module}.in", e * f) + torch.arange(e * f).view(e, f).expand(shape)
    if leaf in ("out_weight", "out_bias") and module.endswith(".moe"):
        # (E, F, D) / (E, D): output d of expert e, unit e * D + d
        e, d = shape[0], shape[-1]
        local = torch.arange(e * d).view(e, *([1] * (len(shape) - 2)), d)
        return ids(f"{module}.out", e * d) + local.expand(shape)
    # A linear layer's weight (D_in, D_out) and bias (D_out,), or a LayerNorm's weight
    # and bias (D,): unit j = column j / entry j. Weight and bias share a family.
    stem = leaf.removesuffix("weight").removesuffix("bias").rstrip("_")
    return ids(f"{module}.{stem}", shape[-1]) + _columns(shape)


def _head_level(name: str, shape: tuple[int, ...], ids: _Ids, config: TransformerConfig) -> Tensor:
    module, leaf = _split(name)
    H, hd = config.num_heads, config.head_dim
    if leaf in ("qkv_weight", "qkv_bias"):  # (D, (H + 2K) * hd) / ((H + 2K) * hd,)
        heads = ids(f"{module}.heads", H)
        column = torch.arange(shape[-1])
        local = torch.where(column < H * hd, heads + column // hd, ids(name, 1))
        return local.expand(shape)
    if leaf == "out_weight" and module.endswith(".attn"):  # (H * hd, D): rows of head h
        return ids(f"{module}.heads", H) + (_rows(shape) // hd)
    return ids(name, 1) + torch.zeros(shape, dtype=torch.int64)


def _expert_level(
    name: str, shape: tuple[int, ...], ids: _Ids, config: TransformerConfig
) -> Tensor:
    module, leaf = _split(name)
    if module.endswith(".moe"):
        E = config.num_experts
        base = ids(f"{module}.experts", E)
        if leaf in ("gate_weight", "gate_bias"):  # (D, E) / (E,): expert = last index
            return base + _columns(shape)
        if leaf in ("gate_qk_weight", "gate_qk_bias"):  # attention gating: shared by all experts
            return ids(name, 1) + torch.zeros(shape, dtype=torch.int64)
        if leaf in ("in_weight",):  # (D, E, F)
            return base + torch.arange(E).view(1, E, 1).expand(shape)
        return base + _rows(shape)  # in_bias (E, F), out_weight (E, F, D), out_bias (E, D)
    return ids(name, 1) + torch.zeros(shape, dtype=torch.int64)


def _stage(name: str) -> str:
    if name.startswith("layers."):
        return ".".join(name.split(".")[:2])
    if name.startswith(("embed.", "pos_embed")):
        return "input"
    return "output"  # final_norm.*, head.*


@functools.lru_cache(maxsize=32)
def _gene_groups_cpu(config: TransformerConfig, level: str) -> Tensor:
    layout = parameter_layout(config)
    if level == "parameter":
        return torch.arange(sum(math.prod(shape) for _, shape in layout))
    ids = _Ids()
    pieces = []
    for name, shape in layout:
        if level == "tensor":
            piece = torch.full(shape, ids(name, 1), dtype=torch.int64)
        elif level == "layer":
            piece = torch.full(shape, ids(_stage(name), 1), dtype=torch.int64)
        elif level == "row":
            piece = _row_level(name, shape, ids, config)
        elif level == "head":
            piece = _head_level(name, shape, ids, config)
        else:
            piece = _expert_level(name, shape, ids, config)
        pieces.append(piece.reshape(-1))
    return torch.cat(pieces)


def gene_groups(
    config: TransformerConfig, level: str, *, device: torch.device | str | None = None
) -> Tensor:
    """``(N,)`` int64 group ids of the flat solution vector of ``config`` at ``level``.

    Args:
        config: the architecture (any attention/MoE/input/positional/norm/pooling option).
        level: ``"parameter"``, ``"row"``, ``"head"``, ``"expert"``, ``"tensor"`` or
            ``"layer"`` (defined in this module's docstring).
        device: where the result lives (default CPU).
    Returns:
        A new ``(N,)`` int64 tensor: dense ids ``0..G-1`` in order of first use, gene
        ``i`` (flat ``parameter_layout`` order) in group ``ids[i]``.
    Raises:
        ValueError: unknown ``level`` (the message lists the choices).
        TypeError: ``config`` not a :class:`TransformerConfig`.
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    if level not in GENE_GROUP_LEVELS:
        raise ValueError(f"unknown gene group level {level!r}; choose from {GENE_GROUP_LEVELS}")
    return _gene_groups_cpu(config, level).to(device=device, copy=True)
