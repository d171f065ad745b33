"""Checkpoint state: weights_only-safe capture and exact restore for every searcher."""

import io

import pytest
import torch

from evotorch_mqa_moe.backprop import BackpropTrainer
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.run import RunSettings
from evotorch_mqa_moe.searchers import SEARCHERS, make_searcher
from evotorch_mqa_moe.state import capture, restore


def build(name, seed=0):
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    return make_searcher(name, TransformerProblem(task, config, seed=seed), popsize=8)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # no pickled objects inside


@pytest.mark.parametrize("name", list(SEARCHERS))
def test_restored_searcher_continues_exactly(name):
    original = build(name)
    for _ in range(3):
        original.step()
    state = roundtrip(capture(original))
    rebuilt = build(name)
    rebuilt.step()  # a different state, entirely overwritten by restore
    restore(rebuilt, state)
    for _ in range(2):
        original.step()
        rebuilt.step()
    assert torch.equal(original.population.values, rebuilt.population.values)
    assert torch.equal(original.population.evals, rebuilt.population.evals)
    assert original.status["best_eval"] == rebuilt.status["best_eval"]
    if "center" in original.status:
        assert torch.equal(torch.as_tensor(original.status["center"]),
                           torch.as_tensor(rebuilt.status["center"]))


def test_restore_into_a_differently_built_searcher_fails_clearly():
    pgpe = build("pgpe")
    pgpe.step()
    ga = build("ga")
    with pytest.raises(ValueError, match="PGPE.*SeedGeneticAlgorithm"):
        restore(ga, roundtrip(capture(pgpe)))


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


@pytest.mark.parametrize(
    "changes,match",
    [({"searcher": "sgd"}, "unknown searcher 'sgd'"), ({"generations": 0}, "generations"),
     ({"generations": None}, "generations or max_evaluations"), ({"seed": -1}, "seed"),
     ({"eval_every": 0}, "eval_every"), ({"max_evaluations": 2.5}, "max_evaluations")],
)
def test_run_settings_reject_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        RunSettings(**{"task": "reverse", **changes})
