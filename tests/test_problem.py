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
    gen = problem.data_generator(problem.last_data_epoch)
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


# --------------------------------------------------------------------------- config vs task


def test_config_that_cannot_serve_the_task_is_refused_naming_both_numbers():
    reverse = make_task("reverse")  # tokens 0..7
    small_vocab = reverse.default_config().replace(vocab_size=5)
    with pytest.raises(ValueError, match=r"vocab_size=5 is smaller than the vocab_size=8"):
        TransformerProblem(reverse, small_vocab)
    addition = make_task("addition")  # 13 input tokens, 10 output classes
    with pytest.raises(ValueError, match=r"output_dim=9 is smaller than the output_dim=10"):
        TransformerProblem(addition, addition.default_config().replace(output_dim=9))
    cartpole = make_task("cartpole")  # observation vectors
    with pytest.raises(ValueError, match=r"takes vectors"):
        TransformerProblem(cartpole, reverse.default_config())
    width = cartpole.default_config().input_dim
    with pytest.raises(ValueError, match=rf"input_dim={width + 1} differs from .*={width}"):
        TransformerProblem(cartpole, cartpole.default_config().replace(input_dim=width + 1))
    # a larger vocabulary (or head) than the task needs is fine
    TransformerProblem(reverse, reverse.default_config().replace(vocab_size=11))


# --------------------------------------------------------------------------- EvoTorch interplay


def test_metrics_and_population_model_take_solutions_batches_and_tensors(problem):
    batch = problem.generate_batch(3)
    values = batch.values.as_subclass(torch.Tensor).clone()
    key = problem.task.target_metric
    many = problem.metrics(values)[key]
    assert problem.metrics(batch)[key] == many
    assert problem.metrics(batch[1:3])[key] == many[1:3]
    assert problem.metrics(batch[1])[key] == many[1]  # a Solution
    assert problem.metrics(values[2].tolist())[key] == many[2]
    assert problem.metrics(values[2].double().numpy())[key] == many[2]
    assert problem.population_model(batch[0]).popsize == 1
    assert torch.equal(problem.population_model(batch).params, values)
    with pytest.raises(TypeError, match="Solution"):
        problem.metrics("best")
    with pytest.raises(ValueError, match=r"\(N,\) or \(P, N\)"):
        problem.metrics(values.unsqueeze(0))


@pytest.mark.parametrize("algorithm", ["GeneticAlgorithm", "Cosyne"])
def test_metrics_of_a_searchers_pop_best(algorithm):
    import evotorch.algorithms as algorithms
    from evotorch.operators import GaussianMutation as EvoGaussianMutation

    p = tiny_problem(seed=5)
    if algorithm == "Cosyne":
        searcher = algorithms.Cosyne(p, popsize=6, tournament_size=2, mutation_stdev=0.05)
    else:
        searcher = algorithms.GeneticAlgorithm(p, popsize=6,
                                               operators=[EvoGaussianMutation(p, stdev=0.05)])
    searcher.step()
    best = searcher.status["pop_best"]
    metrics = p.metrics(best)
    assert isinstance(metrics[p.task.target_metric], float)
    assert metrics == p.metrics(best.values.as_subclass(torch.Tensor).clone())


def test_data_epoch_is_a_public_property():
    p = tiny_problem(seed=6)
    assert p.data_epoch == 0 and p.last_data_epoch is None
    p.data_epoch = 5
    assert p._data_epoch == 5  # the old name stays in step (deprecated)
    batch = p.generate_batch(3)
    p.evaluate(batch)
    assert p.last_data_epoch == 5 and p.data_epoch == 6
    inputs, targets = p.task.sample(p.task.batch_size, p.data_generator(5))
    with torch.no_grad():
        expected = -p.task.loss(p.population_model(batch)(inputs), targets)
    assert torch.allclose(batch.evals[:, 0], expected, atol=1e-6)
    p._data_epoch = 9  # code that still sets the old attribute
    assert p.data_epoch == 9
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="data_epoch"):
            p.data_epoch = bad
    p.data_refresh = "never"
    p.evaluate(batch)
    assert p.last_data_epoch == 0


def test_data_root_is_a_public_property_that_selects_the_stream():
    # a problem given another problem's data_root draws that problem's batches
    a, b = tiny_problem(seed=1), tiny_problem(seed=2)
    assert a.data_root != b.data_root
    b.data_root = a.data_root
    xa, _ = a.task.sample(4, a.data_generator(3))
    xb, _ = b.task.sample(4, b.data_generator(3))
    assert torch.equal(xa, xb)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="data_root"):
            b.data_root = bad


class ConstantFitnessTask:
    """Fitness = mean output, computed without reading anything back to the host."""

    name, target_metric = "constant", "mean"

    def default_config(self):
        return make_task("reverse").default_config().replace(embed_dim=8, num_heads=2,
                                                             expert_dim=8)

    def fitness(self, model, generator):
        inputs = torch.randint(0, 8, (4, 8), generator=generator)
        return model(inputs.to(model.device)).mean(dim=(1, 2, 3))

    def metrics(self, model):
        return {"mean": self.fitness(model, torch.Generator().manual_seed(0))}


def test_an_evaluation_reads_back_only_after_its_pass():
    # Two read-backs, both after the pass is queued: the token range (model) and the
    # count of non-finite fitness values (for the warning); none per chunk.
    from test_model import HOST_READS, _Calls

    p = TransformerProblem(ConstantFitnessTask(), seed=0, chunk_size=1)
    batch = p.generate_batch(4)
    p.evaluate(batch)  # the first evaluation prepares the problem
    with _Calls() as calls:
        p._evaluate_batch(batch)
    reads = [i for i, name in enumerate(calls.names) if name in HOST_READS]
    gemms = [i for i, name in enumerate(calls.names) if name in ("baddbmm", "matmul", "bmm")]
    assert len(reads) == 2 and reads[0] > gemms[-1], [calls.names[i] for i in reads]


def test_mapelites_is_refused_with_a_clear_error(problem):
    from evotorch.algorithms import MAPElites
    from evotorch.operators import GaussianMutation as EvoGaussianMutation

    grid = MAPElites.make_feature_grid(torch.zeros(2), torch.ones(2), num_bins=2)
    with pytest.raises(ValueError, match=r"MAPElites needs 2 behaviour descriptors.*"
                                         r"eval_data_length=0"):
        MAPElites(problem, operators=[EvoGaussianMutation(problem, stdev=0.1)],
                  feature_grid=grid)
    problem.generate_batch(2)  # other callers are unaffected


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["GeneticAlgorithm", "PGPE"])
def test_same_seed_same_search_with_and_without_ray_actors(algorithm):
    # EvoTorch draws the actors' seeds from the problem's generator; that draw
    # shifted every later mutation / sample against a run without actors.
    from evotorch.algorithms import PGPE, GeneticAlgorithm
    from evotorch.operators import GaussianMutation as EvoGaussianMutation

    def search(num_actors):
        p = tiny_problem(seed=11, num_actors=num_actors)
        try:
            if algorithm == "PGPE":
                s = PGPE(p, popsize=8, center_learning_rate=0.1, stdev_learning_rate=0.1,
                         stdev_init=0.05, center_init=p.init_center())
            else:
                s = GeneticAlgorithm(p, popsize=8,
                                     operators=[EvoGaussianMutation(p, stdev=0.05)])
            for _ in range(3):
                s.step()
            return s.population.values.clone(), s.population.evals.clone()
        finally:
            if num_actors:
                p.kill_actors()

    local, remote = search(0), search(2)
    assert torch.equal(local[0], remote[0])
    assert torch.allclose(local[1], remote[1], atol=1e-6)
