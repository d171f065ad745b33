"""Attention gating (``TransformerConfig(gating="attention")``): twins, causality, context."""

import itertools

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from evotorch_mqa_moe import MQAMoETransformer, TransformerConfig, population_forward
from evotorch_mqa_moe.model import (
    GENE_GROUP_LEVELS,
    MixtureOfExperts,
    gate_logits,
    gene_groups,
    init_parameters,
    moe_gates,
    num_parameters,
    parameter_layout,
)

TOL = 1e-5


def small(**changes):
    base = dict(vocab_size=7, embed_dim=16, num_heads=4, num_layers=2, expert_dim=8,
                num_experts=3, max_seq_len=9)
    base.update(changes)
    return TransformerConfig(**base)


def population(config, popsize, seed=0):
    return init_parameters(config, popsize, generator=torch.Generator().manual_seed(seed))


CASES = list(itertools.product([1, 2], [False, True], [None, 2], ["pre", "post"]))


@pytest.mark.parametrize("kv_heads,causal,top_k,norm", CASES)
def test_population_rows_equal_single_module_with_attention_gating(kv_heads, causal, top_k,
                                                                    norm):
    c = small(num_kv_heads=kv_heads, causal=causal, top_k=top_k, norm=norm,
              positional="learned", gating="attention")
    P = 4
    params = population(c, P)
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 7, (3, 9), generator=gen)
    own = torch.randint(0, 7, (P, 3, 9), generator=gen)
    out_shared = population_forward(c, params, shared)
    out_chunked = population_forward(c, params, shared, chunk_size=3)
    out_own = population_forward(c, params, own, chunk_size=2)
    model = MQAMoETransformer(c)
    for i in range(P):
        vector_to_parameters(params[i], model.parameters())
        with torch.no_grad():
            assert torch.allclose(out_shared[i], model(shared), atol=TOL)
            assert torch.allclose(out_chunked[i], model(shared), atol=TOL)
            assert torch.allclose(out_own[i], model(own[i]), atol=TOL)


def test_linear_gating_is_the_default_and_keeps_the_layout():
    assert small().gating == "linear"
    layout = parameter_layout(small())
    assert not any("gate_qk" in name for name, _ in layout)
    assert parameter_layout(small(gating="linear")) == layout
    # same generator, same flat vector: the default draw is unchanged
    assert torch.equal(population(small(), 2), population(small(gating="linear"), 2))


def test_attention_gating_adds_one_query_key_projection_per_layer():
    c = small(gating="attention")
    hd = c.head_dim
    extra = num_parameters(c) - num_parameters(small())
    assert extra == c.num_layers * (c.embed_dim * 2 * hd + 2 * hd)
    names = [n for n, _ in parameter_layout(c)]
    for i in range(c.num_layers):
        at = names.index(f"layers.{i}.moe.gate_bias")
        assert names[at + 1 : at + 3] == [f"layers.{i}.moe.gate_qk_weight",
                                          f"layers.{i}.moe.gate_qk_bias"]
    model = MQAMoETransformer(c)
    assert names == [n for n, _ in model.named_parameters()]
    assert parameters_to_vector(model.parameters()).numel() == num_parameters(c)
    # the population init uses the same U(+-1/sqrt(D)) rule as the module's
    sizes = [p.numel() for p in model.parameters()]
    qk = dict(zip(names, population(c, 1)[0].split(sizes), strict=True))
    bound = c.embed_dim ** -0.5
    w = qk["layers.0.moe.gate_qk_weight"]
    assert float(w.abs().max()) <= bound and float(w.std()) > 0.3 * bound


@pytest.mark.parametrize("gating", ["Attention", "softmax", "", None, 1])
def test_bad_gating_is_refused_naming_the_value(gating):
    with pytest.raises(ValueError, match="gating") as info:
        small(gating=gating)
    assert repr(gating) in str(info.value)


def _moe(config, seed=0):
    torch.manual_seed(seed)
    return MixtureOfExperts(config)


@pytest.mark.parametrize("top_k", [None, 2])
def test_causal_attention_gate_ignores_later_tokens(top_k):
    c = small(gating="attention", causal=True, top_k=top_k)
    moe = _moe(c)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, c.embed_dim, generator=gen)
    changed = x.clone()
    changed[:, 5:] = torch.randn(4, 4, c.embed_dim, generator=gen)
    with torch.no_grad():
        before, after = moe.gates(x), moe.gates(changed)
        assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
        assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-3)
        # the block output of the earlier tokens is unchanged too
        assert torch.allclose(moe(x)[:, :5], moe(changed)[:, :5], atol=1e-6)


def test_non_causal_attention_gate_reads_later_tokens():
    c = small(gating="attention", causal=False)
    moe = _moe(c)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, c.embed_dim, generator=gen)
    changed = x.clone()
    changed[:, -1] = torch.randn(2, c.embed_dim, generator=gen)
    with torch.no_grad():
        assert not torch.allclose(moe.gates(x)[:, 0], moe.gates(changed)[:, 0], atol=1e-4)


@pytest.mark.parametrize("causal,top_k", itertools.product([False, True], [None, 1]))
def test_first_token_changes_later_gates_only_under_attention_gating(causal, top_k):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 9, 16, generator=gen)
    changed = x.clone()
    changed[:, 0] = torch.randn(8, 16, generator=gen)
    for gating in ("linear", "attention"):
        moe = _moe(small(gating=gating, causal=causal, top_k=top_k, num_experts=4))
        with torch.no_grad():
            later, later_changed = moe.gates(x)[:, 1:], moe.gates(changed)[:, 1:]
        if gating == "linear":
            assert torch.equal(later, later_changed)
        elif top_k is None:
            assert (later - later_changed).abs().amax() > 1e-3
        else:  # top-1: some later token must switch expert
            assert bool((later.argmax(-1) != later_changed.argmax(-1)).any())


def test_gate_logits_are_token_logits_plus_their_attention_mix():
    c = small(gating="attention", causal=True)
    gen = torch.Generator().manual_seed(5)
    D, E, T, hd = c.embed_dim, c.num_experts, 6, c.head_dim
    x = torch.randn(2 * T, D, generator=gen)
    wg, bg = torch.randn(D, E, generator=gen), torch.randn(E, generator=gen)
    wqk, bqk = torch.randn(D, 2 * hd, generator=gen), torch.randn(2 * hd, generator=gen)
    got = gate_logits(x, wg, bg, c, 2, wqk, bqk)
    v = (x @ wg + bg).view(2, T, E)
    q, k = (x @ wqk + bqk).view(2, T, 2 * hd).split(hd, dim=-1)
    scores = q @ k.transpose(-1, -2) / hd**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = v + scores.softmax(-1) @ v
    assert torch.allclose(got, expected.view(2 * T, E), atol=1e-5)
    weights = moe_gates(x, wg, bg, c, 2, wqk, bqk)
    assert torch.allclose(weights.sum(-1), torch.ones(2 * T), atol=1e-6)
    with pytest.raises(ValueError, match="attention"):
        gate_logits(x, wg, bg, c)


def test_population_gates_match_the_module_per_row():
    c = small(gating="attention", top_k=2)
    P, B, T = 3, 2, 7
    params = population(c, P)
    names = [n for n, _ in parameter_layout(c)]
    moe = MixtureOfExperts(c)
    x = torch.randn(P, B * T, c.embed_dim, generator=torch.Generator().manual_seed(6))
    sizes = [p.numel() for p in MQAMoETransformer(c, device="meta").parameters()]
    views = dict(zip(names, params.split(sizes, dim=1), strict=True))
    p = "layers.1.moe."
    w = {k: views[p + k].view(P, *moe.get_parameter(k).shape) for k in
         ("gate_weight", "gate_bias", "gate_qk_weight", "gate_qk_bias")}
    pop = moe_gates(x, w["gate_weight"], w["gate_bias"], c, B, w["gate_qk_weight"],
                    w["gate_qk_bias"])
    for i in range(P):
        for k, t in w.items():
            moe.get_parameter(k).data.copy_(t[i])
        with torch.no_grad():
            assert torch.allclose(pop[i].view(B, T, -1), moe.gates(x[i].view(B, T, -1)),
                                  atol=TOL)


@pytest.mark.parametrize("level", GENE_GROUP_LEVELS)
def test_gene_groups_cover_attention_gating(level):
    c = small(gating="attention")
    ids = gene_groups(c, level)
    assert ids.shape == (num_parameters(c),)
    assert bool((torch.bincount(ids) > 0).all())


def test_attention_gating_trains_by_backprop():
    c = small(gating="attention", causal=True)
    model = MQAMoETransformer(c)
    tokens = torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(7))
    model(tokens).logsumexp(-1).mean().backward()
    grads = dict(model.named_parameters())
    assert float(grads["layers.0.moe.gate_qk_weight"].grad.abs().sum()) > 0


@pytest.mark.parametrize("gating", ["linear", "attention"])
def test_model_routing_per_layer_and_causal(gating):
    c = small(gating=gating, causal=True, top_k=2)
    torch.manual_seed(8)
    model = MQAMoETransformer(c)
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 7, (3, 9), generator=gen)
    changed = tokens.clone()
    changed[:, 6:] = (tokens[:, 6:] + 1) % 7
    with torch.no_grad():
        routing, after = model.routing(tokens), model.routing(changed)
    assert routing.shape == (c.num_layers, 3, 9, c.num_experts)
    assert torch.allclose(routing.sum(-1), torch.ones(c.num_layers, 3, 9), atol=1e-6)
    assert bool(((routing > 0).sum(-1) == 2).all())  # top-2
    assert torch.allclose(routing[:, :, :6], after[:, :, :6], atol=1e-6)
    assert not torch.allclose(routing[:, :, 6:], after[:, :, 6:], atol=1e-4)
