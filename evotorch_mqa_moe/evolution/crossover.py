"""Uniform cross-over on flat populations, per gene or per group of genes.

Everything works on plain tensors of decision values shaped ``(..., P, N)`` and takes
an optional ``torch.Generator``; inputs are never modified.

* ``swap_probability == 0.5`` draws one random *bit* per gene (int64 words, unpacked
  with a broadcast ``&``); other probabilities draw 32 random bits per gene (half an
  int64 word) compared with an integer threshold.
* ``torch.where`` with a random mask runs ~2x slower than its memory traffic on this
  CPU (a branchy scalar loop), so genes are selected with an exact bitwise blend
  ``a ^ ((a ^ b) & mask)`` on an integer view of the floats, in row chunks of 1M-4M
  genes so that the temporaries stay in cache (1.4-1.9 vs 2.4 clones for 128 pairs
  at 100k genes; parent rows are gathered chunk by chunk too).

Group cross-over (``groups=``: a child takes each group of genes whole from one
parent) draws one Bernoulli per (row, group) and expands it to a per-gene mask.
Expanding with a per-gene gather (``index_select``) took 2.6x as long as drawing the
per-gene bit mask itself (config A, one thread; 4-20x in an ad-hoc probe on a Xeon),
so the group ids are compiled once into a *plan*: a few strided blocks, each a
regular grid of genes whose ids are an affine function of the grid index (a weight
matrix's columns, an expert's slab, a head's columns, ...), and the mask is expanded
with one strided ``copy_`` per block (0.5x the bit mask), for ~8M genes of rows at a
time. Arbitrary ids with no such structure fall back to the gather (and so does a
GPU, where one gather launch should beat many copies; not measured).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .sampling import (
    _BIT_VALUES,
    _SAME_WIDTH_INT,
    _as_rows,
    _bernoulli_mask,
    _check_probability,
    _random_int64,
)

# Genes per cross-over chunk on CPU, so operands and temporaries stay in cache. Measured
# for 128 pairs x 100k float32, in clones: 1 thread 256k 1.85, 1M 1.42-1.7, 4M 1.8-2.2;
# 2 threads on a quiet machine 1M 1.66, 2M 1.73, 4M 1.89, unchunked 2.37. With the cores
# shared by other busy processes every multi-threaded op waits for descheduled threads,
# so many small ops collapse (2 threads, load 5-6: 1M 6-14, 4M 3.4-3.8, unchunked
# 2.0-2.8). Hence 1M chunks with one thread and 4M with several (robust, ~0.2 clone
# slower when quiet); torch.set_num_threads(1) is the real fix on a shared machine.
_CHUNK_GENES = 1 << 20
_CHUNK_GENES_MULTITHREAD = 1 << 22

# Rows of an expanded group mask built at once on CPU (as genes: 8 MiB of bool), so that
# the strided copies of a group plan are amortised over several blending chunks.
_MASK_BLOCK_GENES = 1 << 23

# A group plan with more strided blocks than this is replaced by a per-gene gather (each
# block costs one copy op per mask block; at ~5 us an op, 256 blocks ~ one gather).
_MAX_PLAN_SEGMENTS = 256


# --------------------------------------------------------------------------- gene groups


class _GeneGroups(NamedTuple):
    """Validated group ids, compiled for the cross-over kernel (see :func:`_prepare_groups`).

    ``ids``: ``(N,)`` int64 on the parents' device, dense (``0..count-1``, all used);
    ``segments``: the strided-block plan (CPU) or ``None`` (gather with ``ids``).
    """

    ids: torch.Tensor
    count: int
    segments: tuple | None


# groups tensor -> (its version, device, _GeneGroups): repeated calls with the same
# unmodified tensor (e.g. a problem's cached gene groups) reuse the compiled plan.
_PREPARED_GROUPS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _prepare_groups(groups, num_genes: int, device: torch.device) -> _GeneGroups:
    """Validate ``(N,)`` group ids and compile them (cached per tensor and version)."""
    if isinstance(groups, _GeneGroups):
        if groups.ids.shape != (num_genes,):
            raise ValueError(
                f"`groups` must have shape ({num_genes},), got {tuple(groups.ids.shape)}"
            )
        return groups if groups.ids.device == device else groups._replace(
            ids=groups.ids.to(device)
        )
    if not isinstance(groups, torch.Tensor):
        raise TypeError(
            f"`groups` must be an (N,) integer tensor of group ids, got {type(groups).__name__}"
        )
    cached = _PREPARED_GROUPS.get(groups)
    if (cached is not None and cached[0] == groups._version and cached[1] == device
            and cached[2].ids.shape == (num_genes,)):
        return cached[2]
    if groups.dtype == torch.bool or groups.is_floating_point() or groups.is_complex():
        raise ValueError(f"`groups` must be an integer tensor, got dtype {groups.dtype}")
    if groups.shape != (num_genes,):
        raise ValueError(
            f"`groups` must have shape ({num_genes},) (one id per gene), "
            f"got {tuple(groups.shape)}"
        )
    ids = groups.detach().to(device="cpu", dtype=torch.int64)
    count = 0
    if num_genes:
        low = int(ids.min())
        if low < 0:
            where = int(torch.argmin(ids))
            raise ValueError(f"`groups` ids must be >= 0, got {low} (gene {where})")
        top = int(ids.max()) + 1
        if top <= 2 * num_genes and bool(torch.bincount(ids, minlength=top).all()):
            count = top  # already dense
        else:
            uniq, ids = torch.unique(ids, return_inverse=True)
            count = uniq.numel()
    segments = _segment_plan(ids)
    prepared = _GeneGroups(ids.to(device), count, segments)
    _PREPARED_GROUPS[groups] = (groups._version, device, prepared)
    return prepared


def _segment_plan(ids: torch.Tensor) -> tuple | None:
    """Cover ``(N,)`` int64 CPU ids with strided blocks, or ``None`` if that needs too many.

    A block is ``(start, base, shape, gene_strides, id_strides)``: the genes
    ``start + sum_k i_k * gene_strides[k]`` for ``i`` in ``shape`` have ids
    ``base + sum_k i_k * id_strides[k]``. Blocks are disjoint and cover every gene once.

    First the ids are cut into maximal affine runs (greedily, left to right); then
    blocks of equal shape and strides whose starts and bases both step by constants
    are merged into one block with an extra leading dimension, until nothing merges.
    """
    n = ids.numel()
    if n == 0:
        return ()
    if n == 1:
        return ((0, int(ids[0]), (1,), (1,), (0,)),)
    diff = ids[1:] - ids[:-1]
    # Diff blocks: maximal stretches of equal consecutive differences.
    cuts = torch.nonzero(diff[1:] != diff[:-1]).flatten().add_(1)
    if cuts.numel() > max(4096, n // 16):  # little structure: gather instead
        return None
    firsts = [0, *cuts.tolist()]
    lasts = [*cuts.tolist(), n - 1]  # diff block k: genes firsts[k]..lasts[k] are affine
    steps = diff[firsts].tolist()
    runs = []  # (start, length, step)
    pos = 0
    for last, step in zip(lasts, steps, strict=True):
        if last - pos >= 1:  # genes pos..last (pos is the block's first or second gene)
            runs.append((pos, last - pos + 1, step))
            pos = last + 1
    if pos < n:
        runs.append((pos, 1, 0))
    backwards = sum(length for _, length, step in runs if step < 0 and length > 1)
    if len(runs) + backwards > max(4096, n // 16):
        return None
    bases = ids[[r[0] for r in runs]].tolist()
    blocks = []
    for (start, length, step), base in zip(runs, bases, strict=True):
        if length == 1 or step >= 0:
            blocks.append((start, base, (length,), (1,), (step if length > 1 else 0,)))
        else:  # strided views cannot step backwards through the table: single genes
            blocks += [(start + k, base + k * step, (1,), (1,), (0,)) for k in range(length)]
    while True:
        by_signature: dict[tuple, list] = {}
        for block in blocks:
            by_signature.setdefault(block[2:], []).append(block)
        merged = []
        for (shape, gene_strides, id_strides), items in by_signature.items():
            items.sort(key=lambda b: b[0])
            i = 0
            while i < len(items):
                j = i
                ds, db = 0, -1
                if i + 1 < len(items):
                    ds, db = items[i + 1][0] - items[i][0], items[i + 1][1] - items[i][1]
                if db >= 0:  # (ds > 0: sorted by start, and blocks are disjoint)
                    j = i + 1
                    while (j + 1 < len(items) and items[j + 1][0] - items[j][0] == ds
                           and items[j + 1][1] - items[j][1] == db):
                        j += 1
                if j == i:
                    merged.append(items[i])
                else:
                    merged.append((items[i][0], items[i][1], (j - i + 1, *shape),
                                   (ds, *gene_strides), (db, *id_strides)))
                i = j + 1
        if len(merged) == len(blocks):
            break
        blocks = merged
    if len(blocks) > _MAX_PLAN_SEGMENTS:
        return None
    return tuple(sorted(blocks))


def _group_table(rows: int, count: int, p: float, *, device, generator) -> torch.Tensor:
    """``(rows, L)`` bool with ``L >= count``: column ``g < count`` of row ``i`` says whether
    row ``i`` takes group ``g`` from the second parent (Bernoulli(``p``), independent).

    Each row consumes a fixed number of random words, so the draw for a row does not
    depend on how rows are split into blocks.
    """
    if p == 0.0 or p == 1.0:
        fill = torch.ones if p == 1.0 else torch.zeros
        return fill(rows, count, dtype=torch.bool, device=device)
    if p == 0.5:
        w = (count + 63) // 64  # words per row
        words = _random_int64(rows * w, device=device, generator=generator)
        octets = words.view(torch.int8).view(rows, 1, 8 * w)
        bits = torch.tensor(_BIT_VALUES, dtype=torch.int8, device=device).view(1, 8, 1)
        return torch.bitwise_and(octets, bits).ne_(0).view(torch.bool).view(rows, 64 * w)
    w = (count + 1) // 2
    words = _random_int64(rows * w, device=device, generator=generator)
    return words.view(torch.int32).view(rows, 2 * w) < (round(p * 2**32) - 2**31)


def _expand_groups(table: torch.Tensor, groups: _GeneGroups, out: torch.Tensor) -> torch.Tensor:
    """Per-gene mask ``out`` ``(r, N)`` (contiguous bool) from a ``(r, L)`` group table."""
    rows, cols = out.shape
    if groups.segments is None or out.device.type != "cpu":
        if out.device.type == "cpu":  # one row at a time: 2-5x faster than dim-1 gathers
            for i in range(rows):
                torch.index_select(table[i], 0, groups.ids, out=out[i])
        else:
            torch.index_select(table, 1, groups.ids, out=out)
        return out
    table = table.contiguous()
    width = table.shape[1]
    for start, base, shape, gene_strides, id_strides in groups.segments:
        dst = out.as_strided((rows, *shape), (cols, *gene_strides), out.storage_offset() + start)
        src = table.as_strided((rows, *shape), (width, *id_strides), table.storage_offset() + base)
        dst.copy_(src)
    return out


# --------------------------------------------------------------------------- cross-over


def _uniform_cross_over_stacked(
    parents1: torch.Tensor,
    parents2: torch.Tensor,
    *,
    swap_probability: float = 0.5,
    generator: torch.Generator | None = None,
    groups: torch.Tensor | _GeneGroups | None = None,
) -> torch.Tensor:
    """Like :func:`uniform_cross_over` but returns both children in one ``(2, *shape)`` tensor.

    For ``(M, N)`` parents, ``result.view(2 * M, N)`` is ``[children1; children2]``
    without a copy (what the cross-over operator hands to EvoTorch).
    """
    p = _check_probability("swap_probability", swap_probability)
    if not isinstance(parents1, torch.Tensor) or not isinstance(parents2, torch.Tensor):
        raise TypeError(
            f"`parents1` and `parents2` must be tensors, got {type(parents1).__name__} "
            f"and {type(parents2).__name__}"
        )
    if parents1.shape != parents2.shape:
        raise ValueError(
            f"`parents1` and `parents2` must have the same shape, got {tuple(parents1.shape)} "
            f"and {tuple(parents2.shape)}"
        )
    if parents1.dtype != parents2.dtype:
        raise ValueError(
            f"`parents1` and `parents2` must have the same dtype, got {parents1.dtype} "
            f"and {parents2.dtype}"
        )
    if parents1.device != parents2.device:
        raise ValueError(
            f"`parents1` and `parents2` must be on the same device, got {parents1.device} "
            f"and {parents2.device}"
        )
    if parents1.ndim < 1:
        raise ValueError("`parents1` must have at least one dimension (genes), got a scalar")

    shape = parents1.shape
    if groups is not None:
        groups = _prepare_groups(groups, shape[-1], parents1.device)
    out = torch.empty((2,) + tuple(shape), dtype=parents1.dtype, device=parents1.device)
    if parents1.numel() > 0:
        a, b = _as_rows(parents1), _as_rows(parents2)
        _cross_over_rows(a, b, None, None, out.view(2, -1, a.shape[-1]), p, generator, groups)
    return out


def _cross_over_rows(
    src1: torch.Tensor,
    src2: torch.Tensor,
    index1: torch.Tensor | None,
    index2: torch.Tensor | None,
    out: torch.Tensor,
    p: float,
    generator,
    groups: _GeneGroups | None = None,
) -> None:
    """Write ``(2, M, N)`` children of rows ``src1[index1]`` x ``src2[index2]`` into ``out``.

    ``src*`` are ``(R, N)``; ``index*`` are ``(M,)`` row indices or ``None`` (rows
    ``0..M-1``). Rows are gathered chunk by chunk, so gathered parents stay in cache
    instead of making a full-size copy first. ``groups``: swap whole groups (one draw
    per row and group, expanded a block of rows at a time) instead of single genes.
    """
    device, dtype = src1.device, src1.dtype
    rows, cols = out.shape[1], out.shape[2]
    o1, o2 = out[0], out[1]
    int_dtype = _SAME_WIDTH_INT.get(src1.element_size())
    if src1.is_complex() or dtype == torch.bool:
        int_dtype = None
    if device.type == "cpu":
        genes = _CHUNK_GENES if torch.get_num_threads() == 1 else _CHUNK_GENES_MULTITHREAD
        chunk = max(1, genes // cols)
    else:  # GPU kernels are not branch-bound and one launch per op is cheapest
        chunk = rows
    # Scratch buffers reused by every chunk: fresh multi-MB allocations are mmapped and
    # page-faulted on first touch, which costs as much as the arithmetic.
    chunk = min(chunk, rows)
    scratch = (
        None if int_dtype is None else torch.empty(chunk, cols, dtype=int_dtype, device=device)
    )
    gather = None
    if (index1 is not None or index2 is not None) and torch.get_num_threads() == 1:
        gather = torch.empty(2, chunk, cols, dtype=dtype, device=device)
    if groups is None:
        mask_scratch = torch.empty(
            chunk * 8 * ((cols + 7) // 8), dtype=torch.int8, device=device
        )
    else:
        # Whole chunks per mask block; on CPU about _MASK_BLOCK_GENES genes of rows.
        block = rows if device.type != "cpu" else max(1, _MASK_BLOCK_GENES // (cols * chunk))
        block = min(rows, block * chunk)
        mask_block = torch.empty(block, cols, dtype=torch.bool, device=device)
        block_start, block_end = 0, 0
    for s in range(0, rows, chunk):
        e = min(rows, s + chunk)
        r = e - s
        a = src1[s:e] if index1 is None else _gather_rows(src1, index1[s:e], gather, 0)
        b = src2[s:e] if index2 is None else _gather_rows(src2, index2[s:e], gather, 1)
        if groups is None:
            mask = _bernoulli_mask(
                r, cols, p, device=device, generator=generator, scratch=mask_scratch
            )
        else:
            if s >= block_end:
                block_start, block_end = s, min(rows, s + block)
                n = block_end - block_start
                table = _group_table(n, groups.count, p, device=device, generator=generator)
                _expand_groups(table, groups, mask_block[:n])
            mask = mask_block[s - block_start : e - block_start]
        if int_dtype is None:
            torch.where(mask, b, a, out=o1[s:e])
            torch.where(mask, a, b, out=o2[s:e])
        else:
            # Exact blend on the bit patterns (NaN payloads and -0.0 survive):
            # d = (a ^ b) where the mask is set, else 0; child1 = a ^ d, child2 = b ^ d.
            ai, bi = a.view(int_dtype), b.view(int_dtype)
            d = torch.bitwise_xor(ai, bi, out=scratch[:r]).mul_(mask)
            torch.bitwise_xor(ai, d, out=o1[s:e].view(int_dtype))
            torch.bitwise_xor(bi, d, out=o2[s:e].view(int_dtype))


def _gather_rows(src: torch.Tensor, index: torch.Tensor, gather, slot: int) -> torch.Tensor:
    """``src[index]``. With one thread, into a reused buffer (no page faults); with more,
    by advanced indexing: there ``index_select`` took 5-10x a clone of the same rows on
    this 2-core CPU, indexing ~1.2x."""
    if gather is None:
        return src[index]
    return torch.index_select(src, 0, index, out=gather[slot, : index.shape[0]])


def _cross_over_population(
    values: torch.Tensor,
    index1: torch.Tensor,
    index2: torch.Tensor,
    *,
    swap_probability: float,
    generator,
    out: torch.Tensor | None = None,
    groups: torch.Tensor | _GeneGroups | None = None,
) -> torch.Tensor:
    """Children of pairs ``(values[index1[i]], values[index2[i]])``: ``(2 * M, N)``
    ``[children1; children2]``, gathering parent rows chunk by chunk.

    ``out``: optional contiguous ``(2 * M, N)`` tensor to write the children into.
    ``groups``: ``(N,)`` group ids (or prepared ones) for group cross-over.
    """
    p = _check_probability("swap_probability", swap_probability)
    m, n = index1.shape[0], values.shape[-1]
    if groups is not None:
        groups = _prepare_groups(groups, n, values.device)
    if out is None:
        out = torch.empty(2 * m, n, dtype=values.dtype, device=values.device)
    elif out.shape != (2 * m, n) or not out.is_contiguous() or out.dtype != values.dtype:
        raise ValueError(
            f"`out` must be a contiguous {values.dtype} tensor of shape {(2 * m, n)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    if out.numel() > 0:
        _cross_over_rows(values, values, index1, index2, out.view(2, m, n), p, generator, groups)
    return out


def uniform_cross_over(
    parents1: torch.Tensor,
    parents2: torch.Tensor,
    *,
    swap_probability: float = 0.5,
    generator: torch.Generator | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform cross-over of paired parents, per gene or per group of genes.

    Gene ``j`` of ``children1[i]`` is ``parents2[i, j]`` with probability
    ``swap_probability`` and ``parents1[i, j]`` otherwise, independently for every
    gene; ``children2`` takes the other parent's gene at every position (the
    complement). Genes are copied bit for bit (no arithmetic).

    With ``groups``, the choice is made once per (row, group) instead: every gene of
    group ``g`` in ``children1[i]`` comes from ``parents2[i]`` with probability
    ``swap_probability`` (independently across rows and groups), else all from
    ``parents1[i]``; ``children2`` is again the complement. Group ids are arbitrary
    non-negative integers (need not be contiguous, sorted or dense); genes of a group
    need not be adjacent. ``TransformerProblem.gene_groups(level)`` gives the ids of a
    network's rows, heads, experts, tensors or layers. The ids are compiled into a
    strided-copy plan once per tensor (cached while the tensor is unmodified), so pass
    the same tensor on every call.

    Args:
        parents1: ``(..., P, N)`` decision values (any leading batch dimensions).
        parents2: same shape, dtype and device as ``parents1``.
        swap_probability: probability in ``[0, 1]`` that a gene of ``children1``
            comes from ``parents2``. ``0.5`` (the default) is the fastest path.
        generator: source of randomness; ``None`` uses PyTorch's global generator.
        groups: ``None`` (per gene, the default) or an ``(N,)`` integer tensor of
            non-negative group ids, one per gene.
    Returns:
        ``(children1, children2)``, each ``(..., P, N)``, new tensors (two halves of
        one allocation).
    Raises:
        ValueError: probability outside ``[0, 1]``; mismatched shape/dtype/device;
            ``groups`` not of shape ``(N,)``, not integer, or with a negative id.
        TypeError: ``groups`` not a tensor.
    """
    out = _uniform_cross_over_stacked(
        parents1, parents2, swap_probability=swap_probability, generator=generator, groups=groups
    )
    return out[0], out[1]
