"""``lowrank-ga``: compact genomes decode to the networks they stand for, the cross-over's
children equal the dense GA's, fitness equals the dense problem's, exact resume, the
genome's size at the seed preset, and bad options refused.

Device-aware: the ``device`` fixture (tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch

from evotorch_mqa_moe.evolution.crossover import uniform_cross_over
from evotorch_mqa_moe.model import PRESETS, TransformerConfig, lowrank_layout, num_parameters
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import make_searcher
from evotorch_mqa_moe.searchers.lowrank_ga import LowRankGenomeProblem


def small(**changes) -> TransformerConfig:
    base = dict(vocab_size=5, embed_dim=16, num_heads=4, num_layers=2, expert_dim=8,
                num_experts=3, max_seq_len=6)
    base.update(changes)
    return TransformerConfig(**base)


def _problem(device, **changes):
    return TransformerProblem(make_task("reverse", seq_len=6, vocab_size=5), small(**changes),
                              seed=0, device=device)


def _genomes(problem, popsize):
    genomes = LowRankGenomeProblem(problem, rank=2, sigma=0.1)
    batch = genomes.generate_batch(popsize)
    return genomes, batch.values.as_subclass(torch.Tensor).clone()


@pytest.mark.parametrize("gating", ["linear", "attention"])
def test_a_genome_decodes_to_centre_plus_scaled_factor_product(device, gating):
    problem = _problem(device, gating=gating)
    genomes, values = _genomes(problem, 5)
    dense = genomes.dense(values)
    assert dense.shape == (5, problem.solution_length)
    assert torch.equal(dense[0], genomes.shared)  # the first genome is the centre
    factors, vectors = genomes.decode(values)
    for block in lowrank_layout(problem.config):
        got = dense[:, block.offset: block.offset + block.size]
        centre = genomes.shared[block.offset: block.offset + block.size]
        if block.lowrank:
            a, b = factors[block.name]
            want = centre.view(block.rows, block.cols) + a @ b.transpose(1, 2) / math.sqrt(2)
            torch.testing.assert_close(got.view(5, block.rows, block.cols), want,
                                       rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, vectors[:, block.vector_offset:
                                            block.vector_offset + block.size])
    # every matrix entry moves by about sigma = 0.1 (factor entries N(0, sigma) each)
    moved = (dense[1:] - genomes.shared).std().item()
    assert 0.07 < moved < 0.13, moved


def test_cross_over_children_equal_the_dense_gas_on_the_same_parents_and_numbers(device):
    problem = _problem(device)
    genomes, values = _genomes(problem, 8)
    a, b = values[:4], values[4:]
    compact = uniform_cross_over(a, b, groups=genomes.gene_groups("tensor"),
                                 generator=torch.Generator(device=device).manual_seed(3))
    dense = uniform_cross_over(genomes.dense(a), genomes.dense(b),
                               groups=problem.gene_groups("tensor"),
                               generator=torch.Generator(device=device).manual_seed(3))
    for child, want in zip(compact, dense, strict=True):
        torch.testing.assert_close(genomes.dense(child), want, rtol=0, atol=1e-6)
    # and the cross-over did mix the parents (not a copy of one side)
    assert not torch.equal(compact[0], a) and not torch.equal(compact[0], b)


def test_fitness_equals_the_dense_problems_on_the_same_batch(device):
    problem = _problem(device)
    genomes, values = _genomes(problem, 6)
    batch = genomes.generate_batch(6)
    batch.set_values(values)
    genomes.evaluate(batch)
    dense = problem.generate_batch(6)
    dense.set_values(genomes.dense(values))
    problem.data_refresh = "never"  # the compact problem reads epoch 0 too
    problem.evaluate(dense)
    torch.testing.assert_close(batch.evals[:, 0].as_subclass(torch.Tensor),
                               dense.evals[:, 0].as_subclass(torch.Tensor),
                               rtol=1e-5, atol=1e-5)
    assert genomes.evaluations == 6


def test_the_searcher_resumes_exactly(device):
    searcher = make_searcher("lowrank-ga", _problem(device), popsize=16, rank=1)
    centre = searcher.genomes.shared.clone()
    for _ in range(3):
        searcher.step()
    # re-centred before every step after the first: the population stays scored
    assert math.isfinite(searcher.status["mean_eval"])
    assert torch.isfinite(searcher.population.evals).all()
    assert not torch.equal(searcher.genomes.shared, centre)  # the centre moved
    state = searcher.state_dict()
    searcher.step()
    searcher.step()
    resumed = make_searcher("lowrank-ga", _problem(device), popsize=16, rank=1)
    resumed.load_state_dict(state)
    resumed.step()
    resumed.step()
    assert torch.equal(resumed.current_solution(), searcher.current_solution())
    assert resumed.evaluations == searcher.evaluations
    assert searcher.current_solution().shape == (searcher.problem.solution_length,)
    assert torch.isfinite(searcher.current_solution()).all()


def test_the_seed_preset_genome_is_232_288_numbers():
    # the seed's model as described (vocabulary 10,000): 64M parameters, 276x the genome
    config = PRESETS["seed"]
    size = sum(b.rows + b.cols if b.lowrank else b.size for b in lowrank_layout(config))
    assert size == 232_288 and num_parameters(config) == 64_213_544


@pytest.mark.parametrize("options, name", [({"rank": 0}, "rank"), ({"sigma": -1.0}, "sigma"),
                                           ({"granularity": "head"}, "granularity")])
def test_bad_options_are_refused_naming_them(device, options, name):
    with pytest.raises(ValueError, match=name):
        make_searcher("lowrank-ga", _problem(device), popsize=8, **options)


def test_replace_population_refuses_another_shape(device):
    searcher = make_searcher("lowrank-ga", _problem(device), popsize=8)
    searcher.step()
    with pytest.raises(ValueError, match=r"shape \(8, "):
        searcher.algorithm.replace_population(torch.zeros(3, 4, device=device))
