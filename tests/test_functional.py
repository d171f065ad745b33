"""Statistics, exactness and validation of the functional GA kernels."""

import math

import pytest
import torch

from evotorch_mqa_moe.evolution import crossover
from evotorch_mqa_moe.evolution.crossover import _cross_over_population, uniform_cross_over
from evotorch_mqa_moe.evolution.mutation import (
    _bernoulli_positions,
    gaussian_mutation,
    gaussian_mutation_,
)
from evotorch_mqa_moe.evolution.selection import best_first, tournament_pairs, truncation_pairs


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def within_binomial(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


# --------------------------------------------------------------------------- cross-over


@pytest.mark.parametrize("p", [0.5, 0.3, 0.9, 0.01])
def test_cross_over_genes_come_from_parents_at_rate_p(p):
    a = torch.randn(64, 1001, generator=gen(1))
    b = torch.randn(64, 1001, generator=gen(2))  # all genes differ from a (a.s.)
    c1, c2 = uniform_cross_over(a, b, swap_probability=p, generator=gen(3))
    from_b = c1 == b
    assert torch.all((c1 == a) | from_b)
    assert torch.all(torch.where(from_b, c2 == a, c2 == b))  # complement
    assert within_binomial(int(from_b.sum()), a.numel(), p)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_cross_over_extreme_probabilities(p):
    a, b = torch.zeros(3, 10), torch.ones(3, 10)
    c1, c2 = uniform_cross_over(a, b, swap_probability=p, generator=gen())
    assert torch.equal(c1, b if p else a) and torch.equal(c2, a if p else b)


def test_cross_over_fair_coin_has_no_biased_bit_positions():
    # One column per bit of a 64-bit word: an unpacking bug (e.g. a never-set sign
    # bit) would show up as a column far from 0.5.
    a, b = torch.zeros(4096, 64), torch.ones(4096, 64)
    c1, _ = uniform_cross_over(a, b, generator=gen(5))
    frac = c1.mean(0)
    assert torch.all((frac - 0.5).abs() <= 5 * math.sqrt(0.25 / 4096))


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]
)
def test_cross_over_dtypes_and_batch_dims(dtype):
    a = torch.randn(2, 3, 4, 50, generator=gen(1)).gt(0).to(dtype)
    b = ~a if dtype == torch.bool else a + 1
    c1, c2 = uniform_cross_over(a, b, generator=gen(2))
    assert c1.shape == a.shape and c1.dtype == dtype
    assert torch.all((c1 == a) | (c1 == b))
    assert torch.all(torch.where(c1 == a, c2 == b, c2 == a))


def test_cross_over_copies_bits_exactly_and_leaves_inputs_alone():
    a = torch.tensor([[float("nan"), -0.0, float("inf"), 1e-45] * 25])
    b = torch.tensor([[0.0, float("-inf"), 3.0, -1e38] * 25])
    a0, b0 = a.clone(), b.clone()
    c1, c2 = uniform_cross_over(a, b, generator=gen())
    ai, bi = a.view(torch.int32), b.view(torch.int32)
    c1i, c2i = c1.view(torch.int32), c2.view(torch.int32)
    assert torch.all((c1i == ai) | (c1i == bi)) and torch.all((c2i == ai) | (c2i == bi))
    assert torch.equal(a.view(torch.int32), a0.view(torch.int32))
    assert torch.equal(b, b0)


def test_cross_over_non_contiguous_and_chunked_rows(monkeypatch):
    monkeypatch.setattr(crossover, "_CHUNK_GENES", 3 * 800)  # 3 rows per chunk
    monkeypatch.setattr(crossover, "_CHUNK_GENES_MULTITHREAD", 3 * 800)
    base = torch.randn(40, 800, generator=gen(1))
    a, b = base[::2], base[1::2]
    c1, c2 = uniform_cross_over(a, b, generator=gen(2))
    assert torch.all((c1 == a) | (c1 == b))
    assert within_binomial(int((c1 == b).sum()), a.numel(), 0.5)


@pytest.mark.parametrize("threads", [1, 2])  # two gather paths
def test_cross_over_population_gathers_rows_in_chunks(monkeypatch, threads):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(crossover, "_CHUNK_GENES", 3 * 500)  # 3 rows per chunk
    monkeypatch.setattr(crossover, "_CHUNK_GENES_MULTITHREAD", 3 * 500)
    values = torch.randn(50, 500, generator=gen(1))
    idx1 = torch.randint(50, (40,), generator=gen(2))
    idx2 = (idx1 + 1) % 50
    children = _cross_over_population(values, idx1, idx2, swap_probability=0.5, generator=gen(3))
    assert children.shape == (80, 500)
    p1, p2 = values[idx1], values[idx2]
    c1, c2 = children[:40], children[40:]
    assert torch.all(torch.where(c1 == p1, c2 == p2, (c1 == p2) & (c2 == p1)))
    assert within_binomial(int((c1 == p2).sum()), c1.numel(), 0.5)


def test_cross_over_seeds():
    a, b = torch.zeros(8, 100), torch.ones(8, 100)
    r1 = uniform_cross_over(a, b, generator=gen(7))[0]
    r2 = uniform_cross_over(a, b, generator=gen(7))[0]
    r3 = uniform_cross_over(a, b, generator=gen(8))[0]
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_cross_over_rejects_bad_probability(p):
    with pytest.raises(ValueError, match="swap_probability"):
        uniform_cross_over(torch.zeros(2, 3), torch.zeros(2, 3), swap_probability=p)


def test_cross_over_rejects_mismatched_parents():
    with pytest.raises(ValueError, match="shape"):
        uniform_cross_over(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dtype"):
        uniform_cross_over(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64))


# --------------------------------------------------------------------------- group cross-over


def matrix_columns(rows, cols):
    """Ids of a (rows, cols) weight flattened: group j = column j (a strided plan block)."""
    return torch.arange(cols).repeat(rows)


GROUP_PATTERNS = {
    "columns": lambda: torch.cat([matrix_columns(30, 17), torch.arange(17)]),  # + a bias
    "runs": lambda: torch.arange(600) // 37,  # contiguous runs (tensors, layers)
    "scattered": lambda: torch.randint(0, 40, (600,), generator=gen(9)),  # no structure
    "sparse-ids": lambda: torch.randint(0, 40, (600,), generator=gen(9)) * 1000 + 5,
}


def group_sums(mask, ids):
    """(R, G) number of genes of each group taken from the second parent, and sizes (G,)."""
    dense = torch.unique(ids, return_inverse=True)[1]
    count = int(dense.max()) + 1
    taken = torch.zeros(mask.shape[0], count).index_add_(1, dense, mask.float())
    return taken, torch.bincount(dense, minlength=count).float()


def assert_groups_whole(a, b, c1, c2, ids):
    """Every gene from a parent, complements, each group whole; returns (R, G) swapped."""
    from_b = c1 == b
    assert torch.all(from_b | (c1 == a))
    assert torch.all(torch.where(from_b, c2 == a, c2 == b))  # complement
    taken, size = group_sums(from_b.reshape(-1, a.shape[-1]), ids)
    assert torch.all((taken == 0) | (taken == size)), "a group was split between parents"
    return taken == size


@pytest.mark.parametrize("pattern", list(GROUP_PATTERNS))
@pytest.mark.parametrize("p", [0.5, 0.2])
def test_group_cross_over_takes_groups_whole_at_rate_p(pattern, p):
    ids = GROUP_PATTERNS[pattern]()
    rows = 2000
    a = torch.randn(rows, ids.numel(), generator=gen(1))
    b = torch.randn(rows, ids.numel(), generator=gen(2))  # every gene differs from a (a.s.)
    c1, c2 = uniform_cross_over(a, b, swap_probability=p, generator=gen(3), groups=ids)
    swapped = assert_groups_whole(a, b, c1, c2, ids)
    # Each (row, group) swaps independently with probability p: every group's swap count
    # over the rows is Binomial(rows, p), within 5 standard deviations (a false alarm has
    # probability ~6e-7 per group); so is the count of rows where groups 0 and 1 both swap
    # (Binomial(rows, p^2)), which a draw shared between groups would fail.
    for count in swapped.sum(0).tolist():
        assert within_binomial(count, rows, p)
    assert within_binomial(int((swapped[:, 0] & swapped[:, 1]).sum()), rows, p * p)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_group_cross_over_extreme_probabilities(p):
    a, b = torch.zeros(3, 10), torch.ones(3, 10)
    ids = torch.arange(10) % 3
    c1, c2 = uniform_cross_over(a, b, swap_probability=p, generator=gen(), groups=ids)
    assert torch.equal(c1, b if p else a) and torch.equal(c2, a if p else b)


def test_group_cross_over_copies_bits_and_leaves_inputs_alone():
    a = torch.tensor([[float("nan"), -0.0, float("inf"), 1e-45] * 25] * 6)
    b = torch.tensor([[0.0, float("-inf"), 3.0, -1e38] * 25] * 6)
    ids = torch.arange(100) % 7
    a0, b0, ids0 = a.clone(), b.clone(), ids.clone()
    c1, c2 = uniform_cross_over(a, b, generator=gen(), groups=ids)
    ai, bi, c1i, c2i = (t.view(torch.int32) for t in (a, b, c1, c2))
    assert torch.all((c1i == ai) | (c1i == bi)) and torch.all((c2i == ai) | (c2i == bi))
    assert torch.equal(ai, a0.view(torch.int32)) and torch.equal(b, b0)
    assert torch.equal(ids, ids0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64, torch.bool])
def test_group_cross_over_dtypes_and_batch_dims(dtype):
    a = torch.randn(2, 3, 40, 50, generator=gen(1)).gt(0).to(dtype)
    b = ~a if dtype == torch.bool else a + 1
    ids = torch.arange(50) // 10
    c1, c2 = uniform_cross_over(a, b, generator=gen(2), groups=ids)
    assert c1.shape == a.shape and c1.dtype == dtype
    assert_groups_whole(a, b, c1, c2, ids)


def test_group_cross_over_seeds():
    a, b = torch.zeros(8, 100), torch.ones(8, 100)
    ids = torch.arange(100) % 10
    r1 = uniform_cross_over(a, b, generator=gen(7), groups=ids)[0]
    r2 = uniform_cross_over(a, b, generator=gen(7), groups=ids)[0]
    r3 = uniform_cross_over(a, b, generator=gen(8), groups=ids)[0]
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_group_cross_over_plan_gather_and_blocking_agree(monkeypatch, p):
    # The strided-copy plan and the per-gene gather expand the same draws, and every
    # row consumes a fixed number of random words, so the children do not depend on the
    # path, the chunk size or the mask block size.
    ids = torch.cat([matrix_columns(20, 9), torch.arange(9), torch.arange(60) // 7 + 9])
    a = torch.randn(50, ids.numel(), generator=gen(1))
    b = torch.randn(50, ids.numel(), generator=gen(2))
    plan = crossover._prepare_groups(ids.clone(), ids.numel(), a.device)
    assert plan.segments is not None and len(plan.segments) <= 8
    ref = uniform_cross_over(a, b, swap_probability=p, generator=gen(3), groups=ids.clone())
    monkeypatch.setattr(crossover, "_MAX_PLAN_SEGMENTS", 0)  # force the gather
    assert crossover._prepare_groups(ids.clone(), ids.numel(), a.device).segments is None
    gathered = uniform_cross_over(a, b, swap_probability=p, generator=gen(3), groups=ids.clone())
    monkeypatch.undo()
    monkeypatch.setattr(crossover, "_CHUNK_GENES", 3 * ids.numel())
    monkeypatch.setattr(crossover, "_CHUNK_GENES_MULTITHREAD", 3 * ids.numel())
    monkeypatch.setattr(crossover, "_MASK_BLOCK_GENES", 7 * ids.numel())  # 2 chunks a block
    chunked = uniform_cross_over(a, b, swap_probability=p, generator=gen(3), groups=ids.clone())
    for other in (gathered, chunked):
        assert torch.equal(ref[0], other[0]) and torch.equal(ref[1], other[1])


@pytest.mark.parametrize("threads", [1, 2])  # two gather paths
def test_group_cross_over_population_pairs(monkeypatch, threads):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(crossover, "_CHUNK_GENES", 3 * 500)
    monkeypatch.setattr(crossover, "_CHUNK_GENES_MULTITHREAD", 3 * 500)
    monkeypatch.setattr(crossover, "_MASK_BLOCK_GENES", 6 * 500)
    values = torch.randn(50, 500, generator=gen(1))
    before = values.clone()
    ids = matrix_columns(25, 20)
    idx1 = torch.randint(50, (40,), generator=gen(2))
    idx2 = (idx1 + 1) % 50
    children = _cross_over_population(
        values, idx1, idx2, swap_probability=0.5, generator=gen(3), groups=ids
    )
    assert children.shape == (80, 500) and torch.equal(values, before)
    swapped = assert_groups_whole(values[idx1], values[idx2], children[:40], children[40:], ids)
    assert within_binomial(int(swapped.sum()), swapped.numel(), 0.5)


def test_group_cross_over_sees_in_place_changes_of_the_ids():
    # Compiled plans are cached per tensor; modifying the tensor must invalidate them.
    a, b = torch.zeros(64, 40), torch.ones(64, 40)
    ids = torch.zeros(40, dtype=torch.int64)
    c1, _ = uniform_cross_over(a, b, generator=gen(1), groups=ids)
    assert torch.all(c1 == c1[:, :1])  # one group: rows all-a or all-b
    ids.copy_(torch.arange(40))
    c1, _ = uniform_cross_over(a, b, generator=gen(1), groups=ids)
    assert not torch.all(c1 == c1[:, :1])


def test_group_cross_over_checks_a_cached_groups_tensor_against_new_parents():
    ids = torch.arange(10) % 2
    uniform_cross_over(torch.zeros(2, 10), torch.ones(2, 10), groups=ids)
    with pytest.raises(ValueError, match=r"shape \(12,\)"):
        uniform_cross_over(torch.zeros(2, 12), torch.ones(2, 12), groups=ids)


def test_group_cross_over_empty_genes():
    c1, c2 = uniform_cross_over(
        torch.zeros(3, 0), torch.zeros(3, 0), groups=torch.zeros(0, dtype=torch.int64)
    )
    assert c1.shape == c2.shape == (3, 0)


@pytest.mark.parametrize(
    "groups, match",
    [
        (torch.zeros(11, dtype=torch.int64), r"shape \(10,\).*\(11,\)"),
        (torch.zeros(1, 10, dtype=torch.int64), r"shape \(10,\).*\(1, 10\)"),
        (torch.zeros(10), "integer.*float32"),
        (torch.zeros(10, dtype=torch.bool), "integer.*bool"),
        (torch.tensor([0, 1, 2, -3, 4, 5, 6, 7, 8, 9]), ">= 0, got -3 .gene 3"),
    ],
)
def test_group_cross_over_rejects_bad_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        uniform_cross_over(torch.zeros(2, 10), torch.zeros(2, 10), groups=groups)
    with pytest.raises(ValueError, match=match):
        _cross_over_population(
            torch.zeros(4, 10), torch.tensor([0]), torch.tensor([1]), swap_probability=0.5,
            generator=None, groups=groups,
        )


def test_group_cross_over_rejects_non_tensor_groups():
    with pytest.raises(TypeError, match="groups.*list"):
        uniform_cross_over(torch.zeros(2, 3), torch.zeros(2, 3), groups=[0, 1, 2])


# --------------------------------------------------------------------------- mutation


@pytest.mark.parametrize("p", [0.1, 0.02, 0.5, 0.7, 0.97])
def test_mutation_rate_mean_and_stdev(p):
    x = torch.zeros(200, 500)
    y = gaussian_mutation(x, stdev=0.3, mutation_probability=p, generator=gen(11))
    changed = y != 0
    k = int(changed.sum())
    assert within_binomial(k, x.numel(), p)
    d = y[changed].double()
    # mean within 5 standard errors; sample stdev within 5 of its standard errors
    assert abs(d.mean()) <= 5 * 0.3 / math.sqrt(k)
    assert abs(d.std() / 0.3 - 1) <= 5 / math.sqrt(2 * k)


@pytest.mark.parametrize("p", [0.1, 0.7])
def test_mutation_genes_are_independent(p):
    # Count per row ~ Binomial(N, p): its variance must match N p (1 - p).
    rows, n = 2000, 500
    y = gaussian_mutation(torch.zeros(rows, n), stdev=1.0, mutation_probability=p, generator=gen(3))
    counts = (y != 0).sum(1).double()
    var = n * p * (1 - p)
    assert abs(counts.var() - var) <= 5 * var * math.sqrt(2 / (rows - 1))
    per_column = (y != 0).double().mean(0)
    assert abs(per_column.mean() - p) <= 5 * math.sqrt(p * (1 - p) / (rows * n))


def test_mutation_positions_loop_when_first_draw_falls_short():
    n, p = 100_000, 0.2
    pos = _bernoulli_positions(
        n, p, device=torch.device("cpu"), generator=gen(1), _slack_sigmas=-30
    )
    assert torch.all(pos[1:] > pos[:-1]) and 0 <= int(pos[0]) and int(pos[-1]) < n
    assert within_binomial(pos.numel(), n, p)


def test_mutation_none_changes_every_gene_and_keeps_input():
    x = torch.randn(16, 300, generator=gen(1))
    x0 = x.clone()
    y = gaussian_mutation(x, stdev=0.1, generator=gen(2))
    assert torch.all(y != x) and torch.equal(x, x0)
    assert y.dtype == x.dtype and y.device == x.device and y is not x


@pytest.mark.parametrize("p", [0.1, 0.8, None])
def test_in_place_mutation_matches_the_copying_one(p):
    x = torch.randn(6, 300, generator=gen(1))
    expected = gaussian_mutation(x, stdev=0.2, mutation_probability=p, generator=gen(9))
    y = x.clone()
    out = gaussian_mutation_(y, stdev=0.2, mutation_probability=p, generator=gen(9))
    assert out is y and torch.equal(y, expected)
    with pytest.raises(ValueError, match="contiguous"):
        gaussian_mutation_(x.t(), stdev=0.2)


def test_mutation_zero_probability_or_stdev_copies():
    x = torch.randn(4, 10)
    for kwargs in [dict(stdev=1.0, mutation_probability=0.0), dict(stdev=0.0)]:
        y = gaussian_mutation(x, generator=gen(), **kwargs)
        assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("p", [0.2, None])
def test_mutation_tensor_stdev_per_individual_and_per_gene(p):
    x = torch.zeros(2, 3, 400)  # leading batch dim too
    per_ind = torch.tensor([0.1, 1.0, 10.0]).view(3, 1)
    y = gaussian_mutation(x, stdev=per_ind, mutation_probability=p, generator=gen(4))
    for i, s in enumerate([0.1, 1.0, 10.0]):
        d = y[:, i][y[:, i] != 0]
        assert abs(d.std() / s - 1) < 0.25
    per_gene = torch.cat([torch.zeros(200), torch.ones(200)])
    y = gaussian_mutation(x, stdev=per_gene, mutation_probability=p, generator=gen(5))
    assert torch.all(y[..., :200] == 0) and torch.any(y[..., 200:] != 0)


def test_mutation_dtype_float64_and_half():
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.zeros(4, 100, dtype=dtype)
        y = gaussian_mutation(x, stdev=1.0, mutation_probability=0.3, generator=gen())
        assert y.dtype == dtype


def test_mutation_seeds():
    x = torch.zeros(8, 100)
    for p in (0.1, 0.8, None):
        r1 = gaussian_mutation(x, stdev=1.0, mutation_probability=p, generator=gen(7))
        r2 = gaussian_mutation(x, stdev=1.0, mutation_probability=p, generator=gen(7))
        r3 = gaussian_mutation(x, stdev=1.0, mutation_probability=p, generator=gen(8))
        assert torch.equal(r1, r2) and not torch.equal(r1, r3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stdev=1.0, mutation_probability=-0.5), "mutation_probability"),
        (dict(stdev=1.0, mutation_probability=1.01), "mutation_probability"),
        (dict(stdev=-1.0), "stdev"),
        (dict(stdev=float("nan")), "stdev"),
        (dict(stdev=torch.tensor([1.0, -1.0, 1.0])), "stdev"),
        (dict(stdev=torch.ones(4)), "broadcast"),
    ],
)
def test_mutation_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_mutation(torch.zeros(2, 3), **kwargs)


def test_mutation_rejects_integer_values():
    with pytest.raises(TypeError, match="floating"):
        gaussian_mutation(torch.zeros(2, 3, dtype=torch.int64), stdev=1.0)


# --------------------------------------------------------------------------- selection


def test_best_first_puts_nan_last():
    f = torch.tensor([1.0, float("nan"), 3.0, -2.0])
    assert best_first(f, maximize=True).tolist() == [2, 0, 3, 1]
    assert best_first(f, maximize=False).tolist() == [3, 0, 2, 1]


@pytest.mark.parametrize("maximize", [True, False])
def test_truncation_pairs_draw_distinct_parents_from_the_top(maximize):
    f = torch.arange(20.0)
    f[5] = float("nan")
    i1, i2 = truncation_pairs(f, 500, fraction=0.25, maximize=maximize, generator=gen())
    top = set(range(15, 20)) if maximize else {0, 1, 2, 3, 4}
    assert set(i1.tolist()) == top and set(i2.tolist()) == top
    assert torch.all(i1 != i2)


def test_truncation_pairs_validation():
    with pytest.raises(ValueError, match="fraction"):
        truncation_pairs(torch.zeros(4), 2, fraction=1.5, maximize=True)
    with pytest.raises(ValueError, match="at least 2"):
        truncation_pairs(torch.zeros(1), 2, fraction=0.5, maximize=True)


def test_tournament_pairs_prefer_better_and_never_pick_nan():
    f = torch.tensor([float("nan"), 1.0, 2.0, 3.0, 4.0])
    i1, i2 = tournament_pairs(f, 200, tournament_size=40, maximize=False, generator=gen())
    assert torch.all(i1 == 1) and torch.all(i2 == 1)
    i1, _ = tournament_pairs(f, 2000, tournament_size=2, maximize=True, generator=gen())
    assert (i1 == 4).sum() > (i1 == 1).sum()
    # NaN wins only when every contestant is NaN: 1/25 of tournaments (36% if NaN won ties)
    assert (i1 == 0).double().mean() < 0.07
    with pytest.raises(ValueError, match="tournament_size"):
        tournament_pairs(f, 2, tournament_size=0, maximize=True)
