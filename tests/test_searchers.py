"""The searcher registry and protocol: every registered searcher, parametrised over the registry
(so a new registration is tested automatically). Exact resume of every searcher through
``state_dict`` / ``load_state_dict`` is in tests/test_state.py."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import (
    SEARCHERS,
    EvoTorchSearcher,
    Searcher,
    SearcherSpec,
    get_spec,
    make_searcher,
    register,
)

NAMES = list(SEARCHERS)
GRADIENT = [name for name, spec in SEARCHERS.items() if spec.needs_gradient]


def tiny_problem(task: str = "reverse", seed: int = 0) -> TransformerProblem:
    t = make_task(task)
    return TransformerProblem(t, t.default_config().replace(embed_dim=8, num_heads=2,
                                                            expert_dim=8), seed=seed)


def popsize_for(spec: SearcherSpec) -> int:
    return max(spec.min_popsize, 8)


@pytest.mark.parametrize("name", NAMES)
def test_every_searcher_follows_the_protocol(name):
    spec = SEARCHERS[name]
    problem = tiny_problem()
    searcher = make_searcher(name, problem, popsize=popsize_for(spec))
    assert isinstance(searcher, Searcher)
    assert searcher.problem is problem and searcher.evaluations == 0
    costs = []
    for step in (1, 2):
        before = searcher.evaluations
        searcher.step()
        status = searcher.status
        assert status["iter"] == step
        for key in ("best_eval", "pop_best_eval", "mean_eval"):
            assert math.isfinite(float(status[key])), key
        assert float(status["best_eval"]) >= float(status["pop_best_eval"])
        costs.append(searcher.evaluations - before)
    assert all(c > 0 for c in costs)
    solution = searcher.current_solution()
    assert solution.shape == (problem.solution_length,) and torch.isfinite(solution).all()
    assert set(problem.metrics(solution)) >= {problem.task.target_metric}


@pytest.mark.parametrize("name", NAMES)
def test_best_eval_is_the_best_so_far(name):
    """best_eval is the running maximum of every step's pop_best_eval (adam included)."""
    spec = SEARCHERS[name]
    searcher = make_searcher(name, tiny_problem(seed=3), popsize=popsize_for(spec))
    pop_best, best = [], []
    for _ in range(6):
        searcher.step()
        pop_best.append(float(searcher.status["pop_best_eval"]))
        best.append(float(searcher.status["best_eval"]))
    running = [max(pop_best[: i + 1]) for i in range(len(pop_best))]
    assert best == running
    assert all(b >= a for a, b in zip(best, best[1:], strict=False))


def test_adam_best_eval_is_not_the_current_loss():
    """With a learning rate far too high the loss goes up: best_eval must not follow it."""
    searcher = make_searcher("adam", tiny_problem(seed=1), lr=1.0)
    fitness, best = [], []
    for _ in range(8):
        searcher.step()
        fitness.append(searcher.status["pop_best_eval"])
        best.append(searcher.status["best_eval"])
    assert any(f < b for f, b in zip(fitness, best, strict=True))  # some step was worse
    assert best == [max(fitness[: i + 1]) for i in range(len(fitness))]


def test_evaluations_are_forward_equivalents():
    pgpe = make_searcher("pgpe", tiny_problem(), popsize=8)
    for _ in range(3):
        pgpe.step()
    assert pgpe.evaluations == 3 * 8  # one forward per individual per generation
    adam = make_searcher("adam", tiny_problem())
    for _ in range(3):
        adam.step()
    assert adam.evaluations == 3 * 3  # forward 1 + backward 2 per step
    task_batch = adam.problem.task.batch_size
    big = make_searcher("adam", tiny_problem(), batch_size=2 * task_batch)
    big.step()
    assert big.evaluations == 6  # a batch twice the task's costs twice as much


@pytest.mark.parametrize("name", NAMES)
def test_min_popsize_enforced(name):
    spec = SEARCHERS[name]
    too_small = spec.min_popsize - 1
    with pytest.raises(ValueError, match=rf"{name} must be (an integer >= {spec.min_popsize}|"
                                         r"a positive integer), "
                                         rf"got {too_small}"):
        make_searcher(name, tiny_problem(), popsize=too_small)
    with pytest.raises(ValueError, match="got 2.5"):
        make_searcher(name, tiny_problem(), popsize=2.5)


@pytest.mark.parametrize("name", GRADIENT)
def test_gradient_searchers_refuse_cartpole_with_one_clear_error(name):
    problem = TransformerProblem(make_task("cartpole"), seed=0)
    with pytest.raises(ValueError, match=rf"^{name} needs a supervised task \(sample \+ loss\) "
                                         r"for its gradients; 'cartpole' is not one$"):
        make_searcher(name, problem)


def test_gradient_flag():
    assert SEARCHERS["adam"].needs_gradient
    assert not any(SEARCHERS[n].needs_gradient for n in ("ga", "pgpe", "cmaes", "snes"))


@pytest.mark.parametrize("name", NAMES)
def test_search_space_values_are_accepted(name):
    """Every search-space entry is a builder option, at both ends of its range."""
    spec = SEARCHERS[name]
    assert spec.search_space, name
    for end in (0, 1):
        values = {}
        for key, entry in spec.search_space.items():
            kind = entry[0]
            if kind == "cat":
                values[key] = entry[1][-end]
            else:
                value = entry[1 + end]
                values[key] = int(value) if kind == "int" else float(value)
        values.pop("popsize", None)  # its ends would be slow to test; 16 > any num_elites
        popsize = max(spec.min_popsize, 16)
        stdev = values.pop("stdev", 0.05)
        searcher = make_searcher(name, tiny_problem(), popsize=popsize, stdev=stdev, **values)
        if end == 0:
            searcher.step()
            assert math.isfinite(float(searcher.status["pop_best_eval"]))


@pytest.mark.parametrize("name", NAMES)
def test_search_space_is_declarative(name):
    for key, entry in SEARCHERS[name].search_space.items():
        assert entry[0] in ("log", "float", "int", "cat"), key
        if entry[0] == "log":
            assert 0 < entry[1] < entry[2], key
    assert "popsize" not in SEARCHERS[name].search_space or (
        SEARCHERS[name].search_space["popsize"][1] >= SEARCHERS[name].min_popsize)


def test_ga_and_es_search_spaces_cover_the_named_options():
    assert set(SEARCHERS["ga"].search_space) >= {"stdev", "mutation_probability",
                                                  "truncation_fraction", "num_elites", "popsize"}
    assert set(SEARCHERS["pgpe"].search_space) >= {"stdev", "center_learning_rate",
                                                    "stdev_learning_rate"}
    assert SEARCHERS["pgpe"].search_space["center_learning_rate"][0] == "log"
    for name in ("snes", "cmaes"):
        assert SEARCHERS[name].search_space["stdev"][0] == "log"
    assert SEARCHERS["adam"].search_space == {"lr": ("log", 1e-4, 3e-2)}


def test_make_searcher_rejects_bad_arguments():
    problem = tiny_problem()
    with pytest.raises(ValueError, match="unknown searcher 'nope'; known: ga, "):
        make_searcher("nope", problem)
    with pytest.raises(ValueError, match=r"stdev must be a number in \(0, 1000\], got -1.0"):
        make_searcher("pgpe", problem, stdev=-1.0)
    with pytest.raises(ValueError, match="stdev.*nan"):
        make_searcher("pgpe", problem, stdev=float("nan"))
    with pytest.raises(TypeError, match="lr"):
        make_searcher("pgpe", problem, lr=0.1)  # an option pgpe does not have
    with pytest.raises(ValueError, match="lr must be a positive number, got 0"):
        make_searcher("adam", problem, lr=0)


def test_adapter_forwards_to_the_algorithm_and_pickles():
    searcher = make_searcher("pgpe", tiny_problem(seed=7), popsize=8)
    assert isinstance(searcher, EvoTorchSearcher)
    assert type(searcher.algorithm).__name__ == "PGPE"
    searcher.step()
    assert searcher.population is searcher.algorithm.population  # forwarded read
    with pytest.raises(AttributeError):
        searcher.no_such_attribute  # noqa: B018
    clone = pickle.loads(pickle.dumps(searcher))
    searcher.step()
    clone.step()
    assert torch.equal(searcher.current_solution(), clone.current_solution())
    assert clone.status["best_eval"] == searcher.status["best_eval"]


def test_register_a_new_searcher(monkeypatch):
    """One spec is all a new searcher needs; it is then buildable and listed."""
    import evotorch_mqa_moe.searchers.registry as searchers_module

    monkeypatch.setattr(searchers_module, "_REGISTRY", dict(searchers_module._REGISTRY))
    monkeypatch.setattr(searchers_module, "SEARCHERS", searchers_module._REGISTRY)
    pgpe = get_spec("pgpe")

    def build(problem, *, popsize, stdev, **options):
        return pgpe.build(problem, popsize=popsize, stdev=stdev, center_learning_rate=0.05,
                          **options)

    spec = SearcherSpec("slow-pgpe", "PGPE with a small step", build, default_popsize=10,
                        min_popsize=6, search_space={"stdev": ("log", 0.01, 0.1)})
    register(spec)
    assert searchers_module.get_spec("slow-pgpe") is spec
    searcher = searchers_module.make_searcher("slow-pgpe", tiny_problem())
    assert searcher.popsize == 10 and searcher.algorithm._center_learning_rate == 0.05
    with pytest.raises(ValueError, match=">= 6, got 4"):
        searchers_module.make_searcher("slow-pgpe", tiny_problem(), popsize=4)
    with pytest.raises(ValueError, match="'slow-pgpe' is already registered"):
        register(spec)
    register(spec, replace=True)
    with pytest.raises(TypeError, match="SearcherSpec"):
        register({"name": "x"})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": ""}, "name"),
    ({"default_popsize": 2, "min_popsize": 4}, "default_popsize 2 .* below .* 4"),
    ({"min_popsize": 0}, "min_popsize .* got 0"),
    ({"search_space": {"stdev": ("log", 0.0, 1.0)}}, "low > 0"),
    ({"search_space": {"stdev": ("uniform", 0.1, 1.0)}}, "one of"),
    ({"search_space": {"k": ("int", 5, 1)}}, "low < high"),
    ({"search_space": {"mode": ("cat", [])}}, "cat"),
    ({"default_stdev": 0.0}, "default_stdev .* got 0.0"),
    ({"default_stdev": float("inf")}, "default_stdev .* got inf"),
])
def test_spec_validation(kwargs, match):
    base = {"name": "x", "description": "d", "build": lambda *a, **k: None, "default_popsize": 8,
            "min_popsize": 4}
    with pytest.raises(ValueError, match=match):
        SearcherSpec(**{**base, **kwargs})
