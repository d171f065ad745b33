"""The model: MQA against PyTorch's SDPA, and the population pass against one module at a time."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from evotorch_mqa_moe import (
    MQAMoETransformer,
    MultiQueryAttention,
    PopulationModel,
    TransformerConfig,
    num_parameters,
    population_forward,
    preset,
)
from evotorch_mqa_moe.model import (
    check_inputs,
    default_chunk_size,
    init_parameters,
    parameter_layout,
)
from evotorch_mqa_moe.model.layers import gate_weights

TOL = 1e-5


def small(**changes):
    base = dict(vocab_size=7, embed_dim=16, num_heads=4, num_layers=2, expert_dim=8,
                num_experts=3, max_seq_len=9)
    base.update(changes)
    return TransformerConfig(**base)


def population(config, popsize, seed=0):
    return init_parameters(config, popsize, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kv_heads,causal", itertools.product([1, 2, 4], [False, True]))
def test_attention_matches_sdpa_with_gqa(kv_heads, causal):
    torch.manual_seed(kv_heads)
    c = small(num_kv_heads=kv_heads, causal=causal)
    attn = MultiQueryAttention(c)
    x = torch.randn(3, 9, c.embed_dim)
    H, K, hd = c.num_heads, c.num_kv_heads, c.head_dim
    # Reference: separate projections, SDPA with enable_gqa (query head h reads kv head h // G).
    qkv = x @ attn.qkv_weight + attn.qkv_bias
    q, k, v = qkv.split([H * hd, K * hd, K * hd], dim=-1)
    q = q.view(3, 9, H, hd).transpose(1, 2)
    k = k.view(3, 9, K, hd).transpose(1, 2)
    v = v.view(3, 9, K, hd).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(3, 9, H * hd) @ attn.out_weight + attn.out_bias
    assert torch.allclose(attn(x), ref, atol=TOL)


def test_attention_scale_is_one_over_sqrt_head_dim():
    c = small(num_heads=2, embed_dim=16)  # head_dim 8, not embed_dim 16
    attn = MultiQueryAttention(c)
    x = torch.randn(2, 5, 16)
    hd = c.head_dim
    q, k, v = (x @ attn.qkv_weight + attn.qkv_bias).split([2 * hd, hd, hd], dim=-1)
    q = q.view(2, 5, 2, hd).transpose(1, 2)
    scores = (q @ k.unsqueeze(1).transpose(-1, -2)) / hd**0.5
    ref = (scores.softmax(-1) @ v.unsqueeze(1)).transpose(1, 2).reshape(2, 5, 2 * hd)
    assert torch.allclose(attn(x), ref @ attn.out_weight + attn.out_bias, atol=TOL)


# --------------------------------------------------------------------------- experts


def test_top_k_gate_renormalises_over_chosen_experts():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    w = gate_weights(logits, top_k=2)
    expected = torch.zeros(1, 4)
    expected[0, [1, 2]] = torch.tensor([3.0, 2.0]).softmax(0)
    assert torch.allclose(w, expected)
    assert torch.allclose(gate_weights(logits, None), logits.softmax(-1))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_moe_equals_explicit_sum_over_experts(activation):
    c = small(top_k=2, activation=activation)
    act = F.relu if activation == "relu" else F.gelu
    model = MQAMoETransformer(c)
    moe = model.layers[0].moe
    x = torch.randn(2, 4, c.embed_dim)
    gates = gate_weights(x @ moe.gate_weight + moe.gate_bias, 2)
    ref = sum(
        gates[..., e : e + 1]
        * (act(x @ moe.in_weight[:, e] + moe.in_bias[e]) @ moe.out_weight[e] + moe.out_bias[e])
        for e in range(c.num_experts)
    )
    assert torch.allclose(moe(x), ref, atol=TOL)


# --------------------------------------------------------------------------- population pass

CASES = list(
    itertools.product(
        [1, 2, 4],  # num_kv_heads: MQA, GQA, MHA
        [False, True],  # causal
        [None, 2],  # top_k
        ["pre", "post"],  # norm
    )
)


@pytest.mark.parametrize("kv_heads,causal,top_k,norm", CASES)
def test_population_rows_equal_single_module(kv_heads, causal, top_k, norm):
    c = small(num_kv_heads=kv_heads, causal=causal, top_k=top_k, norm=norm,
              positional="both", activation="gelu" if causal else "relu")
    P = 5
    params = population(c, P)
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 7, (3, 9), generator=gen)
    own = torch.randint(0, 7, (P, 3, 9), generator=gen)
    out_shared = population_forward(c, params, shared)
    out_chunked = population_forward(c, params, shared, chunk_size=2)
    out_own = population_forward(c, params, own, chunk_size=3)
    assert out_shared.shape == (P, 3, 9, 7)
    model = MQAMoETransformer(c)
    for i in range(P):
        vector_to_parameters(params[i], model.parameters())
        with torch.no_grad():
            assert torch.allclose(out_shared[i], model(shared), atol=TOL)
            assert torch.allclose(out_chunked[i], model(shared), atol=TOL)
            assert torch.allclose(out_own[i], model(own[i]), atol=TOL)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "none"])
@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_pooled_vector_inputs_match_module(positional, pooling):
    c = TransformerConfig(input_dim=3, output_dim=2, embed_dim=8, num_heads=2, num_layers=1,
                          expert_dim=8, num_experts=2, max_seq_len=6, positional=positional,
                          pooling=pooling)
    params = population(c, 4)
    x = torch.randn(2, 6, 3)
    own = torch.randn(4, 2, 6, 3)
    out, out_own = population_forward(c, params, x), population_forward(c, params, own)
    assert out.shape == (4, 2, 2)
    model = MQAMoETransformer(c)
    for i in range(4):
        vector_to_parameters(params[i], model.parameters())
        with torch.no_grad():
            assert torch.allclose(out[i], model(x), atol=TOL)
            assert torch.allclose(out_own[i], model(own[i]), atol=TOL)


def test_flat_order_is_parameters_to_vector_order():
    c = small()
    model = MQAMoETransformer(c)
    vec = parameters_to_vector(model.parameters())
    assert vec.numel() == num_parameters(c)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in parameter_layout(c)] == names
    with torch.no_grad():
        x = torch.randint(0, 7, (2, 9))
        assert torch.allclose(population_forward(c, vec[None], x)[0], model(x), atol=TOL)


def test_weights_are_views_not_copies():
    from evotorch_mqa_moe.model.layout import _weight_views

    c = small()
    params = population(c, 3)
    for view in _weight_views(c, params).values():
        assert view.untyped_storage().data_ptr() == params.untyped_storage().data_ptr()


def test_causal_outputs_ignore_future_tokens():
    c = small(causal=True)
    params = population(c, 3)
    x = torch.randint(0, 7, (2, 9), generator=torch.Generator().manual_seed(3))
    base = population_forward(c, params, x)
    for t in range(9):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 7
        out = population_forward(c, params, changed)
        assert torch.equal(out[:, :, :t], base[:, :, :t])
        assert not torch.allclose(out[:, :, t], base[:, :, t])


def test_positions_are_distinguishable():
    # The seed had no positional information: a permutation-equivariant model.
    x = torch.tensor([[1, 2, 3, 4]])
    for positional, equivariant in [("none", True), ("sinusoidal", False), ("learned", False)]:
        c = small(positional=positional, max_seq_len=4)
        out = population_forward(c, population(c, 1), x)[0, 0]
        flipped = population_forward(c, population(c, 1), x.flip(-1))[0, 0].flip(0)
        assert torch.allclose(out, flipped, atol=TOL) == equivariant


def test_population_model_from_module_and_init_is_seeded():
    c = small()
    model = MQAMoETransformer(c)
    pm = PopulationModel.from_module(model)
    x = torch.randint(0, 7, (2, 9))
    with torch.no_grad():
        assert torch.allclose(pm(x)[0], model(x), atol=TOL)
    assert pm.popsize == 1
    assert torch.equal(population(c, 3, seed=5), population(c, 3, seed=5))
    assert not torch.equal(population(c, 3, seed=5), population(c, 3, seed=6))
    p = population(c, 1)[0]
    model.reset_parameters(torch.Generator().manual_seed(0))
    assert torch.equal(parameters_to_vector(model.parameters()), p)
    # LayerNorm weights start at one (EvoTorch's default bounds would give ~0).
    assert torch.all(dict(model.named_parameters())["layers.0.norm1.weight"] == 1)


def test_default_chunk_size_follows_memory_budget():
    c = preset("bench-a")
    small_budget = default_chunk_size(c, 512, "cpu", memory_budget=4 << 20)
    big_budget = default_chunk_size(c, 512, "cpu", memory_budget=64 << 20)
    assert 1 <= small_budget < big_budget
    assert default_chunk_size(c, 512, "cpu", memory_budget=1) == 1


def test_seed_preset_size():
    c = preset("seed")
    assert (c.vocab_size, c.embed_dim, c.num_layers, c.num_heads) == (10000, 512, 6, 8)
    assert (c.num_experts, c.expert_dim, c.num_kv_heads) == (4, 2048, 1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field,value",
    [("embed_dim", 0), ("num_heads", 3), ("num_kv_heads", 3), ("top_k", 4), ("norm", "mid"),
     ("positional", "rope"), ("pooling", "max"), ("max_seq_len", -1), ("vocab_size", 1.5),
     ("causal", "yes"), ("num_layers", True)],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        small(**{field: value})


def test_config_needs_exactly_one_input_kind():
    with pytest.raises(ValueError, match="exactly one"):
        TransformerConfig(vocab_size=4, input_dim=3)
    with pytest.raises(ValueError, match="exactly one"):
        TransformerConfig()
    with pytest.raises(ValueError, match="output_dim"):
        TransformerConfig(input_dim=3)


def test_population_forward_rejects_bad_input():
    c = small()
    N = num_parameters(c)
    params = population(c, 2)
    x = torch.randint(0, 7, (2, 9))
    with pytest.raises(ValueError, match=f"N={N}"):
        population_forward(c, params[:, :-1], x)
    with pytest.raises(ValueError, match="token id 7"):
        population_forward(c, params, torch.full((2, 9), 7))
    with pytest.raises(ValueError, match="token id -1"):
        population_forward(c, params, torch.full((2, 9), -1))
    with pytest.raises(ValueError, match="max_seq_len=9"):
        population_forward(c, params, torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        population_forward(c, params, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="3 rows"):
        population_forward(c, params, torch.zeros(3, 2, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        population_forward(c, params, torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"\(P, N\)"):
        population_forward(c, params[0], x)
    with pytest.raises(ValueError, match="chunk_size"):
        population_forward(c, params, x, chunk_size=0)
    with pytest.raises(TypeError, match="TransformerConfig"):
        population_forward({"vocab_size": 7}, params, x)
    v = TransformerConfig(input_dim=3, output_dim=2, embed_dim=8, num_heads=2, max_seq_len=4)
    with pytest.raises(ValueError, match="input_dim=3"):
        population_forward(v, population(v, 1), torch.zeros(1, 4, 5))
    with pytest.raises(TypeError, match="floating"):
        population_forward(v, population(v, 1), torch.zeros(1, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token id"):
        MQAMoETransformer(c)(torch.full((1, 3), 99))


def test_expert_bias_row_is_a_view_of_the_flat_vector():
    from evotorch_mqa_moe.model.layers import _stack_bias_row
    from evotorch_mqa_moe.model.layout import _weight_views

    c = small()
    views = _weight_views(c, population(c, 3))
    w, b = views["layers.0.moe.in_weight"].flatten(-2), views["layers.0.moe.in_bias"].flatten(-2)
    stacked = _stack_bias_row(w, b)
    assert stacked.data_ptr() == w.data_ptr()  # no copy
    assert torch.equal(stacked, torch.cat([w, b.unsqueeze(-2)], dim=-2))
    # separate tensors (the nn.Module's parameters) are stacked by copying
    module = MQAMoETransformer(c).layers[0].moe
    stacked = _stack_bias_row(module.in_weight.flatten(-2), module.in_bias.flatten(-2))
    assert torch.equal(stacked[-1], module.in_bias.flatten())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_every_accepted_token_dtype_gives_the_int64_outputs(dtype):
    c = small()
    params = population(c, 2)
    x = torch.randint(0, 7, (3, 9), generator=torch.Generator().manual_seed(0))
    expected = population_forward(c, params, x)
    assert torch.equal(population_forward(c, params, x.to(dtype)), expected)
    module = MQAMoETransformer(c)
    vector_to_parameters(params[0], module.parameters())
    with torch.no_grad():
        assert torch.allclose(module(x.to(dtype)), expected[0], atol=TOL)
    with pytest.raises(ValueError, match="token id 7"):
        population_forward(c, params, torch.full((2, 9), 7, dtype=dtype))


# --------------------------------------------------------------------------- host reads

HOST_READS = {"__int__", "__bool__", "__float__", "__index__", "item", "tolist", "numpy", "cpu"}


class _Calls(torch.overrides.TorchFunctionMode):
    """Records the name of every torch function and tensor method called."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_population_pass_reads_back_once_after_every_chunk_is_queued():
    # On a GPU every read-back stalls the host until the device is done; the pass
    # must queue all its work first (four chunks here) and read back once, at the end.
    c = small()
    params = population(c, 4)
    x = torch.randint(0, 7, (3, 9))
    with _Calls() as calls:
        population_forward(c, params, x, chunk_size=1)
    reads = [i for i, name in enumerate(calls.names) if name in HOST_READS]
    gemms = [i for i, name in enumerate(calls.names) if name in ("baddbmm", "matmul", "bmm")]
    assert len(reads) == 1 and reads[0] > gemms[-1], [calls.names[i] for i in reads]
    # a caller that validated this batch already (check_inputs) reads nothing back
    check_inputs(c, x, popsize=4)
    with _Calls() as calls:
        population_forward(c, params, x, chunk_size=1, validate=False)
    assert not HOST_READS & set(calls.names)
