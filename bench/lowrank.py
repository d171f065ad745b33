"""Low-rank populations (lowrank-es): pass speed, memory, bf16 accuracy, seed-size generations.

Run:  .venv/bin/python bench/lowrank.py [--threads 2] [--sections pass,generation,growth,bf16,seed]
      .venv/bin/python bench/lowrank.py --device cuda --dtype bfloat16 --seed-popsize 1024

Sections (each prints a table; the last line is ``JSON {...}`` with every number):

* ``pass``: config A (P=256, B=32, T=16): the low-rank pass (mode ``auto`` and
  ``factors``) against the dense population pass on the materialised population and
  against the shared-GEMM floor (one network over the same P*B*T rows, in pieces of
  the pass's chunk), timed in interleaved rounds (medians); GFLOP/s and % of a
  2048^3 ``torch.mm``; peak memory of each in a fresh process (population + pass).
* ``generation``: one generation of ``pgpe`` (dense P x N population) and of
  ``lowrank-es`` at config A on ``reverse`` (vocab 16, T=16, batch 32), P=256:
  seconds per generation (median) and peak memory (fresh processes).
* ``growth``: bytes of the population's own state (factors + vectors) at P = 64, 256,
  1024 for config A and the seed preset, the fitted bytes per individual (slope)
  against ``r * sum(R + C) + n`` floats and against a dense individual (N floats).
  ``--plot FILE.png`` draws it.
* ``bf16``: the low-rank pass in bfloat16 against float32 on the same population:
  max relative error of the outputs, max |fitness difference| (cross-entropy) and
  Spearman rank correlation of the fitness (what the ES consumes).
* ``seed``: the seed preset (embed 512, 6 layers, 8 heads, 4 experts of 2,048) with the
  ``language`` task's vocabulary, ``lowrank-es`` at ``--seed-popsize`` (256), the task's
  batch shrunk to ``--seed-batch`` sequences of 32: seconds per generation and peak RSS
  (VmHWM) of a fresh process for ``--seed-generations`` generations.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from _machine import machine_report, sync, timed

from evotorch_mqa_moe import num_parameters, population_forward, preset
from evotorch_mqa_moe.model import (
    default_chunk_size,
    init_parameters,
    lowrank_layout,
    preset_overrides,
)
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import make_searcher
from evotorch_mqa_moe.searchers.lowrank_es import LowRankNoise


def forward_flops(config, batch: int, seq: int) -> float:
    """Multiply-adds x 2 of one individual's pass (matmuls only; as bench/forward.py)."""
    c, M = config, batch * seq
    qkv = M * c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    scores = batch * c.num_heads * seq * seq * c.head_dim * 2
    out = M * c.num_heads * c.head_dim * c.embed_dim
    gate = M * c.embed_dim * c.num_experts
    experts = 2 * M * c.embed_dim * c.num_experts * c.expert_dim
    head = M * c.embed_dim * c.output_dim
    return 2.0 * (c.num_layers * (qkv + scores + out + gate + experts) + head)


def mm_peak(device, dtype, size: int = 2048, reps: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    return 2 * size**3 / min(timed(lambda: torch.mm(a, b), device) for _ in range(reps))


def _config(name: str, seq: int, vocab: int | None = None):
    base = preset(name)
    changes = {"max_seq_len": max(seq, base.max_seq_len)}
    if vocab is not None:
        changes.update(vocab_size=vocab, output_dim=vocab)
    return base.replace(**changes)


def make_population(config, popsize: int, rank: int, device, dtype, sigma: float = 0.02,
                    seed: int = 0, **kwargs):
    """(centre (N,) float32, noise, population in ``dtype``)."""
    center = init_parameters(config, 1, generator=torch.Generator().manual_seed(seed))[0]
    center = center.to(device)
    noise = LowRankNoise(config, popsize // 2, rank,
                         generator=torch.Generator().manual_seed(seed + 1), device=device)
    return center, noise, noise.population(center, sigma, dtype=dtype, **kwargs)


def pass_methods(config, popsize: int, batch: int, seq: int, device, dtype, rank: int = 1,
                 dense: bool = True) -> dict:
    """name -> callable: low-rank auto / factors, the floor, and the dense pass."""
    center, noise, pop = make_population(config, popsize, rank, device, dtype)
    factors = noise.population(center, 0.02, dtype=dtype, mode="factors")
    tokens = torch.randint(0, config.vocab_size, (batch, seq),
                           generator=torch.Generator().manual_seed(2)).to(device)
    chunk = default_chunk_size(config, batch * seq, device, dtype, seq_len=seq)
    one = center.to(dtype)[None]
    pieces = [torch.randint(0, config.vocab_size, (min(chunk, popsize - s) * batch, seq),
                            generator=torch.Generator().manual_seed(3)).to(device)
              for s in range(0, popsize, chunk)]
    methods = {"lowrank (auto)": lambda: pop(tokens), "lowrank (factors)": lambda: factors(tokens),
               "floor: 1 network, P*B*T rows": lambda: [population_forward(config, one, x)
                                                        for x in pieces]}
    if dense:
        values = pop.materialize()
        methods["dense population"] = lambda: population_forward(config, values, tokens)
    return methods


def section_pass(args) -> dict:
    config = _config("bench-a", args.seq)
    P, dtype = args.popsize, getattr(torch, args.dtype)
    methods = pass_methods(config, P, args.batch, args.seq, args.device, dtype)
    times = {k: [] for k in methods}
    with torch.no_grad():
        for fn in methods.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in methods.items():
                times[name].append(timed(fn, args.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = forward_flops(config, args.batch, args.seq) * P
    peak = mm_peak(args.device, dtype)
    floor, dense = med["floor: 1 network, P*B*T rows"], med["dense population"]
    print(f"\n## pass: config A, P={P}, B={args.batch}, T={args.seq}, {args.dtype}, "
          f"{args.device}, median of {args.rounds} rounds; torch.mm {peak / 1e9:.1f} GFLOP/s")
    print(f"{'method':30s} {'median s':>9s} {'GFLOP/s':>8s} {'% of mm':>8s} {'/ floor':>8s} "
          f"{'dense /':>8s} {'peak MiB':>9s}")
    out = {}
    for name in methods:
        mem = child_memory(args, "pass", name) / 2**20
        rate = flops / med[name]
        print(f"{name:30s} {med[name]:9.3f} {rate / 1e9:8.1f} {100 * rate / peak:7.0f}% "
              f"{med[name] / floor:7.2f}x {dense / med[name]:7.2f}x {mem:9.0f}")
        out[name] = {"median_s": med[name], "gflops": rate / 1e9, "pct_mm": 100 * rate / peak,
                     "vs_floor": med[name] / floor, "dense_over_this": dense / med[name],
                     "peak_mib": mem}
    return out


def _generation_searcher(args, name: str):
    task = make_task("reverse", vocab_size=16, seq_len=args.seq, batch_size=args.batch)
    config = preset("bench-a", max_seq_len=args.seq)
    problem = TransformerProblem(task, config, seed=0, device=args.device,
                                 compute_dtype=args.dtype)
    return make_searcher(name, problem, popsize=args.popsize)


def section_generation(args) -> dict:
    searchers = {name: _generation_searcher(args, name) for name in ("pgpe", "lowrank-es")}
    times = {k: [] for k in searchers}
    for s in searchers.values():
        s.step()
    for _ in range(args.rounds):
        for name, s in searchers.items():
            times[name].append(timed(s.step, args.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: child_memory(args, "generation", k) / 2**20 for k in searchers}
    N = num_parameters(preset("bench-a"))
    print(f"\n## one generation: config A (N={N:,}) on reverse, P={args.popsize}, "
          f"{args.dtype}, {args.device}, median of {args.rounds}")
    print(f"{'searcher':12s} {'s/generation':>12s} {'peak MiB':>9s}")
    for k in searchers:
        print(f"{k:12s} {med[k]:12.3f} {mem[k]:9.0f}")
    ratio_t = med["pgpe"] / med["lowrank-es"]
    ratio_m = mem["pgpe"] / max(mem["lowrank-es"], 1e-9)
    print(f"pgpe / lowrank-es: time {ratio_t:.2f}x, peak memory {ratio_m:.2f}x")
    return {"s_per_generation": med, "peak_mib": mem, "time_ratio_dense_over_lowrank": ratio_t,
            "memory_ratio_dense_over_lowrank": ratio_m}


def section_growth(args) -> dict:
    out = {}
    print("\n## population memory vs P (the population's own state: factors + vectors)")
    print(f"{'preset':8s} {'P':>6s} {'MiB':>9s} {'dense MiB':>10s}")
    for name in ("bench-a", "seed"):
        config = _config(name, args.seq)
        layout = lowrank_layout(config)
        floats = args.rank * sum(b.rows + b.cols for b in layout if b.lowrank) + sum(
            b.size for b in layout if not b.lowrank)
        sizes = []
        for P in (64, 256, 1024):
            noise = LowRankNoise(config, P // 2, args.rank, device=args.device)
            pop = noise.population(torch.zeros(num_parameters(config), device=args.device),
                                   0.02)
            sizes.append(pop.nbytes())
            dense = P * num_parameters(config) * 4
            print(f"{name:8s} {P:6d} {sizes[-1] / 2**20:9.1f} {dense / 2**20:10.1f}")
            del noise, pop
        xs, ys = [64, 256, 1024], sizes
        mx, my = sum(xs) / 3, sum(ys) / 3
        slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
                 / sum((x - mx) ** 2 for x in xs))
        N = num_parameters(config)
        print(f"{name}: slope {slope:,.0f} bytes per individual = {slope / 4:,.0f} floats "
              f"(r*sum(R+C)+n = {floats:,}; a dense individual: N = {N:,}, {N / floats:.0f}x more)")
        out[name] = {"popsizes": xs, "bytes": ys, "slope_bytes": slope,
                     "floats_per_individual": floats, "N": N}
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, d in out.items():
            ax.plot(d["popsizes"], [b / 2**20 for b in d["bytes"]], "o-", label=f"{name} low-rank")
            ax.plot(d["popsizes"], [p * d["N"] * 4 / 2**20 for p in d["popsizes"]], "x--",
                    label=f"{name} dense")
        ax.set(xscale="log", yscale="log", xlabel="population size P",
               ylabel="population state (MiB)", title=f"rank {args.rank}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return out


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def bf16_accuracy(name: str, popsize: int, batch: int, seq: int, device) -> dict:
    """bf16 vs float32 low-rank pass on one population: output error, fitness agreement."""
    config = _config(name, seq, vocab=None if name == "bench-a" else 64)
    center, noise, pop32 = make_population(config, popsize, 1, device, torch.float32)
    pop16 = noise.population(center, 0.02, dtype=torch.bfloat16, output_dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen).to(device)
    with torch.no_grad():
        out32, out16 = pop32(tokens[:, :-1]), pop16(tokens[:, :-1])
    targets = tokens[:, 1:].reshape(-1).repeat(popsize)
    f32 = torch.nn.functional.cross_entropy(out32.reshape(-1, config.output_dim), targets,
                                            reduction="none").view(popsize, -1).mean(1)
    f16 = torch.nn.functional.cross_entropy(out16.reshape(-1, config.output_dim), targets,
                                            reduction="none").view(popsize, -1).mean(1)
    return {"max_rel_output_error": float((out16 - out32).abs().max() / out32.abs().max()),
            "mean_abs_output_error": float((out16 - out32).abs().mean()),
            "max_abs_fitness_diff": float((f16 - f32).abs().max()),
            "fitness_spread": float(f32.max() - f32.min()),
            "spearman_fitness": _spearman(f16.cpu(), f32.cpu())}


def section_bf16(args) -> dict:
    out = {}
    print(f"\n## bf16 vs float32, low-rank pass (sigma 0.02, rank 1), {args.device}")
    print(f"{'preset':8s} {'P':>5s} {'max rel out err':>15s} {'max |dF|':>9s} "
          f"{'F spread':>9s} {'spearman F':>10s}")
    for name, P, B in (("bench-a", 64, args.batch), ("seed", args.bf16_seed_popsize, 2)):
        r = bf16_accuracy(name, P, B, args.seq if name == "bench-a" else 32, args.device)
        out[name] = r
        print(f"{name:8s} {P:5d} {r['max_rel_output_error']:15.2e} "
              f"{r['max_abs_fitness_diff']:9.2e} {r['fitness_spread']:9.2e} "
              f"{r['spearman_fitness']:10.4f}")
    return out


def seed_run(popsize: int, generations: int, batch: int, device, dtype: str) -> dict:
    """lowrank-es on language with the seed preset: seconds per generation, centre's metric."""
    task = make_task("language", batch_size=batch, test_size=16)
    config = task.default_config().replace(**preset_overrides("seed"))
    problem = TransformerProblem(task, config, seed=0, device=device, compute_dtype=dtype)
    searcher = make_searcher("lowrank-es", problem, popsize=popsize)
    seconds = []
    for _ in range(generations):
        seconds.append(timed(searcher.step, device))
    metric = problem.metrics(searcher.current_solution())[task.target_metric]
    return {"N": problem.solution_length, "s_per_generation": seconds,
            "mean_eval": searcher.status["mean_eval"], task.target_metric: metric}


def section_seed(args) -> dict:
    print(f"\n## seed preset on language: lowrank-es P={args.seed_popsize}, batch "
          f"{args.seed_batch} x 32 tokens, {args.dtype}, {args.device} (fresh process)")
    r = json.loads(_child(args, "seed", ""))
    print(f"N = {r['N']:,} parameters; seconds per generation: "
          f"{', '.join(f'{s:.1f}' for s in r['s_per_generation'])}; peak "
          f"{'GPU memory' if args.device != 'cpu' else 'RSS'} {r['peak_bytes'] / 2**30:.2f} GiB; "
          f"centre after {args.seed_generations} generations: "
          f"neg_bits_per_char {r['neg_bits_per_char']:.3f}")
    return r


# ----------------------------------------------------------------------------- children
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak(fn, device) -> int:
    """Peak memory added while ``fn`` runs: GPU allocator peak, or Linux VmHWM."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base = _rss_kib("VmHWM")
    fn()
    return (_rss_kib("VmHWM") - base) * 1024


def _child(args, kind: str, name: str) -> str:
    argv = [sys.executable, __file__, "--child", kind, "--child-name", name,
            "--threads", str(torch.get_num_threads()), "--device", args.device,
            "--dtype", args.dtype, "--popsize", str(args.popsize), "--batch", str(args.batch),
            "--seq", str(args.seq), "--seed-popsize", str(args.seed_popsize),
            "--seed-batch", str(args.seed_batch),
            "--seed-generations", str(args.seed_generations)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"child {kind} {name} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def child_memory(args, kind: str, name: str) -> int:
    return int(_child(args, kind, name))


def run_child(args) -> None:
    dtype = getattr(torch, args.dtype)
    if args.child == "pass":  # the population is built inside the measured call
        config = _config("bench-a", args.seq)

        def fn():
            with torch.no_grad():
                pass_methods(config, args.popsize, args.batch, args.seq, args.device, dtype,
                             dense=args.child_name == "dense population")[args.child_name]()
        print(_peak(fn, args.device))
    elif args.child == "generation":
        def fn():
            s = _generation_searcher(args, args.child_name)
            s.step()
            s.step()
        print(_peak(fn, args.device))
    elif args.child == "seed":
        holder = {}

        def fn():
            holder.update(seed_run(args.seed_popsize, args.seed_generations, args.seed_batch,
                                   args.device, args.dtype))
        if torch.device(args.device).type == "cuda":
            holder["peak_bytes"] = _peak(fn, args.device)
        else:
            fn()
            holder["peak_bytes"] = _rss_kib("VmHWM") * 1024  # the whole process
        print(json.dumps(holder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="pass,generation,growth,bf16,seed")
    ap.add_argument("--popsize", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed-popsize", type=int, default=256)
    ap.add_argument("--seed-batch", type=int, default=2, help="sequences of 32 per batch")
    ap.add_argument("--seed-generations", type=int, default=2)
    ap.add_argument("--bf16-seed-popsize", type=int, default=8)
    ap.add_argument("--plot", default=None, help="PNG of the memory-growth section")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-name", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from evotorch_mqa_moe._internal.evotorch_compat import quiet_evotorch_loggers

    quiet_evotorch_loggers()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    print(machine_report())
    start = time.perf_counter()
    report = {}
    sections = {"pass": section_pass, "generation": section_generation,
                "growth": section_growth, "bf16": section_bf16, "seed": section_seed}
    for name in args.sections.split(","):
        report[name] = sections[name](args)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    print("JSON " + json.dumps(report, default=lambda x: None if isinstance(x, float)
                                and not math.isfinite(x) else x))


if __name__ == "__main__":
    main()
