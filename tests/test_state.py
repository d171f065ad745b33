"""Checkpoint state: weights_only-safe capture and exact restore for every searcher.

Every searcher in the registry is checked through the protocol (``state_dict`` /
``load_state_dict``); the EvoTorch adapter's underlying ``capture`` / ``restore``
are checked on the wrapped algorithms."""

import io

import pytest
import torch

from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import SEARCHERS, EvoTorchSearcher, make_searcher
from evotorch_mqa_moe.searchers.backprop import BackpropTrainer
from evotorch_mqa_moe.searchers.state import capture, restore
from evotorch_mqa_moe.workflow.settings import RunSettings


def build(name, seed=0):
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    return make_searcher(name, TransformerProblem(task, config, seed=seed), popsize=8)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # no pickled objects inside


EVOTORCH = [name for name in SEARCHERS if isinstance(build(name), EvoTorchSearcher)]


@pytest.mark.parametrize("name", list(SEARCHERS))
@pytest.mark.parametrize("stepped", [False, True], ids=["fresh", "stepped"])
def test_state_dict_resumes_exactly(name, stepped):
    """A rebuilt searcher, fresh or already stepped, continues exactly where the saved one was."""
    original = build(name)
    for _ in range(3):
        original.step()
    state = roundtrip(original.state_dict())
    rebuilt = build(name)
    if stepped:
        rebuilt.step()  # a different state, entirely overwritten by load_state_dict
    rebuilt.load_state_dict(state)
    assert rebuilt.evaluations == original.evaluations
    assert rebuilt.status["best_eval"] == original.status["best_eval"]
    for _ in range(2):
        original.step()
        rebuilt.step()
    assert torch.equal(original.current_solution(), rebuilt.current_solution())
    assert original.status["best_eval"] == rebuilt.status["best_eval"]
    assert original.status["pop_best_eval"] == rebuilt.status["pop_best_eval"]
    assert original.evaluations == rebuilt.evaluations
    if name in EVOTORCH:
        assert torch.equal(original.population.values, rebuilt.population.values)
        assert torch.equal(original.population.evals, rebuilt.population.evals)


@pytest.mark.parametrize("name", EVOTORCH)
def test_loading_into_a_fresh_searcher_spends_no_evaluation(name, monkeypatch):
    """EvoTorch's lazy state is created by a dry step whose fitness is not computed."""
    original = build(name)
    original.step()
    rebuilt = build(name)
    calls = []
    monkeypatch.setattr(type(rebuilt.problem.task), "fitness",
                        lambda *a, **k: calls.append(1), raising=True)
    rebuilt.load_state_dict(roundtrip(original.state_dict()))
    assert calls == []
    assert "_evaluate_batch" not in vars(rebuilt.problem)  # the method is back


@pytest.mark.parametrize("name", EVOTORCH)
def test_restored_algorithm_continues_exactly(name):
    """state.capture / restore on the bare EvoTorch algorithm (stepped once first)."""
    original = build(name).algorithm
    for _ in range(3):
        original.step()
    state = roundtrip(capture(original))
    rebuilt = build(name).algorithm
    rebuilt.step()  # creates what the searcher makes lazily; entirely overwritten by restore
    restore(rebuilt, state)
    for _ in range(2):
        original.step()
        rebuilt.step()
    assert torch.equal(original.population.values, rebuilt.population.values)
    assert torch.equal(original.population.evals, rebuilt.population.evals)


def test_restore_into_a_differently_built_searcher_fails_clearly():
    pgpe = build("pgpe")
    pgpe.step()
    ga = build("ga")
    with pytest.raises(ValueError, match="PGPE.*SeedGeneticAlgorithm"):
        ga.load_state_dict(roundtrip(pgpe.state_dict()))
    with pytest.raises(ValueError, match="EvoTorch searcher"):
        ga.load_state_dict(roundtrip(build("adam").state_dict()))
    with pytest.raises(ValueError, match="BackpropTrainer"):
        build("adam").load_state_dict(roundtrip(pgpe.state_dict()))


def test_backprop_trainer_state_roundtrip_and_validation():
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    a = BackpropTrainer(TransformerProblem(task, config, seed=1))
    for _ in range(3):
        a.step()
    b = BackpropTrainer(TransformerProblem(task, config, seed=1))
    b.load_state_dict(roundtrip(a.state_dict()))
    a.step()
    b.step()
    assert torch.equal(a.status["center"], b.status["center"])
    assert a.status["best_eval"] == b.status["best_eval"]
    with pytest.raises(ValueError, match="supervised"):
        BackpropTrainer(TransformerProblem(make_task("cartpole"), seed=0))
    with pytest.raises(ValueError, match="lr"):
        BackpropTrainer(TransformerProblem(task, config, seed=1), lr=0)


@pytest.mark.parametrize("epoch", [-1, "3", 2.5, True])
def test_backprop_trainer_resumes_its_data_epoch_through_the_public_property(epoch):
    # issue 12: backprop.py wrote problem._data_epoch directly, so a bad epoch in a
    # state_dict was taken silently; the public setter names it, before anything loads
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    a = BackpropTrainer(TransformerProblem(task, config, seed=1))
    a.step()
    state = roundtrip(a.state_dict())
    assert state["data_epoch"] == a.problem.data_epoch == 1
    b = BackpropTrainer(TransformerProblem(task, config, seed=1))
    before = b.current_solution().clone()
    with pytest.raises(ValueError, match=f"data_epoch must be a non-negative integer, "
                                         f"got {epoch!r}"):
        b.load_state_dict({**state, "data_epoch": epoch})
    assert torch.equal(b.current_solution(), before) and b.problem.data_epoch == 0
    b.load_state_dict(state)
    assert b.problem.data_epoch == 1


@pytest.mark.parametrize(
    "changes,match",
    [({"searcher": "sgd"}, "unknown searcher 'sgd'"), ({"generations": 0}, "generations"),
     ({"generations": None}, "give a limit"), ({"seed": -1}, "seed"),
     ({"eval_every": 0}, "eval_every"), ({"max_evaluations": 2.5}, "max_evaluations"),
     ({"max_seconds": 0}, "max_seconds must be a positive number or None, got 0"),
     ({"max_seconds": float("inf")}, "max_seconds.*inf"),
     ({"max_seconds": float("nan")}, "max_seconds.*nan"),
     ({"max_seconds": "1"}, "max_seconds"), ({"generations": True}, "generations")],
)
def test_run_settings_reject_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        RunSettings(**{"task": "reverse", "generations": 5, **changes})


@pytest.mark.parametrize("limit", [{"generations": 3}, {"max_evaluations": 10},
                                   {"max_seconds": 2.5}])
def test_run_settings_any_one_limit_is_enough(limit):
    settings = RunSettings(task="reverse", **limit)
    unset = {"generations", "max_evaluations", "max_seconds"} - set(limit)
    assert all(getattr(settings, name) is None for name in unset)  # no hidden default
