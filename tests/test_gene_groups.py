"""Gene groups of the flat solution vector: partitions, and the units each level names."""

import math

import pytest
import torch

from evotorch_mqa_moe.model import (
    GENE_GROUP_LEVELS,
    MQAMoETransformer,
    TransformerConfig,
    gene_groups,
    num_parameters,
    parameter_layout,
)
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task

BASE = dict(vocab_size=7, embed_dim=12, num_layers=2, num_heads=4, num_kv_heads=1,
            expert_dim=5, num_experts=3, max_seq_len=6)
CONFIGS = {
    "mqa": TransformerConfig(**BASE),
    "gqa-topk-learned-post": TransformerConfig(**{**BASE, "num_kv_heads": 2}, top_k=2,
                                               positional="learned", norm="post"),
    "mha-both-pooled": TransformerConfig(**{**BASE, "num_kv_heads": 4}, positional="both",
                                         pooling="mean", output_dim=3),
    "vector-inputs-none-first": TransformerConfig(
        **{**BASE, "vocab_size": None, "num_layers": 1}, input_dim=4, output_dim=2,
        positional="none", pooling="first", top_k=1,
    ),
    "attention-gating": TransformerConfig(**BASE, gating="attention"),
    "attention-gating-gqa-topk-causal-post": TransformerConfig(
        **{**BASE, "num_kv_heads": 2}, gating="attention", top_k=2, causal=True, norm="post",
        positional="learned",
    ),
}


def views(config, ids):
    """name -> ids of that parameter, shaped like it (flat registration order)."""
    out, offset = {}, 0
    for name, shape in parameter_layout(config):
        size = math.prod(shape)
        out[name] = ids[offset : offset + size].view(shape)
        offset += size
    return out


def sizes(ids):
    return torch.bincount(ids)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("level", GENE_GROUP_LEVELS)
def test_every_level_is_a_dense_partition_of_all_genes(name, level):
    config = CONFIGS[name]
    ids = gene_groups(config, level)
    assert ids.shape == (num_parameters(config),) and ids.dtype == torch.int64
    assert int(ids.min()) == 0
    # every id in 0..G-1 names a non-empty group: G groups cover the N genes once each
    assert bool((sizes(ids) > 0).all())
    # ids are numbered in order of first use along the vector
    first = torch.full((int(ids.max()) + 1,), len(ids)).scatter_reduce(
        0, ids, torch.arange(len(ids)), "amin")
    assert bool((first[1:] > first[:-1]).all())
    # every level is a refinement of "layer": no group straddles two stages
    layer = gene_groups(config, "layer")
    assert bool((layer == layer[_first_member(ids)][ids]).all())


def _first_member(ids):
    """(G,) index of one gene of each group."""
    return torch.full((int(ids.max()) + 1,), len(ids)).scatter_reduce(
        0, ids, torch.arange(len(ids)), "amin")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_tensor_and_layer_counts(name):
    config = CONFIGS[name]
    n = num_parameters(config)
    assert torch.equal(gene_groups(config, "parameter"), torch.arange(n))
    tensor = views(config, gene_groups(config, "tensor"))
    assert len(torch.unique(gene_groups(config, "tensor"))) == len(parameter_layout(config))
    for t in tensor.values():  # each tensor one group, distinct from every other
        assert bool((t == t.reshape(-1)[0]).all())
    assert len({int(t.reshape(-1)[0]) for t in tensor.values()}) == len(tensor)
    layer = views(config, gene_groups(config, "layer"))
    assert int(gene_groups(config, "layer").max()) + 1 == config.num_layers + 2
    ids_of = {name: {int(v) for v in t.unique()} for name, t in layer.items()}
    for i in range(config.num_layers):
        in_layer = set().union(*(v for k, v in ids_of.items() if k.startswith(f"layers.{i}.")))
        assert len(in_layer) == 1
    stage_in = set().union(*(v for k, v in ids_of.items() if k.startswith(("embed", "pos"))))
    stage_out = set().union(*(v for k, v in ids_of.items()
                              if k.startswith(("head", "final_norm"))))
    assert len(stage_in) == len(stage_out) == 1 and stage_in != stage_out


def _check_units(pairs, ids_count):
    """Each unit (a list of id tensors that must be one group) is one group, exactly."""
    seen = set()
    for parts in pairs:
        values = torch.cat([p.reshape(-1) for p in parts])
        assert bool((values == values[0]).all()), "a unit is split across groups"
        gid = int(values[0])
        assert gid not in seen, "two units share a group"
        seen.add(gid)
        assert int(ids_count[gid]) == values.numel(), "a group holds genes outside its unit"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_row_groups_are_neurons_with_their_bias(name):
    c = CONFIGS[name]
    ids = gene_groups(c, "row")
    v, count = views(c, ids), sizes(ids)
    units = []
    if c.token_inputs:
        units += [[v["embed.weight"][t]] for t in range(c.vocab_size)]  # a token's vector
    else:
        units += [[v["embed.weight"][:, j], v["embed.bias"][j]] for j in range(c.embed_dim)]
    if "pos_embed" in v:
        units += [[v["pos_embed"][t]] for t in range(c.max_seq_len)]
    linear = ["attn.qkv", "attn.out", "moe.gate"]
    if c.gating == "attention":
        linear.append("moe.gate_qk")  # the gate's query/key projection: one unit per column
    for i in range(c.num_layers):
        p = f"layers.{i}."
        for stem in linear:
            w, b = v[p + stem + "_weight"], v[p + stem + "_bias"]
            units += [[w[:, j], b[j]] for j in range(w.shape[1])]
        for norm in ("norm1", "norm2"):
            w, b = v[p + norm + ".weight"], v[p + norm + ".bias"]
            units += [[w[j], b[j]] for j in range(c.embed_dim)]
        w, b = v[p + "moe.in_weight"], v[p + "moe.in_bias"]  # (D, E, F), (E, F)
        units += [[w[:, e, f], b[e, f]] for e in range(c.num_experts) for f in range(c.expert_dim)]
        w, b = v[p + "moe.out_weight"], v[p + "moe.out_bias"]  # (E, F, D), (E, D)
        units += [[w[e, :, d], b[e, d]] for e in range(c.num_experts) for d in range(c.embed_dim)]
    if c.norm == "pre":
        units += [[v["final_norm.weight"][j], v["final_norm.bias"][j]] for j in range(c.embed_dim)]
    units += [[v["head.weight"][:, o], v["head.bias"][o]] for o in range(c.output_dim)]
    _check_units(units, count)
    assert len(units) == len(count)  # every group is one of these units


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_groups_are_query_heads_with_shared_kv_per_tensor(name):
    c = CONFIGS[name]
    H, K, hd = c.num_heads, c.num_kv_heads, c.head_dim
    ids = gene_groups(c, "head")
    v, count = views(c, ids), sizes(ids)
    units, attention = [], set()
    for i in range(c.num_layers):
        p = f"layers.{i}.attn."
        qkv_w, qkv_b, out_w = v[p + "qkv_weight"], v[p + "qkv_bias"], v[p + "out_weight"]
        for h in range(H):
            cols = slice(h * hd, (h + 1) * hd)
            units.append([qkv_w[:, cols], qkv_b[cols], out_w[cols]])
        units.append([qkv_w[:, H * hd:]])  # shared keys and values: one group per tensor
        units.append([qkv_b[H * hd:]])
        assert qkv_w[:, H * hd:].shape[1] == 2 * K * hd
        attention |= {p + "qkv_weight", p + "qkv_bias", p + "out_weight"}
    units += [[t] for name, t in v.items() if name not in attention]  # the rest per tensor
    _check_units(units, count)
    assert len(units) == len(count)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_expert_groups_hold_each_experts_weights_and_gate(name):
    c = CONFIGS[name]
    ids = gene_groups(c, "expert")
    v, count = views(c, ids), sizes(ids)
    units, moe = [], set()
    for i in range(c.num_layers):
        p = f"layers.{i}.moe."
        for e in range(c.num_experts):
            units.append([v[p + "in_weight"][:, e], v[p + "in_bias"][e], v[p + "out_weight"][e],
                          v[p + "out_bias"][e], v[p + "gate_weight"][:, e], v[p + "gate_bias"][e]])
        moe |= {p + s for s in ("in_weight", "in_bias", "out_weight", "out_bias", "gate_weight",
                                "gate_bias")}
    units += [[t] for name, t in v.items() if name not in moe]  # incl. the gate's gate_qk_*
    _check_units(units, count)
    assert len(units) == len(count)
    if c.gating == "attention":
        assert any(name.endswith("gate_qk_weight") for name in v)
    D, F = c.embed_dim, c.expert_dim
    expert_size = D * F + F + F * D + D + D + 1
    assert int((count == expert_size).sum()) >= c.num_layers * c.num_experts


def test_views_follow_the_modules_flat_order():
    # The layout the tests slice by is the module's own parameter order.
    c = CONFIGS["gqa-topk-learned-post"]
    names = [n for n, _ in MQAMoETransformer(c, device="meta").named_parameters()]
    assert names == [n for n, _ in parameter_layout(c)]


@pytest.mark.parametrize("level", ["Row", "neuron", "", None, 3])
def test_unknown_level_names_the_level_and_the_choices(level):
    with pytest.raises(ValueError, match="parameter.*row.*head.*expert.*tensor.*layer") as info:
        gene_groups(CONFIGS["mqa"], level)
    assert repr(level) in str(info.value)


def test_problem_gene_groups_cached_on_its_device():
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    problem = TransformerProblem(task, config, seed=0)
    ids = problem.gene_groups("expert")
    assert ids is problem.gene_groups("expert")
    assert ids.device == problem.device and ids.shape == (problem.solution_length,)
    assert torch.equal(ids.cpu(), gene_groups(config, "expert"))
    with pytest.raises(ValueError, match="'neuron'"):
        problem.gene_groups("neuron")
    with pytest.raises(ValueError, match="choose from"):
        problem.gene_groups(["row"])
