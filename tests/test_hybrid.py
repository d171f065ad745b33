"""Hybrid searchers: population gradients and optimisers against torch, and the searchers."""

import io
import itertools
import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from evotorch_mqa_moe import MQAMoETransformer, TransformerConfig
from evotorch_mqa_moe.model import init_parameters
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.problems._scoring import masked_cross_entropy
from evotorch_mqa_moe.searchers import SEARCHERS
from evotorch_mqa_moe.searchers.gradients import (
    gradient_chunk_size,
    population_loss_and_grad,
)
from evotorch_mqa_moe.searchers.lamarck import build_baldwin, build_lamarck
from evotorch_mqa_moe.searchers.pbt import build_pbt
from evotorch_mqa_moe.searchers.population_optim import PopulationAdam, PopulationSGD

TOL = 1e-5


def small(**changes):
    base = dict(vocab_size=7, embed_dim=16, num_heads=4, num_layers=2, expert_dim=8,
                num_experts=3, max_seq_len=9, positional="both")
    base.update(changes)
    return TransformerConfig(**base)


def load_row(model, row):
    """Copy ``row`` into the module's own parameters (separate tensors, unlike
    ``vector_to_parameters``, whose views make adjacent parameters share memory)."""
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(row[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


def module_loss_and_grad(config, row, inputs, targets):
    model = load_row(MQAMoETransformer(config), row)
    loss = masked_cross_entropy(model(inputs).unsqueeze(0), targets)[0]
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return loss.detach(), grad


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("top_k,causal,kv_heads", itertools.product([None, 2], [False, True],
                                                                    [1, 2]))
@pytest.mark.parametrize("per_individual", [False, True])
def test_population_gradient_rows_equal_single_module_autograd(top_k, causal, kv_heads,
                                                               per_individual):
    c = small(top_k=top_k, causal=causal, num_kv_heads=kv_heads,
              activation="gelu" if causal else "relu")
    P, B, T = 4, 3, 9
    params = init_parameters(c, P, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    shape = (P, B, T) if per_individual else (B, T)
    inputs = torch.randint(0, 7, shape, generator=gen)
    targets = torch.randint(0, 7, shape, generator=gen)
    targets[..., 0] = -100  # an unscored position
    before = params.clone()
    loss, grad = population_loss_and_grad(c, params, inputs, targets, loss=masked_cross_entropy,
                                          chunk_size=P)
    loss_chunked, grad_chunked = population_loss_and_grad(
        c, params, inputs, targets, loss=masked_cross_entropy, chunk_size=3)
    assert torch.equal(params, before)  # the population is not modified
    assert loss.shape == (P,) and grad.shape == params.shape
    assert not grad.requires_grad
    for i in range(P):
        x, y = (inputs[i], targets[i]) if per_individual else (inputs, targets)
        ref_loss, ref_grad = module_loss_and_grad(c, params[i], x, y)
        for lo, gr in ((loss, grad), (loss_chunked, grad_chunked)):
            assert torch.allclose(lo[i], ref_loss, atol=TOL)
            assert torch.allclose(gr[i], ref_grad, atol=TOL, rtol=1e-4)


def test_population_gradient_of_pooled_vector_model():
    c = TransformerConfig(input_dim=3, output_dim=4, embed_dim=8, num_heads=2, num_layers=1,
                          expert_dim=8, num_experts=2, max_seq_len=6, pooling="mean")
    params = init_parameters(c, 3, generator=torch.Generator().manual_seed(2))
    inputs = torch.randn(4, 6, 3)
    targets = torch.randint(0, 4, (4,))
    loss, grad = population_loss_and_grad(c, params, inputs, targets, loss=masked_cross_entropy)
    for i in range(3):
        ref_loss, ref_grad = module_loss_and_grad(c, params[i], inputs, targets)
        assert torch.allclose(loss[i], ref_loss, atol=TOL)
        assert torch.allclose(grad[i], ref_grad, atol=TOL, rtol=1e-4)


def test_population_gradient_from_a_problem_uses_its_task_loss():
    task = make_task("reverse")
    problem = TransformerProblem(task, seed=0)
    values = problem.init_population(4)
    inputs, targets = task.sample(8, torch.Generator().manual_seed(0))
    loss, grad = population_loss_and_grad(problem, values, inputs, targets)
    ref_loss, _ = population_loss_and_grad(problem.config, values, inputs, targets,
                                           loss=task.loss, chunk_size=1)
    assert torch.allclose(loss, ref_loss, atol=TOL)
    _, ref_grad = module_loss_and_grad(problem.config, values[2], inputs, targets)
    assert torch.allclose(grad[2], ref_grad, atol=TOL, rtol=1e-4)


def test_gradient_chunk_is_smaller_than_the_forward_chunk():
    from evotorch_mqa_moe.model import default_chunk_size
    c = small()
    fwd = default_chunk_size(c, 512, "cpu", memory_budget=64 << 20)
    bwd = gradient_chunk_size(c, 512, "cpu", memory_budget=64 << 20)
    assert 1 <= bwd < fwd
    with pytest.raises(ValueError, match="memory_budget"):
        gradient_chunk_size(c, 512, "cpu", memory_budget=0)


def test_population_gradient_rejects_bad_input():
    c = small()
    params = init_parameters(c, 2)
    x = torch.zeros(2, 9, dtype=torch.int64)
    with pytest.raises(ValueError, match="loss="):
        population_loss_and_grad(c, params, x, x)
    with pytest.raises(ValueError, match="columns"):
        population_loss_and_grad(c, params[:, :10], x, x, loss=masked_cross_entropy)
    with pytest.raises(ValueError, match="per-individual targets"):
        population_loss_and_grad(c, params, torch.zeros(2, 2, 9, dtype=torch.int64),
                                 torch.zeros(3, 9, dtype=torch.int64), loss=masked_cross_entropy)
    with pytest.raises(ValueError, match="chunk_size"):
        population_loss_and_grad(c, params, x, x, loss=masked_cross_entropy, chunk_size=0)


def test_cartpole_has_no_gradient():
    pytest.importorskip("gymnasium")
    problem = TransformerProblem(make_task("cartpole"), seed=0)
    values = problem.init_population(2)
    with pytest.raises(ValueError, match="needs a supervised task .* 'cartpole' is not one"):
        population_loss_and_grad(problem, values, torch.zeros(1, 8, 4), torch.zeros(1))


# ----------------------------------------------------------------------------- optimisers


def run_reference(make_opt, rows, grads):
    """P independent torch.optim optimisers, one per row; returns the rows after all steps."""
    out = []
    for i, row in enumerate(rows):
        p = torch.nn.Parameter(row.clone())
        opt = make_opt(i, [p])
        for g in grads:
            p.grad = g[i].clone()
            opt.step()
        out.append(p.detach())
    return torch.stack(out)


@pytest.mark.parametrize("nesterov,weight_decay", [(False, 0.0), (True, 0.01)])
def test_sgd_step_equals_independent_torch_sgd(nesterov, weight_decay):
    P, N = 4, 11
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(P, N, generator=gen)
    grads = [torch.randn(P, N, generator=gen) for _ in range(4)]
    lr = torch.tensor([0.1, 0.01, 0.3, 0.05])
    momentum = torch.tensor([0.9, 0.5, 0.0, 0.99])
    dampening = 0.0 if nesterov else 0.1
    ref = run_reference(lambda i, ps: torch.optim.SGD(
        ps, lr=float(lr[i]), momentum=float(momentum[i]), dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov and float(momentum[i]) > 0), rows, grads)
    opt = PopulationSGD(P, lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov)
    values = rows.clone()
    for g in grads:
        opt.step(values, g)
    assert torch.allclose(values, ref, atol=1e-6)
    assert opt.steps.tolist() == [4] * P


@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_step_equals_independent_torch_adam(weight_decay, decoupled):
    P, N = 4, 13
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(P, N, generator=gen)
    grads = [torch.randn(P, N, generator=gen) for _ in range(5)]
    lr = torch.tensor([1e-3, 1e-2, 3e-2, 1e-1])
    beta1 = torch.tensor([0.9, 0.5, 0.0, 0.99])
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = run_reference(lambda i, ps: cls(ps, lr=float(lr[i]), betas=(float(beta1[i]), 0.99),
                                          weight_decay=weight_decay), rows, grads)
    opt = PopulationAdam(P, lr=lr, betas=(beta1, 0.99), weight_decay=weight_decay,
                         decoupled=decoupled)
    values = rows.clone()
    for g in grads:
        opt.step(values, g)
    assert torch.allclose(values, ref, atol=1e-6)


def test_optimizer_rows_reset_and_take_follow_torch():
    """A reset row restarts like a fresh torch optimiser; take() moves whole rows of state."""
    P, N = 3, 5
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(P, N, generator=gen)
    grads = [torch.randn(P, N, generator=gen) for _ in range(3)]
    opt = PopulationAdam(P, lr=torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    values = rows.clone()
    opt.step(values, grads[0])
    opt.take(torch.tensor([2, 2, 0]))  # rows 0 and 1 become copies of row 2, row 2 of row 0
    assert opt.lr.tolist() == [0.3, 0.3, 0.1]
    assert torch.equal(opt.exp_avg[0], opt.exp_avg[1])
    values = values[[2, 2, 0]].clone()
    opt.reset(torch.tensor([False, True, False]))
    for g in grads[1:]:
        opt.step(values, g)
    # row 1 = a fresh Adam (lr 0.3) started from row 2's weights after one step
    start = rows[2].clone()
    p0 = torch.nn.Parameter(start)
    first = torch.optim.Adam([p0], lr=0.3)
    p0.grad = grads[0][2].clone()
    first.step()
    p = torch.nn.Parameter(p0.detach().clone())
    fresh = torch.optim.Adam([p], lr=0.3)
    for g in grads[1:]:
        p.grad = g[1].clone()
        fresh.step()
    assert torch.allclose(values[1], p.detach(), atol=1e-6)
    # row 0 continued row 2's optimiser (same moments, steps 2 and 3)
    for g in grads[1:]:
        p0.grad = g[0].clone()
        first.step()
    assert torch.allclose(values[0], p0.detach(), atol=1e-6)


def test_optimizer_state_roundtrips_weights_only():
    P, N = 3, 6
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(P, N, generator=gen) for _ in range(4)]
    for cls, kw in [(PopulationAdam, {}), (PopulationSGD, {"momentum": 0.9})]:
        a = cls(P, lr=0.1, **kw)
        va = torch.zeros(P, N)
        for g in grads[:2]:
            a.step(va, g)
        buffer = io.BytesIO()
        torch.save(a.state_dict(), buffer)
        buffer.seek(0)
        b = cls(P, lr=0.5, **kw)
        b.load_state_dict(torch.load(buffer, weights_only=True))
        vb = va.clone()
        for g in grads[2:]:
            a.step(va, g)
            b.step(vb, g)
        assert torch.equal(va, vb)


@pytest.mark.parametrize("kw,match", [
    ({"lr": 0.0}, "lr must be > 0.0, got 0.0"),
    ({"lr": torch.tensor([0.1, -1.0])}, "lr must be > 0.0, got -1.0"),
    ({"lr": torch.tensor([0.1, 0.1, 0.1])}, r"lr must be a number or a \(2,\) tensor"),
    ({"lr": 0.1, "momentum": 1.0}, r"momentum must be in \[0.0, 1.0\), got 1.0"),
])
def test_optimizer_rejects_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        PopulationSGD(2, **kw)
    with pytest.raises(ValueError, match="beta1"):
        PopulationAdam(2, lr=0.1, betas=(1.5, 0.9))
    opt = PopulationAdam(2, lr=0.1)
    with pytest.raises(ValueError, match="values must be"):
        opt.step(torch.zeros(3, 4), torch.zeros(3, 4))


def test_parameters_to_vector_is_the_gradient_order():
    """The module's gradient, flattened in parameters() order, is what population rows hold."""
    c = small(num_layers=1)
    model = MQAMoETransformer(c)
    row = parameters_to_vector(model.parameters()).detach()
    assert row.shape[0] == init_parameters(c, 1).shape[1]


# ----------------------------------------------------------------------------- searchers

BUILDERS = {"lamarck": build_lamarck, "baldwin": build_baldwin, "pbt": build_pbt}


def tiny_problem(seed=0, task="reverse"):
    t = make_task(task)
    config = t.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    return TransformerProblem(t, config, seed=seed)


def build(name, seed=0, **options):
    options = {"popsize": 6, "stdev": 0.05, **options}
    if name == "pbt":
        options.setdefault("interval", 2)
    else:
        options.setdefault("k", 1)
    return BUILDERS[name](tiny_problem(seed), **options)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_searcher_protocol_and_exact_resume(name):
    searcher = build(name)
    assert searcher.evaluations == 0
    costs = []
    for step in (1, 2):
        before = searcher.evaluations
        searcher.step()
        costs.append(searcher.evaluations - before)
        status = searcher.status
        assert status["iter"] == step
        assert status["best_eval"] >= status["pop_best_eval"] >= status["mean_eval"]
    P = 6
    if name == "pbt":  # 3 per gradient step; the exploit round after step 2 adds a forward each
        assert costs == [3 * P, 4 * P]
    else:  # k=1: one gradient step and one evaluation per individual per generation
        assert costs == [4 * P, 4 * P]
    assert searcher.current_solution().shape == (searcher.problem.solution_length,)
    state = roundtrip(searcher.state_dict())
    rebuilt = build(name, seed=1)  # another seed: everything must come from the state
    rebuilt.step()
    rebuilt.load_state_dict(state)
    assert rebuilt.evaluations == searcher.evaluations
    for _ in range(3):
        searcher.step()
        rebuilt.step()
        assert torch.equal(searcher.current_solution(), rebuilt.current_solution())
        assert searcher.status["best_eval"] == rebuilt.status["best_eval"]
        assert searcher.status["pop_best_eval"] == rebuilt.status["pop_best_eval"]
    assert searcher.evaluations == rebuilt.evaluations
    other = build("pbt" if name != "pbt" else "lamarck")
    with pytest.raises(ValueError, match="state_dict"):
        other.load_state_dict(state)


def test_baldwin_leaves_the_genome_unchanged_and_lamarck_writes_learning_back():
    baldwin, lamarck = build("baldwin", k=2), build("lamarck", k=2)
    init = tiny_problem().init_population(6)  # the same seed draws the same initial population
    baldwin.step()
    lamarck.step()
    # same genomes, same data, same optimiser: both learnt the same networks
    assert torch.equal(baldwin.phenotypes, lamarck.phenotypes)
    assert not torch.allclose(baldwin.phenotypes, init)
    assert torch.equal(baldwin.genomes, init)  # Baldwin: genome as born
    assert torch.equal(lamarck.genomes, lamarck.phenotypes)  # Lamarck: genome = trained
    assert torch.equal(baldwin.current_solution(),
                       baldwin.phenotypes[baldwin._fitness.argmax()])
    # next generation: the elites' genomes are carried over exactly as they were
    elites = 2
    order = torch.argsort(baldwin._fitness, descending=True, stable=True)[:elites]
    old_genomes = baldwin.genomes.clone()
    baldwin.step()
    assert torch.equal(baldwin.genomes[:elites], old_genomes[order])
    order = torch.argsort(lamarck._fitness, descending=True, stable=True)[:elites]
    old_trained = lamarck.genomes.clone()
    lamarck.step()
    assert not torch.equal(lamarck.genomes[:elites], old_trained[order])  # they learnt more
    assert torch.equal(lamarck.genomes, lamarck.phenotypes)


def test_lamarck_genome_is_the_manually_trained_network():
    from evotorch_mqa_moe.searchers.hybrid import train_population
    lamarck = build("lamarck", k=3, lr=1e-2)
    lamarck.step()
    problem = tiny_problem()
    values = problem.init_population(6)
    opt = PopulationAdam(6, lr=1e-2, betas=(0.9, 0.999))
    train_population(problem, values, opt, 3)
    assert torch.equal(lamarck.genomes, values)


def test_pbt_exploit_copies_weights_state_and_hyperparameters():
    pbt = build("pbt", popsize=8, interval=100, exploit_fraction=0.25)
    for _ in range(3):
        pbt.step()
    opt = pbt.optimizer
    weights, lr, beta1 = pbt.weights.clone(), opt.lr.clone(), opt.beta1.clone()
    exp_avg, steps = opt.exp_avg.clone(), opt.steps.clone()
    scores = torch.tensor([0.5, -3.0, 2.0, 1.0, -1.0, 0.0, 3.0, -2.0])
    pbt._exploit_and_explore(scores)
    top, bottom = [6, 2], [7, 1]
    for i in range(8):
        if i in bottom:
            src = [j for j in top if torch.equal(pbt.weights[i], weights[j])]
            assert len(src) == 1, "a replaced member holds exactly a winner's weights"
            j = src[0]
            assert torch.equal(opt.exp_avg[i], exp_avg[j]) and opt.steps[i] == steps[j]
            ratio = float(opt.lr[i] / lr[j])
            assert math.isclose(ratio, 0.8) or math.isclose(ratio, 1.25)
            ratio = float((1 - opt.beta1[i]) / (1 - beta1[j]))
            assert math.isclose(ratio, 0.8) or math.isclose(ratio, 1.25)
            assert pbt.scores[i] == scores[j]
        else:
            assert torch.equal(pbt.weights[i], weights[i])
            assert opt.lr[i] == lr[i] and opt.beta1[i] == beta1[i]
            assert torch.equal(opt.exp_avg[i], exp_avg[i])


def test_pbt_explore_keeps_learning_rates_in_the_initial_range():
    # 200 rounds of exploit/explore always favouring the highest learning rate: unbounded,
    # x1.25 per round would take them far above lr * lr_spread (and diverge a real run)
    pbt = build("pbt", popsize=8, lr=1e-2, lr_spread=4.0)
    pbt.step()
    opt = pbt.optimizer
    for _ in range(200):
        pbt._exploit_and_explore(opt.lr.float().clone())
    assert opt.lr.max() <= 4e-2 * (1 + 1e-9) and opt.lr.min() >= 2.5e-3 * (1 - 1e-9)
    assert opt.lr.max() >= 4e-2 * 0.8  # the bound is reached: the test exercises it


def test_pbt_crossover_mixes_two_winners():
    pbt = build("pbt", popsize=8, interval=100, exploit_fraction=0.5, crossover=True)
    pbt.step()
    weights = pbt.weights.clone()
    scores = torch.arange(8.0)
    pbt._exploit_and_explore(scores)
    top = [7, 6, 5, 4]
    for i in range(4):  # the worst half: every gene comes from one of the winners
        from_top = torch.stack([pbt.weights[i] == weights[j] for j in top]).any(0)
        assert from_top.all()
        assert not any(torch.equal(pbt.weights[i], weights[j]) for j in top)


def test_pbt_spreads_the_initial_learning_rates():
    pbt = build("pbt", popsize=64, lr=1e-2, lr_spread=10.0, beta1_range=(0.6, 0.9))
    lr, beta1 = pbt.optimizer.lr, pbt.optimizer.beta1
    assert lr.min() >= 1e-3 and lr.max() <= 1e-1 and lr.max() / lr.min() > 10
    assert beta1.min() >= 0.6 and beta1.max() <= 0.9


@pytest.mark.parametrize("name,options,match", [
    ("lamarck", {"k": 0}, "k must be a positive integer, got 0"),
    ("baldwin", {"k": 1.5}, "k must be a positive integer, got 1.5"),
    ("lamarck", {"lr": 0.0}, "lr must be a positive number, got 0.0"),
    ("baldwin", {"lr": -1e-3}, "lr must be a positive number, got -0.001"),
    ("lamarck", {"truncation_fraction": 1.0},
     r"truncation_fraction must be a number in \(0, 1\), got 1.0"),
    ("baldwin", {"truncation_fraction": 0},
     r"truncation_fraction must be a number in \(0, 1\), got 0"),
    ("lamarck", {"mutation_probability": 1.5}, "mutation_probability must be .*got 1.5"),
    ("lamarck", {"num_elites": 6}, "num_elites must be < popsize=6, got 6"),
    ("lamarck", {"optimizer": "rmsprop"}, "optimizer must be one of .*'rmsprop'"),
    ("lamarck", {"stdev": 0.0}, "stdev must be a positive number, got 0.0"),
    ("pbt", {"lr": 0}, "lr must be a positive number, got 0"),
    ("pbt", {"interval": 0}, "interval must be a positive integer, got 0"),
    ("pbt", {"exploit_fraction": 0.0}, r"exploit_fraction must be a number in \(0, 1\), got 0.0"),
    ("pbt", {"exploit_fraction": 0.75}, "exploit_fraction must be <= 0.5.*got 0.75"),
    ("pbt", {"lr_spread": 0.5}, "lr_spread must be >= 1, got 0.5"),
    ("pbt", {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
])
def test_bad_options_raise_naming_the_value(name, options, match):
    with pytest.raises(ValueError, match=match):
        build(name, **options)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gradient_searchers_refuse_cartpole(name):
    pytest.importorskip("gymnasium")
    problem = TransformerProblem(make_task("cartpole"), seed=0)
    with pytest.raises(ValueError, match=rf"^{name} needs a supervised task \(sample \+ loss\) "
                                         r"for its gradients; 'cartpole' is not one$"):
        BUILDERS[name](problem, popsize=4, stdev=0.05)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_search_space_entries_are_builder_options(name):
    space = SEARCHERS[name].search_space
    assert {"popsize", "lr"} <= set(space)
    for key, entry in space.items():
        assert entry[0] in ("log", "float", "int", "cat")
        if entry[0] in ("log", "float", "int"):
            for value in entry[1:3]:  # both ends are accepted
                build(name, **{key: value})
