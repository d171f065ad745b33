"""GA operators: ours vs EvoTorch's, each as a multiple of ``clone()`` of the population.

Run:  .venv/bin/python bench/operators.py [--rounds 3] [--device cpu] [--threads T]
          [--shapes 256x100000,64x1000000]

For each population shape (P, N) float32 the script times, in interleaved rounds
(every method once per round, so a noisy shared machine slows all of them alike),
and reports medians divided by the median of ``values.clone()``:

* kernels on the same parents: our uniform cross-over (P/2 pairs -> P children),
  EvoTorch's one-point and SBX ``_do_cross_over``; our ``gaussian_mutation`` vs
  EvoTorch's ``GaussianMutation`` at the same p (0.1 and 1);
* whole operators on an evaluated ``SolutionBatch`` (parent selection included);
* one variation step: uniform cross-over making P children from P/2 pairs, then
  mutation with p=0.1 on them, in place since they are fresh (target <= 4 clones;
  what ``SeedGeneticAlgorithm`` does each generation, also timed as operators);
* the alternatives the kernels were chosen over (``torch.where`` on a
  ``rand < p`` mask; a dense masked mutation).

On CUDA it also reports GB/s (bytes read + written / time) against a
device-to-device copy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from _machine import machine_report
from evotorch import Problem
from evotorch.operators import GaussianMutation as EvoGaussianMutation
from evotorch.operators import OnePointCrossOver, SimulatedBinaryCrossOver

from evotorch_mqa_moe.functional import (
    _uniform_cross_over_stacked,
    gaussian_mutation,
    gaussian_mutation_,
)
from evotorch_mqa_moe.operators import GaussianMutation, UniformCrossOver


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _constant(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1)


def bench_shape(popsize: int, n: int, *, rounds: int, device: torch.device) -> list[tuple]:
    gen = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(popsize, n, device=device, generator=gen)
    half = popsize // 2
    parents1, parents2 = values[:half].clone(), values[half:].clone()
    problem = Problem(
        "max",
        _constant,
        solution_length=n,
        initial_bounds=(-1.0, 1.0),
        vectorized=True,
        device=device,
        seed=0,
    )
    batch = problem.generate_batch(popsize)
    batch.set_evals(torch.randn(popsize, device=device))
    p = 0.1

    ours_cx = UniformCrossOver(problem, tournament_size=4)
    ours_trunc = UniformCrossOver(problem, truncation_fraction=0.5)
    ours_mut = GaussianMutation(problem, stdev=0.05, mutation_probability=p)
    evo_1pt = OnePointCrossOver(problem, tournament_size=4)
    evo_sbx = SimulatedBinaryCrossOver(problem, tournament_size=4, eta=10.0)
    evo_mut = EvoGaussianMutation(problem, stdev=0.05, mutation_probability=p)
    evo_mut1 = EvoGaussianMutation(problem, stdev=0.05)

    def variation_step():
        children = _uniform_cross_over_stacked(parents1, parents2, generator=gen).view(popsize, n)
        return gaussian_mutation_(children, stdev=0.05, mutation_probability=p, generator=gen)

    def operator_variation_step():
        children = ours_trunc(batch)
        return ours_mut.mutate_values(children.values.as_subclass(torch.Tensor), inplace=True)

    def where_rand_mask():
        m = torch.rand(half, n, device=device, generator=gen) < 0.5
        return torch.where(m, parents2, parents1), torch.where(m, parents1, parents2)

    def dense_masked_mutation():
        m = torch.rand(popsize, n, device=device, generator=gen) < p
        noise = torch.randn(popsize, n, device=device, generator=gen).mul_(0.05).mul_(m)
        return noise.add_(values)

    size = values.numel() * values.element_size()
    # name, function, bytes moved at the memory-traffic minimum (read + write)
    methods = [
        ("clone (reference)", lambda: values.clone(), 2 * size),
        (
            "ours  uniform_cross_over, P/2 pairs -> P children",
            lambda: _uniform_cross_over_stacked(parents1, parents2, generator=gen),
            2 * size,
        ),
        (
            "evo   OnePointCrossOver._do_cross_over",
            lambda: evo_1pt._do_cross_over(parents1, parents2),
            2 * size,
        ),
        (
            "evo   SimulatedBinaryCrossOver._do_cross_over",
            lambda: evo_sbx._do_cross_over(parents1, parents2),
            2 * size,
        ),
        (
            "ours  gaussian_mutation p=0.1",
            lambda: gaussian_mutation(values, stdev=0.05, mutation_probability=p, generator=gen),
            2 * size,
        ),
        ("evo   GaussianMutation p=0.1 (operator)", lambda: evo_mut(batch), 2 * size),
        (
            "ours  gaussian_mutation p=1",
            lambda: gaussian_mutation(values, stdev=0.05, generator=gen),
            2 * size,
        ),
        ("evo   GaussianMutation p=1 (operator)", lambda: evo_mut1(batch), 2 * size),
        ("ours  UniformCrossOver (tournament 4, operator)", lambda: ours_cx(batch), 2 * size),
        ("ours  UniformCrossOver (truncation 0.5, operator)", lambda: ours_trunc(batch), 2 * size),
        ("evo   OnePointCrossOver (tournament 4, operator)", lambda: evo_1pt(batch), 2 * size),
        ("evo   SimulatedBinaryCrossOver (operator)", lambda: evo_sbx(batch), 2 * size),
        ("ours  GaussianMutation p=0.1 (operator)", lambda: ours_mut(batch), 2 * size),
        ("ours  variation step: cross-over + mutation p=0.1", variation_step, 2 * size),
        (
            "ours  same with the operators (truncation, SeedGA path)",
            operator_variation_step,
            2 * size,
        ),
        ("alt   torch.where on a rand<0.5 mask (2 children)", where_rand_mask, 2 * size),
        ("alt   dense masked mutation p=0.1", dense_masked_mutation, 2 * size),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    for r in range(rounds + 1):  # round 0 warms up
        for name, fn, _ in methods:
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
            del out
    med = {name: statistics.median(ts) for name, ts in times.items()}
    clone = med["clone (reference)"]
    return [(name, med[name], med[name] / clone, nbytes / med[name]) for name, _, nbytes in methods]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="256x100000,64x1000000")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). 1 makes ratios robust on a shared "
        "machine, where each multi-threaded op waits for descheduled threads.",
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_report())
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores: >2 means shared)")
    print(f"command: python bench/operators.py {' '.join(sys.argv[1:])}".rstrip())
    ok = True
    for shape in args.shapes.split(","):
        popsize, n = (int(v) for v in shape.split("x"))
        rows = bench_shape(popsize, n, rounds=args.rounds, device=device)
        print(f"\n## P={popsize} x N={n:,} float32 on {device}, median of {args.rounds} rounds")
        gbs = device.type == "cuda"
        head = f"{'method':52s} {'ms':>9s} {'x clone':>8s}" + (f" {'GB/s':>7s}" if gbs else "")
        print(head)
        ratio = {}
        for name, sec, rel, bw in rows:
            ratio[name] = rel
            line = f"{name:52s} {sec * 1e3:9.1f} {rel:8.2f}" + (f" {bw / 1e9:7.1f}" if gbs else "")
            print(line)
        checks = [
            (
                "variation step <= 4x clone",
                ratio["ours  variation step: cross-over + mutation p=0.1"],
                4.0,
                "<=",
            ),
            (
                "cross-over kernel speed-up vs OnePoint (>= 3)",
                ratio["evo   OnePointCrossOver._do_cross_over"]
                / ratio["ours  uniform_cross_over, P/2 pairs -> P children"],
                3.0,
                ">=",
            ),
            (
                "cross-over operator speed-up vs OnePoint (>= 3)",
                ratio["evo   OnePointCrossOver (tournament 4, operator)"]
                / ratio["ours  UniformCrossOver (tournament 4, operator)"],
                3.0,
                ">=",
            ),
            (
                "mutation p=0.1 speed-up vs EvoTorch (>= 3)",
                ratio["evo   GaussianMutation p=0.1 (operator)"]
                / ratio["ours  GaussianMutation p=0.1 (operator)"],
                3.0,
                ">=",
            ),
            (
                "mutation p=1 speed-up vs EvoTorch (>= 3)",
                ratio["evo   GaussianMutation p=1 (operator)"]
                / ratio["ours  gaussian_mutation p=1"],
                3.0,
                ">=",
            ),
        ]
        print()
        for label, value, target, op in checks:
            passed = value <= target if op == "<=" else value >= target
            ok &= passed
            print(f"{label:52s} {value:6.2f}  {'PASS' if passed else 'MISS'}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
