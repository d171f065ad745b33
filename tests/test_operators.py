"""The EvoTorch operator classes: contracts, seeding, bounds, use inside GeneticAlgorithm."""

import pytest
import torch
from evotorch import Problem, SolutionBatch
from evotorch.algorithms import GeneticAlgorithm

from evotorch_mqa_moe.evolution.ga import seed_genetic_algorithm
from evotorch_mqa_moe.evolution.operators import GaussianMutation, UniformCrossOver
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task


def sphere(x: torch.Tensor) -> torch.Tensor:
    return (x**2).sum(-1)


def make_problem(sense="min", seed=0, n=12, **kwargs):
    kwargs.setdefault("initial_bounds", (-2.0, 2.0))
    return Problem(sense, sphere, solution_length=n, vectorized=True, seed=seed, **kwargs)


def evaluated_batch(problem, popsize=20):
    batch = problem.generate_batch(popsize)
    problem.evaluate(batch)
    return batch


@pytest.mark.parametrize("selection", [dict(tournament_size=3), dict(truncation_fraction=0.5)])
def test_cross_over_children_mix_parent_rows(selection):
    problem = make_problem()
    batch = evaluated_batch(problem)
    before = batch.values.clone()
    op = UniformCrossOver(problem, num_children=7, **selection)
    children = op(batch)
    assert isinstance(children, SolutionBatch) and len(children) == 7
    idx1, idx2 = op.last_parent_indices
    assert idx1.shape == idx2.shape == (4,)
    vals = children.values
    pairs = torch.cat([torch.arange(4), torch.arange(4)])[:7]
    p1, p2 = before[idx1[pairs]], before[idx2[pairs]]
    assert torch.all((vals == p1) | (vals == p2))
    assert torch.equal(batch.values, before)  # input untouched
    assert torch.isnan(children.evals).all()


def test_truncation_cross_over_uses_only_the_top_fraction():
    problem = make_problem("max")
    batch = evaluated_batch(problem, popsize=40)
    op = UniformCrossOver(problem, truncation_fraction=0.25)
    op(batch)
    top = set(torch.argsort(batch.evals[:, 0], descending=True)[:10].tolist())
    assert set(op.last_parent_indices[0].tolist()) | set(op.last_parent_indices[1].tolist()) <= top


def test_cross_over_default_child_count_matches_evotorch():
    problem = make_problem()
    assert len(UniformCrossOver(problem, tournament_size=2)(evaluated_batch(problem, 21))) == 22


def test_operators_repeat_with_the_problem_seed():
    def run(seed):
        problem = make_problem(seed=seed)
        batch = evaluated_batch(problem)
        children = UniformCrossOver(problem, truncation_fraction=0.5)(batch)
        return GaussianMutation(problem, stdev=0.1, mutation_probability=0.3)(children).values

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_mutation_respects_bounds_and_leaves_input():
    problem = make_problem(bounds=(-1.0, 1.0), initial_bounds=None)
    batch = problem.generate_batch(30)
    before = batch.values.clone()
    out = GaussianMutation(problem, stdev=5.0)(batch)
    assert torch.equal(batch.values, before)
    assert out.values.min() >= -1.0 and out.values.max() <= 1.0
    assert (out.values != before).float().mean() > 0.9


def test_mutation_per_gene_stdev_and_scale():
    problem = make_problem(n=4)
    batch = problem.generate_batch(10)
    stdev = torch.tensor([0.0, 0.0, 1.0, 1.0])
    out = GaussianMutation(problem, stdev=stdev)(batch).values
    assert torch.equal(out[:, :2], batch.values[:, :2]) and torch.all(
        out[:, 2:] != batch.values[:, 2:]
    )
    op = GaussianMutation(problem, stdev=1.0)
    scale = torch.zeros(10, 1)
    scale[0] = 1.0
    out = op.mutate_values(batch.values.clone(), scale=scale)
    assert torch.equal(out[1:], batch.values[1:]) and torch.all(out[0] != batch.values[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one"),
        (dict(tournament_size=2, truncation_fraction=0.5), "exactly one"),
        (dict(tournament_size=0), "tournament_size"),
        (dict(truncation_fraction=0.0), "truncation_fraction"),
        (dict(truncation_fraction=1.5), "truncation_fraction"),
        (dict(tournament_size=2, swap_probability=2.0), "swap_probability"),
        (dict(tournament_size=2, num_children=0), "num_children"),
    ],
)
def test_cross_over_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniformCrossOver(make_problem(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stdev=-0.1), "stdev"),
        (dict(stdev=0.1, mutation_probability=-1), "mutation_probability"),
        (dict(stdev=torch.ones(5)), "solution length"),
    ],
)
def test_mutation_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMutation(make_problem(), **kwargs)


@pytest.mark.parametrize("sense", ["min", "max"])
@pytest.mark.parametrize("selection", [dict(tournament_size=3), dict(truncation_fraction=0.3)])
def test_inside_evotorch_genetic_algorithm_elitism_keeps_the_best(sense, selection):
    problem = Problem(
        sense,
        sphere if sense == "min" else (lambda x: -sphere(x)),
        solution_length=10,
        initial_bounds=(-2.0, 2.0),
        vectorized=True,
        seed=3,
    )
    ga = GeneticAlgorithm(
        problem,
        popsize=30,
        operators=[
            UniformCrossOver(problem, **selection),
            GaussianMutation(problem, stdev=0.2, mutation_probability=0.2),
        ],
    )
    sign = 1.0 if sense == "max" else -1.0
    history = []
    for _ in range(15):
        ga.step()
        history.append(sign * float(ga.status["pop_best_eval"]))
    assert all(b >= a for a, b in zip(history, history[1:], strict=False))
    assert history[-1] > history[0]


# --------------------------------------------------------------------------- group cross-over


def tiny_transformer_problem(seed=0):
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    return TransformerProblem(task, config, seed=seed)


@pytest.mark.parametrize("level", ["row", "head", "expert", "tensor", "layer"])
def test_group_cross_over_operator_swaps_whole_groups(level):
    problem = tiny_transformer_problem()
    batch = evaluated_batch(problem, popsize=12)
    before = batch.values.clone()
    op = UniformCrossOver(problem, truncation_fraction=0.5, granularity=level)
    assert op.granularity == level
    children = op(batch).values
    idx1, idx2 = op.last_parent_indices
    half = len(idx1)
    p1, p2 = before[idx1], before[idx2]
    c1, c2 = children[:half], children[half:]
    from2 = (c1 == p2) & (p1 != p2)
    assert torch.all((c1 == p1) | (c1 == p2))
    assert torch.all(torch.where(from2, c2 == p1, c2 == p2))  # complements
    ids = problem.gene_groups(level)
    count = int(ids.max()) + 1
    # a group is whole when, per child, all its genes that differ between the parents
    # come from the same parent
    differ = (p1 != p2).float()
    taken = torch.zeros(half, count).index_add_(1, ids, from2.float())
    differs = torch.zeros(half, count).index_add_(1, ids, differ)
    assert torch.all((taken == 0) | (taken == differs))
    assert torch.equal(batch.values, before)


def test_group_cross_over_operator_default_is_per_gene():
    def children(**kwargs):
        problem = tiny_transformer_problem(seed=4)
        op = UniformCrossOver(problem, tournament_size=3, **kwargs)
        return op(evaluated_batch(problem, popsize=10)).values

    assert torch.equal(children(), children(granularity="parameter"))
    assert not torch.equal(children(), children(granularity="row"))


def test_group_cross_over_operator_repeats_with_the_problem_seed():
    def run(seed):
        problem = tiny_transformer_problem(seed=seed)
        op = UniformCrossOver(problem, truncation_fraction=0.5, granularity="head")
        return op(evaluated_batch(problem, popsize=10)).values

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_seed_genetic_algorithm_granularity_reaches_the_cross_over():
    problem = tiny_transformer_problem()
    ga = seed_genetic_algorithm(problem, popsize=10, granularity="expert")
    assert ga._cross_over.granularity == "expert"
    ga.step()
    assert len(ga.population) == 10
    with pytest.raises(ValueError, match="'neuron'.*parameter.*layer"):
        seed_genetic_algorithm(problem, popsize=10, granularity="neuron")


@pytest.mark.parametrize("granularity", ["neuron", "Row", None])
def test_group_cross_over_operator_rejects_unknown_granularity(granularity):
    with pytest.raises(ValueError, match="granularity.*choose from"):
        UniformCrossOver(tiny_transformer_problem(), tournament_size=2, granularity=granularity)


def test_group_cross_over_operator_needs_gene_groups():
    with pytest.raises(ValueError, match="gene_groups.*Problem"):
        UniformCrossOver(make_problem(), tournament_size=2, granularity="row")
