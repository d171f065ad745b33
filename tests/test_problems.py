"""The example problems: valid batches, exact repeats, oracle = ceiling, uniform = chance."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from evotorch_mqa_moe import MQAMoETransformer, PopulationModel, num_parameters
from evotorch_mqa_moe.problems import get_task_class, make_task, task_names
from evotorch_mqa_moe.problems._corpus import CHARS, decode, encode
from evotorch_mqa_moe.problems._scoring import IGNORE, accuracies, masked_cross_entropy
from evotorch_mqa_moe.problems.addition import BLANK, EQUALS, PLUS
from evotorch_mqa_moe.problems.language import LanguageTask

# Small option sets keep every test well under a second.
CASES = {
    "reverse": ("reverse", {}),
    "sort": ("sort", {}),
    "addition": ("addition", {}),
    "addition-msb": ("addition", {"num_digits": 2, "digit_order": "msb"}),
    "majority": ("majority", {}),
    "majority-3": ("majority", {"num_classes": 3, "seq_len": 8}),
    "language-markov": ("language", {}),
    "language-text": ("language", {"source": "text", "test_size": 128}),
}
OWN = ["reverse", "sort", "addition", "majority", "language", "multitask"]
HAS_CARTPOLE = importlib.util.find_spec("evotorch_mqa_moe.problems.cartpole") is not None
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=list(CASES), scope="module")
def task(request):
    name, options = CASES[request.param]
    return make_task(name, **options)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def oracle_logits(targets: torch.Tensor, width: int, popsize: int = 2) -> torch.Tensor:
    """(P, *targets.shape, width): +50 on the right class, 0 elsewhere (any class where
    the target is IGNORE)."""
    one_hot = torch.nn.functional.one_hot(targets.clamp(min=0), width).float() * 50.0
    return one_hot.expand(popsize, *one_hot.shape)


# --- registry ---------------------------------------------------------------


def test_task_names_lists_every_problem():
    assert task_names() == OWN + ["cartpole", "g2p"]


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'nope'.*reverse.*cartpole"):
        make_task("nope")


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="takes no option 'window'.*seq_len"):
        make_task("reverse", window=3)


@pytest.mark.skipif(not HAS_CARTPOLE, reason="problems/cartpole.py not written yet")
def test_cartpole_is_registered_lazily():
    cls = get_task_class("cartpole")
    assert cls.__name__ == "CartPoleTask"
    assert make_task("cartpole", window=4).window == 4


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("reverse", {"seq_len": 1}, "seq_len"),
        ("reverse", {"vocab_size": 1}, "vocab_size"),
        ("sort", {"vocab_size": 2.5}, "vocab_size"),
        ("sort", {"batch_size": 0}, "batch_size"),
        ("sort", {"test_size": True}, "test_size"),
        ("reverse", {"seed": -1}, "seed"),
        ("addition", {"num_digits": 0}, "num_digits"),
        ("addition", {"num_digits": 16}, "num_digits"),
        ("addition", {"digit_order": "big"}, "digit_order"),
        ("majority", {"seq_len": 10}, "seq_len"),
        ("majority", {"num_classes": 1}, "num_classes"),
        ("majority", {"num_classes": 3, "seq_len": 2}, "seq_len"),
        ("language", {"source": "wiki"}, "source"),
        ("language", {"seq_len": 1}, "seq_len"),
        ("language", {"order": 3, "seq_len": 2}, "seq_len"),
        ("language", {"vocab_size": 300}, "vocab_size"),
        ("language", {"vocab_size": 64, "order": 4}, "vocab_size \\*\\* order"),
        ("language", {"concentration": 0.0}, "concentration"),
        ("language", {"concentration": float("nan")}, "concentration"),
        ("language", {"source": "text", "order": 2}, "order"),
        ("language", {"source": "text", "vocab_size": 8}, "vocab_size"),
        ("language", {"source": "text", "test_size": 10**6}, "test_size"),
    ],
)
def test_bad_options_raise_value_errors_naming_the_option(name, options, option):
    with pytest.raises(ValueError, match=option):
        make_task(name, **options)


# --- every task ---------------------------------------------------------------


def test_batches_are_valid_for_the_default_config(task):
    config = task.default_config()
    inputs, targets = task.sample(5, gen(0))
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape[0] == targets.shape[0] == 5
    assert 1 <= inputs.shape[1] <= config.max_seq_len
    assert 0 <= int(inputs.min()) and int(inputs.max()) < config.vocab_size
    scored = targets[targets != IGNORE]
    assert scored.numel() > 0
    assert 0 <= int(scored.min()) and int(scored.max()) < config.output_dim
    # the model's outputs have the shape the loss expects
    net = MQAMoETransformer(config)
    outputs = PopulationModel.from_module(net)(inputs)
    assert outputs.shape == (1, *targets.shape, config.output_dim)
    assert task.loss(outputs, targets).shape == (1,)


def test_seeded_task_repeats_exactly(task):
    a, b = task.sample(16, gen(3)), task.sample(16, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], task.sample(16, gen(4))[0])
    # a fresh instance with the same options builds the same test set
    same = make_task(task.name, **{k: getattr(task, k) for k in ("test_size", "seed")},
                     **_shape_options(task))
    assert same is not task
    assert torch.equal(same.test_set()[0], task.test_set()[0])
    assert torch.equal(same.test_set()[1], task.test_set()[1])
    # the test set is not the training stream of a generator seeded like the task
    assert not torch.equal(task.test_set()[0][:16], task.sample(16, gen(task.seed))[0])


def _shape_options(task) -> dict:
    keys = {"reverse": ("vocab_size", "seq_len"), "sort": ("vocab_size", "seq_len"),
            "addition": ("num_digits", "digit_order"), "majority": ("num_classes", "seq_len"),
            "language": ("source", "seq_len")}[task.name]
    return {k: getattr(task, k) for k in keys}


def test_oracle_reaches_the_ceiling(task):
    inputs, targets = task.test_set()
    outputs = oracle_logits(targets, task.default_config().output_dim)
    loss = task.loss(outputs, targets)
    assert loss.shape == (2,)
    assert torch.all(loss < 1e-6)  # fitness -loss ~ 0, the best possible
    metrics = task.score(outputs, targets)
    for key in ("token_accuracy", "exact_accuracy", "accuracy"):
        if key in metrics:
            assert torch.all(metrics[key] == 1.0), key
    for key, value in task.ceiling().items():
        if key in metrics and value is not None and task.name != "language":
            assert torch.allclose(metrics[key], torch.tensor(value, dtype=metrics[key].dtype))


def test_uniform_outputs_get_chance_level(task):
    inputs, targets = task.test_set()
    V = task.default_config().output_dim
    uniform = torch.zeros(1, *targets.shape, V)
    assert task.loss(uniform, targets).item() == pytest.approx(math.log(V), rel=1e-6)
    assert task.chance()["loss"] == pytest.approx(math.log(V))
    # random guessing (independent random logits) scores the chance accuracy, up to
    # sampling noise on the test set: 4 standard errors or less
    guess = torch.randn(3, *targets.shape, V, generator=gen(0))
    metrics = task.score(guess, targets)
    p = 1 / V
    key = "accuracy" if "accuracy" in metrics else "token_accuracy"
    n = int((targets != IGNORE).sum())
    tolerance = 4 * math.sqrt(p * (1 - p) / n)
    assert torch.all((metrics[key] - p).abs() < tolerance), (metrics[key], p, tolerance)
    if task.name == "language":
        bpc = task.score(uniform, targets)["bits_per_char"]
        assert bpc.item() == pytest.approx(task.chance()["bits_per_char"], rel=1e-6)


def test_loss_is_differentiable_and_fitness_is_minus_loss(task):
    config = task.default_config()
    net = MQAMoETransformer(config)
    inputs, targets = task.sample(8, gen(1))
    loss = task.loss(PopulationModel.from_module(net)(inputs), targets)[0]
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    params = torch.randn(3, num_parameters(config), generator=gen(2)) * 0.1
    model = PopulationModel(config, params)
    fitness = task.fitness(model, gen(5))
    assert fitness.shape == (3,) and torch.isfinite(fitness).all()
    batch_inputs, batch_targets = task.sample(task.batch_size, gen(5))
    with torch.no_grad():
        expected = -task.loss(model(batch_inputs), batch_targets)
    assert torch.equal(fitness, expected)
    metrics = task.metrics(model)
    assert task.target_metric in metrics
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in metrics.values())


# --- task specifics -----------------------------------------------------------


def test_reverse_and_sort_targets():
    x, y = make_task("reverse", vocab_size=5, seq_len=6).sample(10, gen(0))
    assert torch.equal(y, x.flip(1))
    x, y = make_task("sort", vocab_size=5, seq_len=6).sample(10, gen(0))
    assert torch.equal(y, torch.sort(x, dim=1).values)
    assert torch.all(y[:, 1:] >= y[:, :-1])


@pytest.mark.parametrize("order", ["lsb", "msb"])
def test_addition_layout(order):
    task = make_task("addition", num_digits=3, digit_order=order)
    inputs, targets = task.sample(200, gen(0))
    assert inputs.shape == (200, 12)
    assert torch.all(inputs[:, 3] == PLUS) and torch.all(inputs[:, 7] == EQUALS)
    assert torch.all(inputs[:, 8:] == BLANK) and torch.all(targets[:, :8] == IGNORE)
    weights = torch.tensor([1, 10, 100]) if order == "lsb" else torch.tensor([100, 10, 1])
    answer = torch.tensor([1, 10, 100, 1000]) if order == "lsb" else torch.tensor(
        [1000, 100, 10, 1])
    a = (inputs[:, :3] * weights).sum(1)
    b = (inputs[:, 4:7] * weights).sum(1)
    assert torch.equal((targets[:, 8:] * answer).sum(1), a + b)
    # 123 + 989 = 1112, least significant digit first
    digits = make_task("addition").digits(torch.tensor([123, 989, 1112]), 4)
    assert digits.tolist() == [[3, 2, 1, 0], [9, 8, 9, 0], [2, 1, 1, 1]]


def test_majority_labels_are_strict_majorities_and_balanced():
    task = make_task("majority", num_classes=3, seq_len=7)
    x, y = task.sample(300, gen(0))
    counts = torch.nn.functional.one_hot(x, 3).sum(1)
    top2 = counts.topk(2, dim=1).values
    assert torch.all(top2[:, 0] > top2[:, 1])
    assert torch.equal(counts.argmax(1), y)
    assert y.bincount(minlength=3).tolist() == [100, 100, 100]
    assert task.chance()["accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert task.default_config().pooling == "mean"


def test_scoring_ignores_unscored_positions():
    targets = torch.tensor([[1, IGNORE], [0, 2]])
    outputs = oracle_logits(targets, 3, popsize=1).clone()
    outputs[0, 0, 1] = torch.tensor([0.0, 0.0, 90.0])  # wrong only where not scored
    assert masked_cross_entropy(outputs, targets).item() < 1e-6
    assert accuracies(outputs, targets)["exact_accuracy"].item() == 1.0
    outputs[0, 1, 1] = torch.tensor([90.0, 0.0, 0.0])  # one scored token wrong
    acc = accuracies(outputs, targets)
    assert acc["token_accuracy"].item() == pytest.approx(2 / 3)
    assert acc["exact_accuracy"].item() == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="outputs"):
        masked_cross_entropy(outputs[0], targets)


# --- language -------------------------------------------------------------------


def test_markov_true_model_gets_the_entropy_rate():
    task = make_task("language")  # order 2, vocab 4
    inputs, targets = task.test_set()
    outputs = task.source_log_probs(inputs).float().unsqueeze(0)
    bpc = task.score(outputs, targets)["bits_per_char"].item()
    # 512 x 31 scored characters: the standard error is ~0.01 bits
    assert bpc == pytest.approx(task.chain.entropy_rate, abs=0.03)
    base = task.baselines()
    assert base["entropy_rate"] < base["bigram_bpc"] <= base["unigram_bpc"] < base["uniform_bpc"]
    assert base["bigram_bpc"] - base["entropy_rate"] > 0.4  # order 2 matters
    metrics = task.score(outputs.expand(2, -1, -1, -1), targets)
    assert torch.equal(metrics["neg_bits_per_char"], -metrics["bits_per_char"])
    assert metrics["entropy_rate"].tolist() == pytest.approx([task.chain.entropy_rate] * 2)


def test_markov_entropy_rate_matches_an_independent_computation():
    chain = LanguageTask(vocab_size=5, order=1, concentration=1.0, seed=3).chain
    P = chain.transition.numpy()
    values, vectors = np.linalg.eig(P.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    pi /= pi.sum()
    expected = -(pi[:, None] * P * np.log2(P)).sum()
    assert chain.entropy_rate == pytest.approx(expected, rel=1e-9)
    assert torch.allclose(chain.step(chain.stationary), chain.stationary, atol=1e-12)
    # near-uniform rows: entropy rate -> log2 V
    flat = LanguageTask(vocab_size=4, order=2, concentration=1e6).chain
    assert flat.entropy_rate == pytest.approx(2.0, abs=1e-3)


def test_markov_unscored_prefix_and_shift():
    task = make_task("language", order=3, seq_len=10, vocab_size=4)
    tokens = task.chain.sample(4, 11, gen(0))
    inputs, targets = task.make_batch(4, gen(0))
    assert torch.equal(inputs, tokens[:, :-1])
    assert torch.all(targets[:, :2] == IGNORE) and torch.equal(targets[:, 2:], tokens[:, 3:])


def test_text_corpus_and_split():
    assert len(CHARS) == 96 and encode("a\tb\n").tolist() == [
        CHARS.index("a") + 1, 0, CHARS.index("b") + 1, 1]
    assert decode(encode("def f(x):\n")) == "def f(x):\n"
    task = make_task("language", source="text", seq_len=16, test_size=64)
    inputs, targets = task.test_set()
    assert torch.equal(inputs[1:, 0], targets[:-1, -1])  # consecutive windows, no gaps
    assert task.default_config().vocab_size == 97 and task.default_config().causal
    base = task.baselines()
    assert base["bigram_bpc"] < base["unigram_bpc"] < base["uniform_bpc"]
    assert task.ceiling()["bits_per_char"] is None


# --- defaults -----------------------------------------------------------------


def test_defaults_are_the_variants_search_can_learn():
    # bench/learnability.py: Adam reaches the ceiling of these in a few hundred steps;
    # the former defaults (3 digits; vocab 8, concentration 0.5) stay reachable
    addition = make_task("addition")
    assert addition.num_digits == 1 and addition.seq_len == 6
    assert make_task("addition", num_digits=3).seq_len == 12
    markov = make_task("language")
    assert (markov.vocab_size, markov.order, markov.concentration) == (4, 2, 0.3)
    old = make_task("language", vocab_size=8, concentration=0.5)
    assert old.chain.entropy_rate == pytest.approx(2.245, abs=1e-3)
    # far below uniform guessing (log2 4 = 2 bits); the bigram gap is checked in
    # test_markov_true_model_gets_the_entropy_rate
    assert markov.chain.entropy_rate < 1.1


def _documented_parameter_counts(doc: str) -> list[tuple[str, dict, int]]:
    """(task, options, parameters) of each row of the problem table in ``doc``."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "default model (parameters)" in line)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.match(r"`(\w+)`", cells[0]).group(1)
        source = re.search(r'`(?:source=")?(markov|text|prose)"?`', cells[0])
        options = {"source": source.group(1)} if source else {}
        count = int(re.match(r"([\d,]+)", cells[-1]).group(1).replace(",", ""))
        rows.append((name, options, count))
    return rows


@pytest.mark.parametrize("doc", ["README.md", "docs/problems.md"])
def test_documented_parameter_counts_match_the_default_models(doc):
    rows = _documented_parameter_counts(doc)
    assert {name for name, _, _ in rows} == set(OWN + ["cartpole", "g2p"])
    for name, options, count in rows:
        if name == "cartpole" and not HAS_CARTPOLE:
            continue
        task = make_task(name, **options)
        assert num_parameters(task.default_config()) == count, (doc, name, options)


# --- through TransformerProblem ------------------------------------------------


def _problem_cases():
    cases = [pytest.param(name, options, id=key) for key, (name, options) in CASES.items()]
    if HAS_CARTPOLE:
        cases.append(pytest.param("cartpole", {"episodes": 1, "max_steps": 20,
                                               "test_episodes": 2}, id="cartpole"))
    return cases


@pytest.mark.parametrize(("name", "options"), _problem_cases())
def test_population_of_four_through_transformer_problem(name, options):
    problem_module = pytest.importorskip("evotorch_mqa_moe.problem")
    task = make_task(name, **options)
    problem = problem_module.TransformerProblem(task, seed=0)
    assert problem.solution_length == num_parameters(task.default_config())
    batch = problem.generate_batch(4)
    problem.evaluate(batch)
    evals = batch.evals.flatten()
    assert evals.shape == (4,) and torch.isfinite(evals).all()
