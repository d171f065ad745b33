"""Regenerated (seeded) low-rank noise: bit-for-bit equal to the same noise stored, in
any chunking and with 1 or 2 threads; antithetic pairs cancel; the ES estimate from
chunks equals the stored one; nothing per individual is kept; the key hash.

Device-aware: the ``device`` fixture (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from evotorch_mqa_moe.evolution.counter_rng import MASK, derive_key, hash32
from evotorch_mqa_moe.model import TransformerConfig, init_parameters
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import make_searcher
from evotorch_mqa_moe.searchers.lowrank_noise import SeededLowRankNoise


def small(**changes) -> TransformerConfig:
    base = dict(vocab_size=7, embed_dim=16, num_heads=4, num_layers=2, expert_dim=8,
                num_experts=3, max_seq_len=9)
    base.update(changes)
    return TransformerConfig(**base)


def center_of(config, device):
    return init_parameters(config, 1, generator=torch.Generator().manual_seed(0))[0].to(device)


def _numbers(weight):
    """(P, ...) every per-individual number of a population weight: factors or vectors."""
    if hasattr(weight, "a"):  # a LowRankWeight
        return torch.cat([weight.a.flatten(1), weight.b.flatten(1)], 1)
    return weight.flatten(1)


@pytest.mark.parametrize("threads", [1, 2])
def test_regenerated_noise_equals_stored_noise_bit_for_bit(threads, device):
    config, pairs = small(gating="attention"), 7
    noise = SeededLowRankNoise(config, pairs, 2, seed=99, device=device)
    center = center_of(config, device)
    tokens = torch.randint(0, 7, (3, 9), generator=torch.Generator().manual_seed(1)).to(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stored = noise.stored().population(center, 0.1)
        reference = stored(tokens)
        whole = {name: _numbers(w) for name, w in stored.weights().items()}
        for chunk_size in (1, 7, 2 * pairs):
            regenerated = noise.population(center, 0.1, chunk_size=chunk_size)
            same_chunks = noise.stored().population(center, 0.1, chunk_size=chunk_size)
            out = regenerated(tokens)
            assert torch.equal(out, same_chunks(tokens))
            # other chunkings group the GEMMs differently: equal to float rounding
            assert (out - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
            for start in range(0, 2 * pairs, chunk_size):
                stop = min(2 * pairs, start + chunk_size)
                for name, w in regenerated.weights(start, stop).items():
                    assert torch.equal(_numbers(w), whole[name][start:stop]), name
    finally:
        torch.set_num_threads(before)


def test_a_pair_is_the_same_whichever_pairs_are_drawn_with_it(device):
    noise = SeededLowRankNoise(small(), 9, 1, seed=5, device=device)
    everything = noise.stored()
    part = noise.stored(3, 6)
    assert torch.equal(part.vectors, everything.vectors[3:6])
    for name in everything.a:
        assert torch.equal(part.a[name], everything.a[name][3:6])
        assert torch.equal(part.b[name], everything.b[name][3:6])
    other_seed = SeededLowRankNoise(small(), 9, 1, seed=6, device=device).stored()
    assert not torch.equal(other_seed.vectors, everything.vectors)


def test_antithetic_pairs_cancel(device):
    config = small()
    noise = SeededLowRankNoise(config, 4, 2, seed=3, device=device)
    center = center_of(config, device)
    dense = noise.population(center, 0.2).materialize()  # (8, N)
    torch.testing.assert_close((dense[0::2] + dense[1::2]) / 2, center.expand(4, -1),
                               atol=1e-6, rtol=0)
    tied = torch.tensor([1.0, 1.0, -2.0, -2.0, 0.5, 0.5, 3.0, 3.0], device=device)
    assert noise.gradient(tied, 0.2).abs().max().item() == 0.0


@pytest.mark.parametrize("chunk_pairs", [1, 3, 64])
def test_the_estimate_from_regenerated_chunks_equals_the_stored_one(chunk_pairs, device):
    config = small(num_kv_heads=2)
    noise = SeededLowRankNoise(config, 6, 2, seed=11, device=device, chunk_pairs=chunk_pairs)
    utilities = torch.linspace(-0.5, 0.5, 12, device=device)[torch.randperm(12)]
    reference = noise.stored().gradient(utilities, 0.05)
    got = noise.gradient(utilities, 0.05)
    assert (got - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_the_seeded_population_stores_nothing_per_individual(device):
    config = small()
    noise = SeededLowRankNoise(config, 500, 1, seed=1, device=device)
    population = noise.population(center_of(config, device), 0.1)
    assert population.popsize == 1000 and population.nbytes() == 0
    assert population.factors is None and population.vectors is None


def _problem(device):
    return TransformerProblem(make_task("reverse", seq_len=6, vocab_size=5),
                              small(vocab_size=5, max_seq_len=6), seed=0, device=device)


def test_lowrank_es_keeps_no_per_individual_state_and_resumes_exactly(device):
    es = make_searcher("lowrank-es", _problem(device), popsize=40)
    for _ in range(2):
        es.step()
    state = es.state_dict()
    sizes = [v.numel() for v in state["optimizer"].values() if isinstance(v, torch.Tensor)]
    assert state["center"].numel() == es.problem.solution_length
    assert all(n in (0, 1, es.problem.solution_length) for n in sizes)
    es.step()
    es.step()
    resumed = make_searcher("lowrank-es", _problem(device), popsize=40)
    resumed.load_state_dict(state)
    resumed.step()
    resumed.step()
    assert torch.equal(resumed.center, es.center)


def test_stored_and_seeded_noise_are_both_offered_and_a_bad_choice_is_refused(device):
    stored = make_searcher("lowrank-es", _problem(device), popsize=8, noise="stored")
    stored.step()
    with pytest.raises(ValueError, match="noise must be one of"):
        make_searcher("lowrank-es", _problem(device), popsize=8, noise="hashed")


def test_the_key_hash_is_a_permutation_like_mix_and_order_sensitive():
    assert hash32(12345) == hash32(torch.tensor([12345])).item()
    words = hash32(torch.arange(100_000))
    assert words.unique().numel() == 100_000 and int(words.max()) <= MASK
    assert derive_key(1, 2) != derive_key(2, 1)
    assert derive_key(1, 2**40) != derive_key(1, 0)
    # bits are balanced: each of the 32 output bits is set in ~half of the words
    bits = torch.stack([(words >> i) & 1 for i in range(32)]).float().mean(1)
    assert ((bits - 0.5).abs() < 0.01).all()
