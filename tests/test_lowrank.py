"""Low-rank populations and lowrank-es: the low-rank pass against the dense pass on the
materialised population, the ES update from factors against materialised perturbations,
antithetic cancellation, exact resume, option checks, bf16.

Device-aware: the ``device`` fixture (tests/conftest.py, ``EVOTORCH_MQA_MOE_TEST_DEVICE``)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from evotorch_mqa_moe import TransformerConfig, population_forward
from evotorch_mqa_moe.model import (
    MODES,
    LowRankWeight,
    check_rank,
    init_parameters,
    lowrank_layout,
    num_parameters,
    resolve_dtype,
)
from evotorch_mqa_moe.model import dtypes as model_module
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import make_searcher
from evotorch_mqa_moe.searchers.lowrank_es import LowRankES, LowRankNoise, centered_ranks

REL = 1e-4  # float32, relative to the largest output


def small(**changes) -> TransformerConfig:
    base = dict(vocab_size=7, embed_dim=16, num_heads=4, num_layers=2, expert_dim=8,
                num_experts=3, max_seq_len=9)
    base.update(changes)
    return TransformerConfig(**base)


def population(config, pairs=3, rank=2, sigma=0.1, device="cpu", dtype=torch.float32, seed=0):
    center = init_parameters(config, 1, generator=torch.Generator().manual_seed(seed),
                             dtype=dtype)[0].to(device)
    gen = torch.Generator().manual_seed(seed + 1)  # the same numbers on every device
    noise = LowRankNoise(config, pairs, rank, generator=gen, device=device, dtype=dtype)
    return center, noise, noise.population(center, sigma)


def inputs_for(config, batch=4, seq=9, popsize=None, device="cpu"):
    gen = torch.Generator().manual_seed(5)
    lead = () if popsize is None else (popsize,)
    if config.token_inputs:
        x = torch.randint(0, config.vocab_size, (*lead, batch, seq), generator=gen)
    else:
        x = torch.randn(*lead, batch, seq, config.input_dim, generator=gen)
    return x.to(device)


def assert_close_rel(actual, expected, rel=REL):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x {scale:.3g}"


# ----------------------------------------------------------------------------- the pass
CASES = {
    "mqa": {},
    "gqa": dict(num_kv_heads=2),
    "mha-top1": dict(num_kv_heads=4, top_k=1),
    "top2-causal-learned": dict(top_k=2, causal=True, positional="learned"),
    "post-norm-attention-gate": dict(norm="post", gating="attention", positional="both"),
    "pooled-vectors": dict(vocab_size=None, input_dim=5, output_dim=3, pooling="mean"),
    "pooled-tokens-first-gelu": dict(pooling="first", activation="gelu", top_k=2),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("changes", CASES.values(), ids=CASES)
def test_lowrank_pass_equals_dense_pass_on_the_materialised_population(changes, mode, device):
    config = small(**changes)
    center, noise, _ = population(config, device=device)
    pop = noise.population(center, 0.1, mode=mode)
    x = inputs_for(config, device=device)
    out = pop(x)
    dense = population_forward(config, pop.materialize(), x)
    assert out.shape == dense.shape == (6, *dense.shape[1:])
    assert_close_rel(out, dense)
    # per-individual inputs and chunks of one individual: the same pass
    xs = inputs_for(config, popsize=6, device=device)
    assert_close_rel(pop(xs), population_forward(config, pop.materialize(), xs))
    pop.chunk_size = 1
    assert_close_rel(pop(x), dense)


def test_materialised_individuals_are_centre_plus_scaled_directions():
    config = small(positional="learned")
    center, noise, pop = population(config, pairs=2, rank=2, sigma=0.3, dtype=torch.float64)
    values = pop.materialize()
    for block in lowrank_layout(config):
        got = values[:, block.offset : block.offset + block.size]
        if block.lowrank:
            a, b = noise.a[block.name][0], noise.b[block.name][0]
            direction = (a @ b.T / math.sqrt(2)).reshape(-1)  # unit variance per entry
        else:
            direction = noise.vectors[0, block.vector_offset : block.vector_offset + block.size]
        base = center[block.offset : block.offset + block.size]
        torch.testing.assert_close(got[0], base + 0.3 * direction)
        torch.testing.assert_close(got[1], base - 0.3 * direction)


def test_layout_matrices_and_vectors():
    config = small(positional="learned")
    blocks = {b.name: b for b in lowrank_layout(config)}
    D, E, F = config.embed_dim, config.num_experts, config.expert_dim
    assert (blocks["embed.weight"].rows, blocks["embed.weight"].cols) == (7, D)
    assert (blocks["pos_embed"].rows, blocks["pos_embed"].cols) == (9, D)
    assert (blocks["layers.0.moe.in_weight"].rows, blocks["layers.0.moe.in_weight"].cols) == (
        D, E * F)
    assert (blocks["layers.1.moe.out_weight"].rows,
            blocks["layers.1.moe.out_weight"].cols) == (E * F, D)
    for name in ("layers.0.moe.in_bias", "layers.0.moe.out_bias", "layers.0.norm1.weight",
                 "layers.0.attn.qkv_bias", "head.bias"):
        assert not blocks[name].lowrank, name
    assert sum(b.size for b in blocks.values()) == num_parameters(config)


def test_weight_column_slices_and_lookups_match_the_dense_matrices():
    g = torch.Generator().manual_seed(0)
    w = LowRankWeight(torch.randn(6, 5, generator=g), torch.randn(3, 6, 2, generator=g),
                      torch.randn(3, 5, 2, generator=g), 0.7)
    dense = w.materialize()
    assert w.shape == dense.shape == (3, 6, 5) and w.dim() == 3
    torch.testing.assert_close(w[..., 1:4].materialize(), dense[..., 1:4])
    index = torch.tensor([0, 5, 5, 2])
    torch.testing.assert_close(w.lookup(index), dense[:, index])
    per = torch.tensor([[1, 2], [3, 4], [0, 0]])
    torch.testing.assert_close(w.lookup(per), torch.stack([dense[i, per[i]] for i in range(3)]))
    x, bias = torch.randn(3, 4, 6, generator=g), torch.randn(3, 5, generator=g)
    for mode in MODES:  # 4 rows against 6: "auto" takes the factors
        w.mode = mode
        torch.testing.assert_close(w.linear(x, bias), x @ dense + bias[:, None])
        torch.testing.assert_close(w.linear(x[0], None), x[0] @ dense)  # shared rows
        torch.testing.assert_close(w[..., 2:].linear(x, None), x @ dense[..., 2:])
    with pytest.raises(TypeError, match="column slices"):
        w[0]


def test_population_memory_grows_with_p_times_rank_times_rows_plus_cols():
    config = small()
    per_individual = sum(b.rows + b.cols for b in lowrank_layout(config) if b.lowrank)
    vectors = sum(b.size for b in lowrank_layout(config) if not b.lowrank)
    for pairs, rank in ((2, 1), (8, 1), (8, 3)):
        _, _, pop = population(config, pairs=pairs, rank=rank)
        assert pop.nbytes() == 2 * pairs * (rank * per_individual + vectors) * 4
    assert per_individual + vectors < num_parameters(config) / 2


# ----------------------------------------------------------------------------- the ES update
def test_es_update_from_factors_equals_update_from_materialised_perturbations():
    config = small(positional="learned", gating="attention")
    sigma = 0.05
    center, noise, pop = population(config, pairs=5, rank=2, sigma=sigma, dtype=torch.float64)
    fitness = torch.randn(10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    utilities = centered_ranks(fitness).double()
    grad = noise.gradient(utilities, sigma)
    deltas = pop.materialize() - center  # (P, N) = sigma * unit directions
    expected = utilities @ deltas / (10 * sigma**2)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_antithetic_pairs_cancel_exactly():
    config = small()
    center, noise, pop = population(config, pairs=4, rank=2)
    matrices = [w for w in pop.weights().values() if isinstance(w, LowRankWeight)]
    products = torch.cat([torch.bmm(w.a, w.b.transpose(1, 2)).flatten(1) for w in matrices], 1)
    assert torch.equal(products[1::2], -products[0::2])  # each - twin is exactly negated
    assert torch.equal(products.view(4, 2, -1).sum(1), torch.zeros(4, products.shape[1]))
    assert torch.equal(products.view(4, 2, -1).sum(1).mean(0), torch.zeros(products.shape[1]))
    base = torch.cat([center[b.offset : b.offset + b.size] for b in lowrank_layout(config)
                      if not b.lowrank])
    torch.testing.assert_close((pop.vectors[0::2] + pop.vectors[1::2]) / 2,
                               base.expand(4, -1))
    # a fitness that cannot tell a pair's twins apart moves nothing (tied utilities)
    pair_fitness = torch.arange(4.0).repeat_interleave(2)
    grad = noise.gradient(centered_ranks(pair_fitness), 0.1)
    assert torch.equal(grad, torch.zeros_like(grad))
    # and neither does Adam on it: the centre stays bit for bit
    es = make_searcher("lowrank-es", tiny_problem(), popsize=8)
    before = es.current_solution()
    es.problem.task.fitness = lambda model, generator: torch.arange(4.0).repeat_interleave(2)
    es.step()
    assert torch.equal(es.current_solution(), before)


def test_centered_ranks_share_ties_and_span_half():
    u = centered_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0, 10.0]))
    torch.testing.assert_close(u, torch.tensor([0.25, -0.5, -0.125, -0.125, 0.5]))
    assert float(u.sum()) == 0.0


class LinearTask:
    """Fitness <theta_i, g> of the materialised individuals: the ES must find g."""

    name, batch_size, target_metric = "linear", 1, "score"

    def __init__(self, g):
        self.g = g

    def default_config(self):
        return small(embed_dim=8, num_heads=2, num_layers=1, expert_dim=4, num_experts=2)

    def fitness(self, model, generator):
        return model.materialize().float() @ self.g

    def metrics(self, model):
        return {"score": model(torch.zeros(1, 1, dtype=torch.long)).sum((1, 2, 3)) * 0}


def test_es_gradient_points_up_a_linear_fitness():
    task = LinearTask(torch.randn(num_parameters(LinearTask(None).default_config()),
                                  generator=torch.Generator().manual_seed(0)))
    problem = TransformerProblem(task, seed=0)
    es = LowRankES(problem, popsize=400, sigma=0.1, rank=1)
    noise, pop = es.sample()
    fitness = task.fitness(pop, None)
    grad = noise.gradient(centered_ranks(fitness), 0.1)
    cosine = torch.nn.functional.cosine_similarity(grad, task.g, dim=0)
    assert cosine > 0.3, float(cosine)
    before = es.current_solution() @ task.g
    for _ in range(5):
        es.step()
    assert es.current_solution() @ task.g > before


# ----------------------------------------------------------------------------- the searcher
def tiny_problem(seed=0, **kwargs):
    task = make_task("reverse")
    config = task.default_config().replace(embed_dim=8, num_heads=2, expert_dim=8)
    return TransformerProblem(task, config, seed=seed, **kwargs)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("options", [{}, {"optimizer": "clipup", "rank": 2}],
                         ids=["adam", "clipup-rank2"])
def test_exact_resume_and_checkpoint_holds_no_population(options, device):
    a = make_searcher("lowrank-es", tiny_problem(device=device), popsize=8, **options)
    for _ in range(3):
        a.step()
    state = roundtrip(a.state_dict())
    N = a.problem.solution_length
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in state["optimizer"].values() if isinstance(v, torch.Tensor)]
    for t in tensors:  # the centre, optimiser moments, generator state: nothing per individual
        assert t.numel() in (N,) or t.dtype == torch.uint8, t.shape
    b = make_searcher("lowrank-es", tiny_problem(device=device), popsize=8, **options)
    b.step()  # another state, overwritten entirely
    b.load_state_dict(state)
    assert b.evaluations == a.evaluations == 24
    for _ in range(2):
        a.step()
        b.step()
    assert torch.equal(a.current_solution(), b.current_solution())
    assert a.status["best_eval"] == b.status["best_eval"]
    assert a.status["pop_best_eval"] == b.status["pop_best_eval"]
    with pytest.raises(ValueError, match="not a LowRankES state_dict"):
        b.load_state_dict({"kind": "PGPE"})


@pytest.mark.parametrize("options, match", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": 3}, r"rank must be <= min\(rows, cols\) = 2 .*got 3"),
    ({"rank": 1.5}, "got 1.5"),
    ({"sigma": 0.0}, "sigma must be a positive number, got 0.0"),
    ({"sigma": -0.1}, "got -0.1"),
    ({"sigma": float("nan")}, "got nan"),
    ({"lr": 0}, "lr must be a positive number, got 0"),
    ({"optimizer": "sgd"}, "optimizer must be one of .*got 'sgd'"),
    ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1.0"),
    ({"popsize": 7}, "even integer >= 2 .*got 7"),
])
def test_bad_options_name_the_value(options, match):
    options = {"popsize": 8, **options}
    with pytest.raises(ValueError, match=match):
        make_searcher("lowrank-es", tiny_problem(), **options)


def test_check_rank_names_the_limiting_matrix():
    config = small(num_experts=2)
    assert check_rank(config, 2) == 2
    with pytest.raises(ValueError, match=r"\(layers.0.moe.gate_weight is 16 x 2\), got 3"):
        check_rank(config, 3)


# ----------------------------------------------------------------------------- bf16
def test_bf16_unsupported_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(model_module, "_dtype_works", lambda dtype, device: False)
    with pytest.raises(ValueError, match="dtype bfloat16 is not supported on device cpu"):
        tiny_problem(compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float64, "
                                         "got 'float16'"):
        resolve_dtype("float16")
    assert resolve_dtype("float32") == torch.float32  # float32 is never probed


def test_bf16_pass_is_close_to_float32_and_fitness_stays_float32(device):
    config = small(positional="learned", causal=True)
    center, noise, pop32 = population(config, pairs=4, rank=1, device=device)
    pop16 = noise.population(center, 0.1, dtype=torch.bfloat16, output_dtype=torch.float32)
    x = inputs_for(config, device=device)
    out32, out16 = pop32(x), pop16(x)
    assert out16.dtype == torch.float32 and pop16.compute_dtype == torch.bfloat16
    assert_close_rel(out16, out32, rel=0.1)  # bf16 keeps 8 bits of mantissa
    assert not torch.equal(out16, out32)
    es = make_searcher("lowrank-es", tiny_problem(device=device, compute_dtype="bfloat16"),
                       popsize=8)
    es.step()
    assert es.center.dtype == torch.float32 and math.isfinite(es.status["mean_eval"])
    noise, pop = es.sample()
    assert pop.compute_dtype == torch.bfloat16 and noise.dtype == torch.float32


def test_dense_problem_runs_bf16_forward_with_float32_fitness(device):
    p32, p16 = tiny_problem(device=device), tiny_problem(device=device,
                                                         compute_dtype="bfloat16")
    values = p32.init_population(6)
    model16 = p16.population_model(values)
    tokens = torch.randint(0, 8, (4, 8), device=device)
    out16, out32 = model16(tokens), p32.population_model(values)(tokens)
    assert out16.dtype == torch.float32
    assert_close_rel(out16, out32, rel=0.1)
    assert not torch.equal(out16, out32)


@pytest.mark.cuda
def test_cuda_lowrank_pass_matches_cpu(device):
    config = small(top_k=2, causal=True)
    _, _, cpu = population(config)
    center, noise, gpu = population(config, device=device)
    x = inputs_for(config)
    assert_close_rel(gpu(x.to(device)).cpu(), cpu(x), rel=1e-3)
    assert resolve_dtype("bfloat16", device) == torch.bfloat16


# ----------------------------------------------------------------------------- run / compare
TINY = ["--model", "embed_dim=8", "--model", "num_heads=2", "--model", "expert_dim=8"]


def _run(out, generations, *extra):
    from evotorch_mqa_moe.workflow.cli import main

    return main(["run", "reverse", "--searcher", "lowrank-es", "--popsize", "8",
                 "--generations", str(generations), "--eval-every", "1", "--checkpoint-every",
                 "2", "--quiet", "--out", str(out), *TINY, *extra])


def test_run_resume_equals_uninterrupted_and_records_dtype(tmp_path):
    import pandas as pd

    assert _run(tmp_path / "full", 4) == 0
    assert _run(tmp_path / "cut", 2) == 0
    assert _run(tmp_path / "cut", 4, "--resume") == 0
    full, cut = (pd.read_csv(tmp_path / p / "history.csv") for p in ("full", "cut"))
    pd.testing.assert_frame_equal(full.drop(columns="wall_time"), cut.drop(columns="wall_time"))
    a, b = (torch.load(tmp_path / p / "best_model.pt", weights_only=True)["state_dict"]
            for p in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # bf16: recorded with the run; a float32 resume of it is refused, naming the field
    assert _run(tmp_path / "bf16", 2, "--dtype", "bfloat16") == 0
    ckpt = torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)
    assert ckpt["settings"]["dtype"] == "bfloat16"
    assert "dtype" not in torch.load(tmp_path / "full" / "checkpoint.pt",
                                     weights_only=True)["settings"]
    assert _run(tmp_path / "bf16", 3, "--resume") == 2


def test_preset_gives_the_preset_architecture_with_the_task_io(tmp_path):
    import json

    out = tmp_path / "seed"
    assert _run(out, 1, "--preset", "seed", "--model", "num_layers=1") == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["embed_dim"] == 8 and config["num_layers"] == 1  # --model on top
    assert (config["num_experts"], config["norm"], config["max_seq_len"]) == (4, "post", 512)
    task = make_task("reverse").default_config()
    assert (config["vocab_size"], config["output_dim"], config["causal"]) == (
        task.vocab_size, task.output_dim, task.causal)


def test_compare_runs_lowrank_es(tmp_path):
    from evotorch_mqa_moe.workflow.compare import compare

    table = compare("reverse", ["lowrank-es"], seeds=1, max_evals=16, out=tmp_path,
                    popsize=8, model={"embed_dim": 8, "num_heads": 2, "expert_dim": 8},
                    dtype="bfloat16")
    assert list(table["searcher"]) == ["lowrank-es"] and int(table["evaluations"][0]) == 16


def test_clipup_skips_a_zero_estimate_instead_of_making_the_centre_nan():
    # every fitness tied: the estimate is 0 and EvoTorch's ClipUp would divide 0 by 0
    es = make_searcher("lowrank-es", tiny_problem(), popsize=8, optimizer="clipup")
    before = es.current_solution()
    es.problem.task.fitness = lambda model, generator: torch.zeros(8)
    es.step()
    assert torch.equal(es.current_solution(), before)
