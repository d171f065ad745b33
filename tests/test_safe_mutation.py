"""Safe mutation (Lehman et al. 2018): sensitivities against one network at a time,
the scale's normalisation, its effect on output changes, its refresh schedule, its state."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import vector_to_parameters

from evotorch_mqa_moe import GaussianMutation, MQAMoETransformer, TransformerConfig
from evotorch_mqa_moe.evolution.safe_mutation import SafeMutationScale
from evotorch_mqa_moe.evolution.sensitivity import (
    METHODS,
    output_sensitivity,
    sensitivity_inputs,
    sensitivity_to_scale,
)
from evotorch_mqa_moe.model import init_parameters, parameter_layout, population_forward
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems.reverse import ReverseTask
from evotorch_mqa_moe.searchers.state import capture, restore

TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny backward passes: one thread avoids oversubscribing a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**changes) -> TransformerConfig:
    base = dict(embed_dim=8, num_heads=2, num_layers=1, expert_dim=4, num_experts=2,
                max_seq_len=4)
    base.update(changes)
    return TransformerConfig(**base)


CONFIGS = {
    "tokens": tiny(vocab_size=5),
    "vectors-pooled": tiny(input_dim=3, output_dim=2, pooling="last", positional="learned"),
    "gqa-topk-causal": tiny(vocab_size=5, num_kv_heads=2, top_k=1, positional="learned",
                            causal=True, num_layers=2),
}


def make_inputs(config: TransformerConfig, shape: tuple[int, ...], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if config.token_inputs:
        return torch.randint(0, config.vocab_size, shape, generator=g)
    return torch.randn(*shape, config.input_dim, generator=g)


def reference(config, values, inputs, method, signs=None):
    """One nn.Module per individual, one torch.autograd.grad per output (unit, row, sign draw)."""
    rows = []
    for p, row in enumerate(values):
        model = MQAMoETransformer(config, dtype=values.dtype)
        vector_to_parameters(row.clone(), model.parameters())
        params = list(model.parameters())
        x = inputs[p] if inputs.dim() == values.dim() + (1 if config.token_inputs else 2) \
            else inputs
        y = model(x).reshape(-1, config.output_dim)  # (M, O)
        M, O = y.shape

        def flat_grad(scalar, params=params):
            grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
            return torch.cat([torch.zeros_like(q).reshape(-1) if g is None else g.reshape(-1)
                              for g, q in zip(grads, params, strict=True)])

        s2 = torch.zeros_like(row)
        if method == "sum":
            for k in range(O):
                s2 += flat_grad(y[:, k].mean()) ** 2
        elif method == "abs":
            for k in range(O):
                s2 += (sum(flat_grad(y[r, k]).abs() for r in range(M)) / M) ** 2
        else:
            R = signs.shape[1]
            for q in range(R):
                s2 += flat_grad((signs[p, q] * y).sum()) ** 2
            s2 /= M * R
        rows.append(s2.sqrt())
    return torch.stack(rows)


# --------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_sensitivity_matches_one_network_at_a_time(name, method, chunk_size):
    config = CONFIGS[name]
    values = init_parameters(config, 3, generator=torch.Generator().manual_seed(0))
    inputs = make_inputs(config, (2, 4))
    got = output_sensitivity(config, values, inputs, method=method, chunk_size=chunk_size,
                             projections=3, generator=torch.Generator().manual_seed(7))
    signs = None
    if method == "rms":  # the documented draw: (P, R, M, O) signs from the generator
        M = 2 if config.pooling else 8
        signs = torch.randint(0, 2, (3, 3, M, config.output_dim),
                              generator=torch.Generator().manual_seed(7)).float() * 2 - 1
    want = reference(config, values, inputs, method, signs)
    assert got.shape == values.shape
    assert (want > 0).float().mean() > 0.5  # a real comparison, not zeros against zeros
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("method", METHODS)
def test_sensitivity_with_inputs_per_individual(method):
    config = CONFIGS["tokens"]
    values = init_parameters(config, 2, generator=torch.Generator().manual_seed(3))
    inputs = make_inputs(config, (2, 2, 3))  # (P, B, T)
    got = output_sensitivity(config, values, inputs, method=method, projections=2,
                             generator=torch.Generator().manual_seed(1))
    for p in range(2):
        one = output_sensitivity(config, values[p:p + 1], inputs[p], method=method,
                                 projections=2, generator=torch.Generator().manual_seed(1))
        if method != "rms":  # the random signs of row p differ when drawn alone
            torch.testing.assert_close(got[p:p + 1], one, atol=TOL, rtol=TOL)
    signs = torch.randint(0, 2, (2, 2, 6, 5), generator=torch.Generator().manual_seed(1))
    want = reference(config, values, inputs, method, signs.float() * 2 - 1)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_sum_sensitivity_matches_finite_differences_for_every_tensor():
    """Independent of autograd (float64): the row-mean outputs' change per unit change of one
    gene. Guards every tensor, including the expert input biases, which once got gradient 0."""
    config = CONFIGS["gqa-topk-causal"].replace(top_k=None)  # top-1 gates have no gradient
    w = init_parameters(config, 1, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
    x = make_inputs(config, (3, 4))
    s = output_sensitivity(config, w, x, method="sum")[0]
    genes, offset, eps = [], 0, 1e-6
    for _, shape in parameter_layout(config):
        genes.append(offset)  # the first gene (a query, not a key, bias of the fused qkv)
        offset += math.prod(shape)
    idx = torch.tensor(genes)
    plus, minus = w.repeat(len(genes), 1), w.repeat(len(genes), 1)
    plus[torch.arange(len(genes)), idx] += eps
    minus[torch.arange(len(genes)), idx] -= eps
    mean = lambda v: population_forward(config, v, x).reshape(len(genes), -1,  # noqa: E731
                                                                config.output_dim).mean(1)
    fd = ((mean(plus) - mean(minus)) / (2 * eps)).norm(dim=-1)
    assert (fd > 1e-4).all()
    torch.testing.assert_close(s[idx], fd, rtol=1e-5, atol=1e-8)


def test_rms_estimate_is_unbiased():
    """Many random-sign projections converge to the exact per-row RMS output gradient."""
    config = CONFIGS["tokens"]
    values = init_parameters(config, 1, generator=torch.Generator().manual_seed(2),
                             dtype=torch.float64)
    x = make_inputs(config, (2, 3))
    est = output_sensitivity(config, values, x, method="rms", projections=400,
                             generator=torch.Generator().manual_seed(0))
    # exact: per-row gradients of every unit
    model = MQAMoETransformer(config, dtype=torch.float64)
    vector_to_parameters(values[0].clone(), model.parameters())
    y = model(x).reshape(-1, config.output_dim)
    exact = torch.zeros_like(values[0])
    for r in range(y.shape[0]):
        for k in range(y.shape[1]):
            grads = torch.autograd.grad(y[r, k], list(model.parameters()), retain_graph=True)
            exact += torch.cat([g.reshape(-1) for g in grads]) ** 2
    exact = (exact / y.shape[0]).sqrt()
    # sqrt(2/400) = 7% relative spread per gene; the median of 400+ genes is far tighter
    ratio = est[0][exact > 0] / exact[exact > 0]
    assert abs(float(ratio.square().median()) - 1) < 0.05
    assert abs(float(ratio.square().mean()) - 1) < 0.05


def test_sensitivity_works_under_no_grad_and_leaves_values_alone():
    config = CONFIGS["tokens"]
    values = init_parameters(config, 2, generator=torch.Generator().manual_seed(0))
    before = values.clone()
    with torch.no_grad():
        s = output_sensitivity(config, values, make_inputs(config, (2, 4)), method="sum")
    assert torch.equal(values, before) and not values.requires_grad
    assert not s.requires_grad and (s >= 0).all() and s.isfinite().all()


# --------------------------------------------------------------------------- scale


def test_scale_is_inverse_sensitivity_with_rms_one_floor_and_plain_zeros():
    s = torch.tensor([[4.0, 2.0, 1.0, 0.5, 0.0, 1e-9],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    m = sensitivity_to_scale(s, floor=0.1)
    # exact root mean square 1 over all genes of each row
    torch.testing.assert_close(m.square().mean(dim=-1), torch.ones(2))
    # zero sensitivity: plain mutation; a row without any information: all ones
    assert m[0, 4] == 1 and torch.equal(m[1], torch.ones(6))
    # inverse proportional above the floor (median of the positive genes = 1.0)
    torch.testing.assert_close(m[0, :4] * s[0, :4], torch.full((4,), float(m[0, 0] * 4)))
    # the tiny gene is floored at 0.1 * median: 10x the multiplier of the median gene
    torch.testing.assert_close(m[0, 5], 10 * m[0, 2])
    # "outputs": the same multipliers times one factor per row, so that the first-order
    # output change sum_j (s_j m_j)^2 equals plain mutation's sum_j s_j^2
    o = sensitivity_to_scale(s, floor=0.1, normalize="outputs")
    torch.testing.assert_close((s[0] * o[0]).square().sum(), s[0].square().sum())
    torch.testing.assert_close(o[0] / m[0], torch.full((6,), float(o[0, 0] / m[0, 0])))
    assert torch.equal(o[1], torch.ones(6))


def output_change_per_tensor(config, w, multiplier, x, *, sigma=1e-3, draws=32, genes=4,
                             seed=0):
    """Mean over draws and output rows of ||delta y_row|| (L2 over units) when ``genes``
    random genes of one parameter tensor get N(0, (sigma * multiplier)^2) noise; one value
    per parameter tensor. All tensors x draws run as one population."""
    g = torch.Generator().manual_seed(seed)
    rows, offset = [], 0
    for _, shape in parameter_layout(config):
        size = math.prod(shape)
        d = torch.zeros(draws, w.numel())
        for r in range(draws):
            idx = offset + torch.randperm(size, generator=g)[:genes]
            d[r, idx] = torch.randn(len(idx), generator=g) * sigma * multiplier[idx]
        rows.append(w + d)
        offset += size
    base = population_forward(config, w[None], x)
    delta = (population_forward(config, torch.cat(rows), x) - base)
    delta = delta.reshape(-1, draws, delta[0].numel() // config.output_dim, config.output_dim)
    return delta.norm(dim=-1).mean(dim=(1, 2))


def coefficient_of_variation(v):
    return float(v.std() / v.mean())


@pytest.mark.parametrize("method", ["rms", "abs"])
@pytest.mark.parametrize("task_name", ["reverse", "cartpole"])
def test_safe_mutation_changes_outputs_evenly_across_tensors(method, task_name):
    """The statistic: for every parameter tensor, the mean ||delta output|| per row when 4 of
    its genes are mutated (32 draws, sigma 1e-3, on a held-out input batch); its coefficient
    of variation over tensors. Measured (default models, seeds 0-2): plain 1.2-1.7; safe
    "abs" 0.18-0.27, "rms" (4 projections) 0.20-0.34. Required: safe < 0.5 and < plain / 2."""
    if task_name == "cartpole":
        pytest.importorskip("gymnasium")
        from evotorch_mqa_moe.problems.cartpole import CartPoleTask

        task = CartPoleTask()
    else:
        task = ReverseTask()
    config = task.default_config()
    w = init_parameters(config, 1, generator=torch.Generator().manual_seed(0))[0]
    measure = sensitivity_inputs(task, 32, torch.Generator().manual_seed(100))
    held_out = sensitivity_inputs(task, 32, torch.Generator().manual_seed(200))
    s = output_sensitivity(config, w[None], measure, method=method,
                           generator=torch.Generator().manual_seed(0))[0]
    plain = output_change_per_tensor(config, w, torch.ones_like(w), held_out)
    safe = output_change_per_tensor(config, w, sensitivity_to_scale(s), held_out)
    cv_plain, cv_safe = coefficient_of_variation(plain), coefficient_of_variation(safe)
    assert cv_plain > 1.0
    assert cv_safe < 0.5 and cv_safe < cv_plain / 2


def test_normalisation_sets_the_size_of_the_output_change():
    """RMS output change when every gene is mutated (sigma 1e-3, 64 draws, held-out batch),
    relative to plain mutation. Measured (reverse default model, seeds 0-2): "outputs" 1.34-1.41
    (above 1: the 4-projection estimate's noise gives underestimated genes larger steps),
    "genes" 0.06-0.08. Required: "outputs" within [0.67, 2], "genes" below 0.2."""
    task = ReverseTask()
    config = task.default_config()
    w = init_parameters(config, 1, generator=torch.Generator().manual_seed(0))
    measure = sensitivity_inputs(task, 32, torch.Generator().manual_seed(1))
    s = output_sensitivity(config, w, measure, generator=torch.Generator().manual_seed(0))[0]
    x = sensitivity_inputs(task, 32, torch.Generator().manual_seed(2))
    noise = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(3)) * 1e-3
    base = population_forward(config, w, x)

    def change(multiplier):
        out = population_forward(config, w + noise * multiplier, x)
        return float((out - base).square().sum(dim=-1).mean().sqrt())

    plain = change(1.0)
    assert 0.67 < change(sensitivity_to_scale(s, normalize="outputs")) / plain < 2
    assert change(sensitivity_to_scale(s, normalize="genes")) / plain < 0.2


def test_sum_evens_the_change_of_the_batch_mean_outputs():
    """SM-G-SUM controls what it measures: the change of the row-mean outputs (one shared
    direction per unit), which it evens out across tensors; per-row changes it does not
    (gradients of different rows cancel in the sum), which is why "rms" is the default.
    Measured (seeds 0-2, 16 draws of 4 genes per tensor, sigma 1e-4): coefficient of variation
    over tensors of ||delta mean output||, plain 1.37-1.50, SM-G-SUM 0.14-0.15."""
    task = ReverseTask()
    config = task.default_config()
    w = init_parameters(config, 1, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)[0]
    x = sensitivity_inputs(task, 32, torch.Generator().manual_seed(100))
    s = output_sensitivity(config, w[None], x, method="sum")[0]

    def mean_change(multiplier):
        g = torch.Generator().manual_seed(0)
        rows, offset = [], 0
        for _, shape in parameter_layout(config):
            size = math.prod(shape)
            d = torch.zeros(16, w.numel(), dtype=w.dtype)
            for r in range(16):
                idx = offset + torch.randperm(size, generator=g)[:4]
                noise = torch.randn(len(idx), generator=g, dtype=w.dtype)
                d[r, idx] = noise * 1e-4 * multiplier[idx]
            rows.append(w + d)
            offset += size
        out = population_forward(config, torch.cat(rows), x).mean(dim=(1, 2))
        base = population_forward(config, w[None], x).mean(dim=(1, 2))
        return (out - base).norm(dim=-1).reshape(-1, 16).mean(dim=1)

    cv_plain = coefficient_of_variation(mean_change(torch.ones_like(w)))
    cv_sum = coefficient_of_variation(mean_change(sensitivity_to_scale(s)))
    assert cv_sum < 0.5 and cv_sum < cv_plain / 2


# --------------------------------------------------------------------------- the refreshing class


def small_problem(seed: int = 0) -> TransformerProblem:
    task = ReverseTask(vocab_size=5, seq_len=4, batch_size=8, test_size=8)
    return TransformerProblem(task, CONFIGS["tokens"], seed=seed)


def test_refresh_happens_exactly_every_k_generations():
    problem = small_problem()
    values = problem.init_population(6)
    safe = SafeMutationScale(problem, every=3, seed=0, num_individuals=2, batch_size=2)
    refreshed = []
    previous = None
    for _ in range(10):
        m = safe.scale(values)
        refreshed.append(m is not previous)
        previous = m
        assert m.shape == (values.shape[1],) and (m > 0).all()
    assert refreshed == [True, False, False, True, False, False, True, False, False, True]
    assert safe.refreshes == 4 and safe.last_refresh == 9 and safe.generation == 10
    # 2 individuals x (2 inputs / task batch 8) x (1 forward + 4 projections x 2) per refresh
    assert safe.forward_equivalents == pytest.approx(4 * 2 * 2 / 8 * 9)
    # explicit generation numbers: due after `every`, and again after a restart
    assert not safe.due(11) and safe.due(12) and safe.due(5)
    safe.scale(values, 12)
    assert safe.refreshes == 5 and safe.last_refresh == 12


def test_population_scale_is_the_documented_pipeline():
    """(N,) = sensitivity_to_scale(RMS over num_individuals random rows), draws in the order
    rows, inputs, signs from the seeded generator; per_individual = one scale per row."""
    problem = small_problem()
    values = problem.init_population(5)
    safe = SafeMutationScale(problem, seed=3, num_individuals=2, batch_size=4, projections=2,
                             floor=0.05)
    got = safe.scale(values)
    g = torch.Generator().manual_seed(3)
    rows = torch.randperm(5, generator=g)[:2]
    x = problem.task.sample(4, g)[0]
    s = output_sensitivity(problem.config, values[rows], x, projections=2, generator=g)
    want = sensitivity_to_scale(s.square().mean(dim=0).sqrt(), floor=0.05)
    torch.testing.assert_close(got, want)

    per = SafeMutationScale(problem, seed=3, per_individual=True, every=1, batch_size=4,
                            method="sum")
    got = per.scale(values)
    g = torch.Generator().manual_seed(3)
    want = sensitivity_to_scale(output_sensitivity(
        problem.config, values, problem.task.sample(4, g)[0], method="sum"))
    assert got.shape == values.shape
    torch.testing.assert_close(got, want)
    per.every = 5
    with pytest.raises(ValueError, match="per-individual multipliers were measured on 5"):
        per.scale(values[:3])


def test_safe_scale_drives_gaussian_mutation_under_no_grad():
    problem = small_problem()
    parents = problem.init_population(4)
    safe = SafeMutationScale(problem, seed=0)
    mutation = GaussianMutation(problem, stdev=0.1)
    children = parents[torch.arange(400) % 4]
    with torch.no_grad():
        scale = safe.scale(parents, 0)
        mutated = mutation.mutate_values(children, scale=scale)
    z = (mutated - children) / (0.1 * scale)  # standard normal per gene
    assert abs(float(z.std()) - 1) < 0.02
    per_gene = z.std(dim=0)
    assert float(per_gene.min()) > 0.7 and float(per_gene.max()) < 1.3


def test_state_is_checkpointable_and_resumes_exactly(tmp_path):
    problem = small_problem()
    values = problem.init_population(6)
    safe = SafeMutationScale(problem, every=2, seed=1, num_individuals=3, batch_size=2)
    for _ in range(3):
        safe.scale(values)
    path = tmp_path / "safe.pt"
    torch.save(capture(safe), path)
    state = torch.load(path, weights_only=True)
    twin = SafeMutationScale(small_problem(), every=2, seed=99, num_individuals=3, batch_size=2)
    restore(twin, state)
    assert (twin.generation, twin.last_refresh, twin.refreshes) == (3, 2, 2)
    assert twin.forward_equivalents == safe.forward_equivalents > 0
    for _ in range(4):
        torch.testing.assert_close(twin.scale(values), safe.scale(values), rtol=0, atol=0)
    assert twin.refreshes == safe.refreshes == 4


# --------------------------------------------------------------------------- inputs of tasks


def test_cartpole_sensitivity_inputs_are_observation_windows():
    pytest.importorskip("gymnasium")
    from evotorch_mqa_moe.problems.cartpole import CartPoleTask, start_states

    task = CartPoleTask(window=5)
    x = task.sensitivity_inputs(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 5, 2) and x.dtype == torch.float32 and x.isfinite().all()
    assert torch.equal(x, task.sensitivity_inputs(64, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, task.sensitivity_inputs(64, torch.Generator().manual_seed(1)))
    # windows that end at the start repeat the first observation (the seeded start state)
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**31, (64,), generator=g, dtype=torch.int64)
    ends = torch.randint(0, 10, (64,), generator=g)
    first = torch.from_numpy(task.observe(start_states(seeds.tolist()))).float()
    at_start = ends == 0
    assert at_start.any()
    torch.testing.assert_close(x[at_start], first[at_start, None].expand(-1, 5, -1))
    # later windows move: consecutive observations differ
    assert (x[~at_start, -1] != x[~at_start, -2]).any(dim=-1).all()


def test_safe_scale_on_cartpole():
    pytest.importorskip("gymnasium")
    from evotorch_mqa_moe.problems.cartpole import CartPoleTask

    problem = TransformerProblem(CartPoleTask(episodes=1), seed=0)
    safe = SafeMutationScale(problem, seed=0)
    m = safe.scale(problem.init_population(8))
    assert m.shape == (problem.solution_length,) and m.isfinite().all() and (m > 0).all()
    torch.testing.assert_close(m.square().mean(), torch.tensor(1.0))


def test_sensitivity_inputs_of_a_task_without_inputs():
    class Blind:
        name = "blind"

    with pytest.raises(TypeError, match="blind.*sensitivity_inputs"):
        sensitivity_inputs(Blind(), 4, torch.Generator())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(every=0), "every must be a positive integer, got 0"),
    (dict(every=-3), "every must be a positive integer, got -3"),
    (dict(every=2.5), "every must be a positive integer, got 2.5"),
    (dict(method="rnd"), "method must be one of .*got 'rnd'"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(projections=0), "projections must be a positive integer, got 0"),
    (dict(num_individuals=0), "num_individuals must be a positive integer, got 0"),
    (dict(floor=0.0), r"floor must be a number in \(0, 1\], got 0.0"),
    (dict(per_individual=1), "per_individual must be a bool, got 1"),
    (dict(normalize="mean"), "normalize must be one of .*got 'mean'"),
    (dict(seed=-1), "seed must be a non-negative integer or None, got -1"),
])
def test_bad_settings_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SafeMutationScale(small_problem(), **kwargs)


def test_bad_calls_raise_naming_the_value():
    problem = small_problem()
    config, values = problem.config, problem.init_population(2)
    x = make_inputs(config, (2, 4))
    safe = SafeMutationScale(problem, seed=0)
    with pytest.raises(ValueError, match="generation must be a non-negative integer, got -1"):
        safe.scale(values, -1)
    with pytest.raises(ValueError, match=r"values must be a \(P, N\) tensor"):
        safe.scale(values[0])
    with pytest.raises(ValueError, match="method must be one of .*got 'max'"):
        output_sensitivity(config, values, x, method="max")
    with pytest.raises(ValueError, match="projections must be a positive integer, got 0"):
        output_sensitivity(config, values, x, projections=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        output_sensitivity(config, values, x, chunk_size=0)
    with pytest.raises(ValueError, match="values have 3 columns"):
        output_sensitivity(config, values[:, :3], x)
    with pytest.raises(ValueError, match="token id 7"):
        output_sensitivity(config, values, torch.full((2, 4), 7))
    with pytest.raises(ValueError, match="floor must be a number"):
        sensitivity_to_scale(torch.ones(3), floor=2)
    with pytest.raises(ValueError, match="non-negative"):
        sensitivity_to_scale(torch.tensor([1.0, -1.0]))
    with pytest.raises(TypeError, match="problem must be a TransformerProblem"):
        SafeMutationScale(object())
