"""Generation with a key/value cache: cached decoding against recomputing the whole
prefix (every configuration the population tests cover), the population against one
network at a time, the low-rank population against its materialised individuals,
seeded sampling, temperature/top-k edge cases, and refusals naming the bad value.

Device-aware: the ``device`` fixture (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from evotorch_mqa_moe.model import (
    KVCache,
    MQAMoETransformer,
    TransformerConfig,
    cache_nbytes,
    init_parameters,
    population_generate,
    transformer_forward,
)
from evotorch_mqa_moe.model.decoding import _choose, decode
from evotorch_mqa_moe.model.layout import _weight_views
from evotorch_mqa_moe.searchers.lowrank_es import LowRankNoise

TOL = 1e-5  # float32 logits, cached vs recomputed

CASES = {
    "mqa": {},
    "gqa": dict(num_kv_heads=2),
    "mha": dict(num_kv_heads=4),
    "top1": dict(top_k=1),
    "top2-gelu": dict(top_k=2, activation="gelu"),
    "attention-gate": dict(gating="attention"),
    "attention-gate-top1-gqa": dict(gating="attention", top_k=1, num_kv_heads=2),
    "sinusoidal": dict(positional="sinusoidal"),
    "both-post-norm": dict(positional="both", norm="post"),
    "one-layer-one-head": dict(num_layers=1, num_heads=1, num_kv_heads=1, embed_dim=8),
}


def causal(**changes) -> TransformerConfig:
    base = dict(vocab_size=11, embed_dim=16, num_heads=4, num_kv_heads=1, num_layers=2,
                expert_dim=8, num_experts=3, max_seq_len=24, causal=True)
    base.update(changes)
    return TransformerConfig(**base)


def network(config, device, seed=0):
    torch.manual_seed(seed)
    return MQAMoETransformer(config).to(device)


def prompts_for(config, batch=3, length=5, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=gen).to(device)


def flat(module):
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach()


# ------------------------------------------------------------ cache == recomputation
@pytest.mark.parametrize("changes", CASES.values(), ids=CASES)
def test_cached_decoding_equals_recomputing_the_prefix_at_every_step(changes, device):
    config = causal(**changes)
    weights = dict(network(config, device).named_parameters())
    prompts = prompts_for(config, device=device)
    uniforms = torch.rand(15, 3, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        for u in (None, uniforms):  # greedy and sampled
            cached, cached_logits = decode(config, weights, prompts, 15, uniforms=u)
            full, full_logits = decode(config, weights, prompts, 15, uniforms=u,
                                       use_cache=False)
            assert torch.equal(cached, full)
            assert (cached_logits - full_logits).abs().max().item() <= TOL
            # and the recomputation is the plain forward pass on the final sequence
            whole = transformer_forward(config, weights, full)[:, 4:-1]
            assert (whole - full_logits).abs().max().item() <= TOL


@pytest.mark.parametrize("changes", [{}, dict(num_kv_heads=2, gating="attention")],
                         ids=["mqa", "gqa-attention-gate"])
def test_a_prompt_fed_to_the_cache_in_pieces_gives_the_whole_sequences_outputs(changes,
                                                                               device):
    config = causal(**changes)
    weights = dict(network(config, device).named_parameters())
    tokens = prompts_for(config, length=12, device=device)
    with torch.no_grad():
        whole = transformer_forward(config, weights, tokens)
        cache = KVCache(config, 12)
        pieces = [transformer_forward(config, weights, tokens[:, a:b], cache=cache)
                  for a, b in ((0, 5), (5, 6), (6, 12))]
    assert cache.length == 12
    assert (torch.cat(pieces, dim=1) - whole).abs().max().item() <= TOL


def test_the_cache_holds_one_head_for_mqa_and_h_for_mha_measured_on_its_tensors(device):
    sizes = {}
    for K in (1, 2, 4):
        config = causal(num_kv_heads=K)
        params = init_parameters(config, 5, generator=torch.Generator().manual_seed(0))
        weights = _weight_views(config, params.to(device))
        cache = KVCache(config, 10)
        with torch.no_grad():
            transformer_forward(config, weights, prompts_for(config, device=device),
                                cache=cache)
        assert cache.keys(0).shape == (5, 3, K, 5, config.head_dim)  # (P, B, K, T, hd)
        assert cache.values(1).shape == (5, 3, K, 5, config.head_dim)
        sizes[K] = cache.nbytes()
        assert sizes[K] == cache_nbytes(config, 3, 10, popsize=5)
    assert sizes[4] == 4 * sizes[1] and sizes[2] == 2 * sizes[1]


# ------------------------------------------------------------ population == one by one
@pytest.mark.parametrize("changes", [{}, dict(num_kv_heads=2, top_k=1),
                                     dict(gating="attention", positional="sinusoidal")],
                         ids=["mqa", "gqa-top1", "attention-gate-sinusoidal"])
def test_population_generate_equals_each_network_generating_alone(changes, device):
    config = causal(**changes)
    params = init_parameters(config, 4, generator=torch.Generator().manual_seed(0)).to(device)
    prompts = prompts_for(config, device=device)
    together, logits = population_generate(config, params, prompts, 10, greedy=True,
                                           chunk_size=3, return_logits=True)
    assert together.shape == (4, 3, 15) and logits.shape == (4, 3, 10, config.vocab_size)
    module = MQAMoETransformer(config).to(device)
    for i in range(4):
        torch.nn.utils.vector_to_parameters(params[i], module.parameters())
        assert torch.equal(module.generate(prompts, 10, greedy=True), together[i])


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_sampled_tokens_do_not_depend_on_the_chunk_size(chunk_size, device):
    config = causal(num_kv_heads=2)
    params = init_parameters(config, 5, generator=torch.Generator().manual_seed(0)).to(device)
    prompts = prompts_for(config, device=device)

    def run(size):
        return population_generate(config, params, prompts, 12, chunk_size=size,
                                   generator=torch.Generator().manual_seed(7))

    assert torch.equal(run(chunk_size), run(5))


def test_a_population_of_one_repeats_the_modules_sampled_generate(device):
    config = causal(top_k=2)
    module = network(config, device)
    prompts = prompts_for(config, device=device)
    alone = module.generate(prompts, 12, temperature=0.8, top_k=4,
                            generator=torch.Generator().manual_seed(3))
    together = population_generate(config, flat(module).unsqueeze(0), prompts, 12,
                                   temperature=0.8, top_k=4,
                                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(alone, together[0])


@pytest.mark.parametrize("changes", [{}, dict(num_kv_heads=2, gating="attention", top_k=1)],
                         ids=["mqa", "gqa-attention-gate-top1"])
def test_the_lowrank_population_generates_as_its_materialised_individuals(changes, device):
    config = causal(**changes)
    center = init_parameters(config, 1, generator=torch.Generator().manual_seed(0))[0]
    noise = LowRankNoise(config, 3, 2, generator=torch.Generator().manual_seed(1),
                         device=device)
    population = noise.population(center.to(device), 0.05)
    prompts = prompts_for(config, device=device)
    lowrank, lowrank_logits = population_generate(config, population, prompts, 10,
                                                  greedy=True, chunk_size=4,
                                                  return_logits=True)
    dense, dense_logits = population_generate(config, population.materialize(), prompts, 10,
                                              greedy=True, return_logits=True)
    assert torch.equal(lowrank, dense)
    assert (lowrank_logits - dense_logits).abs().max().item() <= 1e-4


def test_bf16_decoding_keeps_a_bf16_cache_and_follows_float32(device):
    config = causal()
    params = init_parameters(config, 2, generator=torch.Generator().manual_seed(0)).to(device)
    prompts = prompts_for(config, device=device)
    cache = KVCache(config, 6)
    with torch.no_grad():
        transformer_forward(config, _weight_views(config, params.bfloat16()), prompts, cache=cache)
    assert cache.keys(0).dtype == torch.bfloat16
    _, low = population_generate(config, params.bfloat16(), prompts, 8, greedy=True,
                                 return_logits=True)
    _, low_full = population_generate(config, params.bfloat16(), prompts, 8, greedy=True,
                                      return_logits=True, use_cache=False)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: cached and recomputed agree to bf16 rounding
    assert (low.float() - low_full.float()).abs().max().item() <= 0.05 * low.abs().max().item()


# ------------------------------------------------------------ sampling
def test_the_same_generator_seed_repeats_and_another_differs(device):
    module = network(causal(), device)
    prompts = prompts_for(module.config, device=device)

    def run(seed):
        return module.generate(prompts, 15, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_top1_and_a_tiny_temperature_are_greedy_and_top_vocab_is_no_top_k(device):
    module = network(causal(), device)
    prompts = prompts_for(module.config, device=device)
    greedy = module.generate(prompts, 12, greedy=True)
    gen = torch.Generator().manual_seed
    assert torch.equal(module.generate(prompts, 12, top_k=1, generator=gen(0)), greedy)
    assert torch.equal(module.generate(prompts, 12, temperature=1e-6, generator=gen(0)), greedy)
    assert torch.equal(module.generate(prompts, 12, top_k=11, generator=gen(1)),
                       module.generate(prompts, 12, generator=gen(1)))


def test_one_prompt_as_a_vector_gives_a_vector():
    module = network(causal(), "cpu")
    out = module.generate(torch.tensor([1, 2, 3]), 4, greedy=True)
    assert out.shape == (7,) and out[:3].tolist() == [1, 2, 3]


def test_sampling_frequencies_follow_the_tempered_top_k_distribution():
    # 40,000 draws: each frequency's standard error is <= 0.0025; 0.012 is ~5 of them.
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 3)):
        tokens = _choose(logits.expand(40_000, 5), u, temperature, top_k)
        scaled = logits / temperature
        if top_k is not None:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
        expected = scaled.softmax(-1)
        frequency = torch.bincount(tokens, minlength=5).float() / 40_000
        assert (frequency - expected).abs().max().item() < 0.012
        if top_k is not None:
            assert frequency[expected == 0].sum().item() == 0.0  # never outside the top k


def test_draws_at_the_ends_of_the_unit_interval_pick_a_possible_token():
    logits = torch.tensor([[0.0, -float("inf"), 1.0, -float("inf")]])
    for value in (0.0, 1.0 - 1e-7):
        token = _choose(logits, torch.tensor([value]), 1.0, None).item()
        assert token in (0, 2)


# ------------------------------------------------------------ refusals
@pytest.mark.parametrize("bad, message", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=12), "top_k"),
    (dict(greedy=1), "greedy"),
])
def test_bad_sampling_options_are_refused_naming_them(bad, message):
    module = network(causal(), "cpu")
    with pytest.raises(ValueError, match=message):
        module.generate(torch.tensor([1, 2]), 3, **bad)


def test_a_prompt_too_long_for_max_seq_len_is_refused_naming_both_lengths():
    module = network(causal(max_seq_len=10), "cpu")
    with pytest.raises(ValueError, match=r"prompt length 6 \+ max_new_tokens=5 exceeds "
                                         r"max_seq_len=10"):
        module.generate(torch.zeros(6, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        module.generate(torch.zeros(6, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="token id 11"):
        module.generate(torch.tensor([1, 11]), 2)


@pytest.mark.parametrize("changes, message", [
    (dict(causal=False), "causal=False"),
    (dict(pooling="mean"), "pooling='mean'"),
    (dict(output_dim=3), "output_dim=3"),
])
def test_models_that_cannot_generate_are_refused(changes, message):
    config = causal(**changes)
    params = init_parameters(config, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        population_generate(config, params, torch.tensor([[1, 2]]), 3)
    with pytest.raises(ValueError, match=message):
        MQAMoETransformer(config).generate(torch.tensor([1, 2]), 3)
    if not config.causal:
        with pytest.raises(ValueError, match="causal"):
            KVCache(config, 4)


def test_population_generate_refuses_mismatched_params():
    config = causal()
    with pytest.raises(ValueError, match="columns"):
        population_generate(config, torch.zeros(2, 5), torch.tensor([[1]]), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        population_generate(config, init_parameters(config, 2), torch.tensor([[1]]), 2,
                            chunk_size=0)
