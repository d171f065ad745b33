"""TransformerProblem: vectorised evaluation, searchers, Ray, pickling, NaN fitness."""

import math
import pickle

import pytest
import torch
from loguru import logger

from evotorch_mqa_moe import MQAMoETransformer, num_parameters, population_forward
from evotorch_mqa_moe.problem import TransformerProblem, worst_for_nonfinite
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import SEARCHERS, make_searcher


def tiny_problem(seed=0, **kw):
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    return TransformerProblem(task, config, seed=seed, **kw)


@pytest.fixture(scope="module")
def problem():
    return tiny_problem()


def test_solution_length_and_initial_population_are_real_networks(problem):
    assert problem.solution_length == num_parameters(problem.config)
    batch = problem.generate_batch(6)
    values = batch.values.as_subclass(torch.Tensor)
    # Independently initialised networks, not EvoTorch's +-1e-5 default
    assert values.abs().max() > 0.1
    assert not torch.equal(values[0], values[1])
    net = problem.make_net(values[0])
    assert torch.all(net.layers[0].norm1.weight == 1)


def test_make_net_is_exactly_the_evaluated_individual(problem):
    values = problem.generate_batch(5).values.as_subclass(torch.Tensor)
    inputs, _ = problem.task.sample(8, torch.Generator().manual_seed(0))
    out = population_forward(problem.config, values, inputs)
    for i in range(5):
        net = problem.make_net(values[i])
        assert isinstance(net, MQAMoETransformer)
        with torch.no_grad():
            assert torch.allclose(net(inputs), out[i], atol=1e-5)


def test_evaluation_matches_one_network_at_a_time(problem):
    batch = problem.generate_batch(4)
    problem.evaluate(batch)
    gen = problem.data_generator(problem._data_seed)
    inputs, targets = problem.task.sample(problem.task.batch_size, gen)
    for i in range(4):
        net = problem.make_net(batch[i].values)
        with torch.no_grad():
            expected = -problem.task.loss(net(inputs).unsqueeze(0), targets)
        assert float(batch.evals[i, 0]) == pytest.approx(float(expected), abs=1e-5)


def test_common_random_numbers_and_fresh_data():
    p = tiny_problem(seed=3)
    batch = p.generate_batch(3)
    twice = batch.clone()
    p.evaluate(batch)
    first = batch.evals.clone()
    p.evaluate(twice)  # data_refresh="evaluation": a fresh batch
    assert not torch.equal(first, twice.evals)
    # Same individual duplicated -> identical fitness within one evaluation
    dup = p.generate_batch(2)
    dup.access_values()[1] = dup.values[0]
    p.evaluate(dup)
    assert float(dup.evals[0, 0]) == float(dup.evals[1, 0])


def test_generation_mode_shares_one_batch_per_step():
    p = tiny_problem(seed=3)
    p.data_refresh = "generation"
    batch = p.generate_batch(3)
    again = batch.clone()
    p.evaluate(batch)
    p.evaluate(again)
    assert torch.equal(batch.evals, again.evals)
    p.next_generation()
    p.evaluate(again)
    assert not torch.equal(batch.evals, again.evals)


def test_nan_individual_gets_worst_fitness_and_others_are_unchanged():
    p = tiny_problem(seed=4)
    p.data_refresh = "never"
    batch = p.generate_batch(5)
    clean = batch.clone()
    p.evaluate(clean)
    batch.access_values()[2] = float("nan")
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        p.evaluate(batch)
    finally:
        logger.remove(sink)
    evals = batch.evals[:, 0]
    assert torch.isfinite(evals).all()
    assert evals.argmin() == 2 and (evals[2] < evals[[0, 1, 3, 4]]).all()
    keep = [0, 1, 3, 4]
    assert torch.equal(evals[keep], clean.evals[keep, 0])
    assert len(messages) == 1 and "1 of 5" in messages[0]


def test_worst_for_nonfinite():
    f, bad = worst_for_nonfinite(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    assert bad == 2 and f[1] == f[3] == -2.0 and f[0] == 1.0
    f, bad = worst_for_nonfinite(torch.tensor([float("nan")] * 2))
    assert bad == 2 and torch.isfinite(f).all()


@pytest.mark.parametrize("name", list(SEARCHERS))
def test_every_searcher_runs_two_generations(name):
    p = tiny_problem(seed=1)
    searcher = make_searcher(name, p, popsize=8)
    searcher.step()
    searcher.step()
    for key in ("best_eval", "mean_eval"):
        assert math.isfinite(float(searcher.status[key])), key


def test_cmaes_is_separable_above_threshold():
    p = tiny_problem()
    assert make_searcher("cmaes", p, popsize=8).separable is False
    big_task = make_task("reverse")
    big = TransformerProblem(big_task, big_task.default_config(), seed=0)
    assert big.solution_length > 2000
    assert make_searcher("cmaes", big, popsize=8).separable is True
    with pytest.raises(ValueError, match="xnes"):
        make_searcher("xnes", big, popsize=8)


def test_searcher_factory_rejects_bad_arguments(problem):
    with pytest.raises(ValueError, match="unknown searcher 'nope'"):
        make_searcher("nope", problem)
    with pytest.raises(ValueError, match="popsize"):
        make_searcher("pgpe", problem, popsize=2)
    with pytest.raises(ValueError, match="stdev"):
        make_searcher("pgpe", problem, stdev=-1.0)


@pytest.mark.parametrize("name", ["ga", "pgpe", "cmaes"])
def test_pickled_searcher_resumes_identically(name):
    p = tiny_problem(seed=7)
    searcher = make_searcher(name, p, popsize=8)
    searcher.step()
    clone = pickle.loads(pickle.dumps(searcher))
    searcher.step()
    clone.step()
    assert torch.equal(searcher.population.values, clone.population.values)
    assert torch.equal(searcher.population.evals, clone.population.evals)
    # EvoTorch 0.6.1's NEProblem cannot rebuild its network after unpickling; ours can
    assert isinstance(clone.problem.make_net(clone.population[0].values), MQAMoETransformer)


def test_problem_rejects_bad_arguments():
    task = make_task("reverse")
    with pytest.raises(TypeError, match="Task protocol"):
        TransformerProblem(object())
    with pytest.raises(TypeError, match="TransformerConfig"):
        TransformerProblem(task, {"embed_dim": 8})
    with pytest.raises(ValueError, match="data_refresh"):
        TransformerProblem(task, data_refresh="sometimes")
    with pytest.raises(ValueError, match="seed"):
        TransformerProblem(task, seed=-1)
    p = TransformerProblem(task)
    with pytest.raises(ValueError, match="expected"):
        p.population_model(torch.zeros(2, 3))


def test_metrics_of_one_and_many(problem):
    values = problem.generate_batch(3).values.as_subclass(torch.Tensor)
    one = problem.metrics(values[0])
    many = problem.metrics(values)
    assert set(one) == set(many) and problem.task.target_metric in one
    assert one[problem.task.target_metric] == many[problem.task.target_metric][0]


@pytest.mark.slow
def test_ray_actors_with_seed_give_the_same_fitness():
    local = tiny_problem(seed=11)
    remote = tiny_problem(seed=11, num_actors=2)
    try:
        batch = local.generate_batch(6)
        copy = batch.clone()
        local.evaluate(batch)
        remote.evaluate(copy)
        assert torch.allclose(batch.evals, copy.evals, atol=1e-6)
        # and a searcher runs over the actors
        searcher = make_searcher("pgpe", remote, popsize=8)
        searcher.step()
        assert math.isfinite(float(searcher.status["best_eval"]))
    finally:
        remote.kill_actors()


def test_stock_genetic_algorithm_with_our_operators():
    from evotorch.algorithms import GeneticAlgorithm

    from evotorch_mqa_moe import GaussianMutation, UniformCrossOver

    p = tiny_problem(seed=2)
    ga = GeneticAlgorithm(p, popsize=8, elitist=True, re_evaluate=True, operators=[
        UniformCrossOver(p, tournament_size=2),
        GaussianMutation(p, stdev=0.05, mutation_probability=0.1)])
    p.refresh_data_each_step(ga)
    best = []
    for _ in range(3):
        ga.step()
        best.append(float(ga.status["pop_best_eval"]))
    assert all(math.isfinite(b) for b in best)
