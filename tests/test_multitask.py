"""The ``multitask`` problem: operation token + symbols in, the operation's result out."""

from __future__ import annotations

import math

import pytest
import torch

from evotorch_mqa_moe import MQAMoETransformer, PopulationModel, num_parameters
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import get_task_class, make_task, task_names
from evotorch_mqa_moe.problems._scoring import IGNORE
from evotorch_mqa_moe.problems.multitask import OPERATIONS


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registered_and_lazily_importable():
    assert "multitask" in task_names()
    assert get_task_class("multitask").__name__ == "MultitaskTask"
    task = make_task("multitask", vocab_size=5, seq_len=4)
    assert (task.vocab_size, task.seq_len, task.target_metric) == (5, 4, "exact_accuracy")


@pytest.mark.parametrize(("options", "option"), [
    ({"vocab_size": 1}, "vocab_size"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"seq_len": 1}, "seq_len"),
    ({"seq_len": 4096}, "seq_len"),
    ({"batch_size": 0}, "batch_size"),
    ({"test_size": True}, "test_size"),
    ({"seed": -1}, "seed"),
])
def test_bad_options_raise_value_errors_naming_the_option(options, option):
    with pytest.raises(ValueError, match=option) as info:
        make_task("multitask", **options)
    assert repr(next(iter(options.values()))) in str(info.value)


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="takes no option 'ops'.*seq_len"):
        make_task("multitask", ops=("copy",))


def test_targets_are_the_named_operation_on_the_symbols():
    task = make_task("multitask", vocab_size=5, seq_len=6)
    x, y = task.sample(300, gen(0))
    assert x.shape == y.shape == (300, 7)
    assert bool((y[:, 0] == IGNORE).all())
    symbols, ops = x[:, 1:], x[:, 0] - 5
    assert int(symbols.min()) >= 0 and int(symbols.max()) < 5
    assert set(ops.tolist()) == {0, 1, 2}  # every operation appears
    for i, example in enumerate(symbols):
        op = OPERATIONS[int(ops[i])]
        expected = {"reverse": example.flip(0), "sort": example.sort().values,
                    "copy": example}[op]
        assert torch.equal(y[i, 1:], expected), (op, example, y[i])
    assert [task.operation_token(op) for op in OPERATIONS] == [5, 6, 7]
    with pytest.raises(ValueError, match="'rotate'"):
        task.operation_token("rotate")


def test_same_symbols_different_operation_different_target():
    task = make_task("multitask", vocab_size=6, seq_len=5)
    symbols = torch.tensor([[3, 0, 5, 1, 1]])
    results = {op: task.apply(torch.tensor([i]), symbols) for i, op in enumerate(OPERATIONS)}
    assert results["reverse"].tolist() == [[1, 1, 5, 0, 3]]
    assert results["sort"].tolist() == [[0, 1, 1, 3, 5]]
    assert results["copy"].tolist() == [[3, 0, 5, 1, 1]]


def test_seeded_batches_and_test_set_repeat():
    task = make_task("multitask")
    a, b = task.sample(16, gen(3)), task.sample(16, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], task.sample(16, gen(4))[0])
    same = make_task("multitask", seed=task.seed)
    assert torch.equal(same.test_set()[0], task.test_set()[0])
    assert not torch.equal(task.test_set()[0][:16], task.sample(16, gen(task.seed))[0])
    assert not torch.equal(make_task("multitask", seed=1).test_set()[0], task.test_set()[0])


def test_default_config_fits_the_batches():
    task = make_task("multitask")
    config = task.default_config()
    assert config.positional == "learned" and config.vocab_size == 11
    assert config.output_dim == 8 and config.max_seq_len == 9
    assert num_parameters(config) == 6736
    inputs, targets = task.sample(5, gen(0))
    outputs = PopulationModel.from_module(MQAMoETransformer(config))(inputs)
    assert outputs.shape == (1, 5, 9, 8)
    assert task.loss(outputs, targets).shape == (1,)


def test_oracle_reaches_ceiling_and_uniform_guessing_chance():
    task = make_task("multitask", test_size=512)
    _, targets = task.test_set()
    V = task.vocab_size
    oracle = torch.nn.functional.one_hot(targets.clamp(min=0), V).float()[None] * 50.0
    metrics = task.score(oracle, targets)
    assert float(task.loss(oracle, targets)) < 1e-6
    assert float(metrics["exact_accuracy"]) == task.ceiling()["exact_accuracy"] == 1.0
    uniform = torch.zeros(1, *targets.shape, V)
    assert float(task.loss(uniform, targets)) == pytest.approx(task.chance()["loss"], rel=1e-6)
    guess = task.score(torch.randn(1, *targets.shape, V, generator=gen(1)), targets)
    n = int((targets != IGNORE).sum())
    p = task.chance()["token_accuracy"]
    assert abs(float(guess["token_accuracy"]) - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert task.chance()["exact_accuracy"] == pytest.approx(8.0 ** -8)


def test_population_through_transformer_problem_with_attention_gating():
    task = make_task("multitask", seq_len=4, test_size=32)
    config = task.default_config().replace(gating="attention")
    problem = TransformerProblem(task, config, seed=0)
    batch = problem.generate_batch(3)
    problem.evaluate(batch)
    assert batch.evals.flatten().shape == (3,) and torch.isfinite(batch.evals).all()
