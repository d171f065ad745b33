"""GA operators: ours vs EvoTorch's, each as a multiple of ``clone()`` of the population.

Run:  .venv/bin/python bench/operators.py [--rounds 3] [--device cpu] [--threads T]
          [--shapes 256x100000,64x1000000] [--sections shapes,groups]
          [--group-preset bench-a] [--group-popsize 256]

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

Section ``groups``: structure-aware (group) cross-over at a real layout, the
``--group-preset`` model's flat vector (config A: N = 156,632) with ``--group-popsize``
individuals: the per-parameter kernel vs ``uniform_cross_over(..., groups=)`` at the
``row``, ``head``, ``expert``, ``tensor`` and ``layer`` levels of
``TransformerProblem.gene_groups`` (target: each <= 1.5x the per-parameter kernel),
the same through ``UniformCrossOver(granularity=...)`` operators, the per-gene gather the
strided-copy plan replaced, and the one-time cost of compiling each level's plan.

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

from evotorch_mqa_moe.evolution.crossover import (
    _MASK_BLOCK_GENES,
    _expand_groups,
    _group_table,
    _prepare_groups,
    _uniform_cross_over_stacked,
)
from evotorch_mqa_moe.evolution.mutation import gaussian_mutation, gaussian_mutation_
from evotorch_mqa_moe.evolution.operators import GaussianMutation, UniformCrossOver
from evotorch_mqa_moe.evolution.sampling import _bernoulli_mask
from evotorch_mqa_moe.model import preset
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task

GROUP_LEVELS = ("row", "head", "expert", "tensor", "layer")


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
    return _time_methods(methods, rounds=rounds, device=device)


def _time_methods(methods: list[tuple], *, rounds: int, device: torch.device) -> list[tuple]:
    """Interleaved rounds (round 0 warms up); ``(name, median s, x clone, bytes/s)`` rows."""
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


def bench_groups(
    preset_name: str, popsize: int, *, rounds: int, device: torch.device
) -> tuple[list[tuple], dict[str, tuple[int, int, float]]]:
    """Group cross-over at a real layout. Returns the timing rows and, per level,
    ``(groups, plan blocks, plan compile seconds)``."""
    config = preset(preset_name)
    task = make_task("reverse", vocab_size=config.vocab_size, seq_len=config.max_seq_len)
    problem = TransformerProblem(task, config, seed=0, device=device)
    n = problem.solution_length
    gen = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(popsize, n, device=device, generator=gen)
    half = popsize // 2
    parents1, parents2 = values[:half].clone(), values[half:].clone()
    batch = problem.generate_batch(popsize)
    batch.set_evals(torch.randn(popsize, device=device))

    info = {}
    for level in GROUP_LEVELS:
        ids = problem.gene_groups(level)
        t0 = time.perf_counter()
        prepared = _prepare_groups(ids, n, device)  # compiled once, cached per tensor
        info[level] = (prepared.count, len(prepared.segments or ()), time.perf_counter() - t0)
    gathered = _prepare_groups(problem.gene_groups("row"), n, device)._replace(segments=None)

    def kernel(groups):
        return lambda: _uniform_cross_over_stacked(parents1, parents2, generator=gen, groups=groups)

    size = values.numel() * values.element_size()
    methods = [
        ("clone (reference)", lambda: values.clone(), 2 * size),
        ("kernel per parameter (P/2 pairs -> P children)", kernel(None), 2 * size),
    ]
    methods += [(f"kernel groups={level}", kernel(problem.gene_groups(level)), 2 * size)
                for level in GROUP_LEVELS]
    methods.append(("alt   kernel groups=row, per-gene gather", kernel(gathered), 2 * size))
    # The mask alone, for one block of rows (what the kernel builds at a time on CPU).
    rows = max(1, min(half, _MASK_BLOCK_GENES // n))
    mask = torch.empty(rows, n, dtype=torch.bool, device=device)
    bits = torch.empty(rows * 8 * ((n + 7) // 8), dtype=torch.int8, device=device)
    row_groups = _prepare_groups(problem.gene_groups("row"), n, device)
    table = _group_table(rows, row_groups.count, 0.5, device=device, generator=gen)
    methods += [
        (f"mask  per-gene bits, {rows} rows",
         lambda: _bernoulli_mask(rows, n, 0.5, device=device, generator=gen, scratch=bits),
         rows * n),
        (f"mask  groups=row, plan, {rows} rows", lambda: _expand_groups(table, row_groups, mask),
         rows * n),
        (f"mask  groups=row, gather, {rows} rows",
         lambda: _expand_groups(table, gathered, mask), rows * n),
    ]
    for level in ("parameter", *GROUP_LEVELS):
        op = UniformCrossOver(problem, truncation_fraction=0.5, granularity=level)
        methods.append((f"operator granularity={level} (truncation 0.5)", lambda op=op: op(batch),
                        2 * size))
    return _time_methods(methods, rounds=rounds, device=device), info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="256x100000,64x1000000")
    ap.add_argument("--sections", default="shapes,groups",
                    help="comma-separated: shapes (generic P x N), groups (group cross-over)")
    ap.add_argument("--group-preset", default="bench-a")
    ap.add_argument("--group-popsize", type=int, default=256)
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
    sections = set(args.sections.split(","))
    if not sections <= {"shapes", "groups"}:
        ap.error(f"--sections must name shapes and/or groups, got {args.sections!r}")
    for shape in args.shapes.split(",") if "shapes" in sections else ():
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
    if "groups" in sections:
        ok &= _report_groups(args, device)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


def _report_groups(args, device: torch.device) -> bool:
    rows, info = bench_groups(args.group_preset, args.group_popsize, rounds=args.rounds,
                              device=device)
    print(f"\n## group cross-over: preset {args.group_preset!r}, P={args.group_popsize}, "
          f"float32 on {device}, median of {args.rounds} rounds")
    for level, (count, blocks, sec) in info.items():
        plan = f"{blocks} strided blocks" if blocks else "no plan (gather)"
        print(f"level {level:7s} {count:7d} groups, {plan}, compiled in {sec * 1e3:.1f} ms")
    print("\nx per-param: kernel rows vs the per-parameter kernel, operator rows vs the "
          "per-parameter operator, mask rows vs the per-gene bit mask")
    print(f"\n{'method':52s} {'ms':>9s} {'x clone':>8s} {'x per-param':>11s}")
    ratio = {name: rel for name, _, rel, _ in rows}
    base = ratio["kernel per parameter (P/2 pairs -> P children)"]
    base_op = ratio["operator granularity=parameter (truncation 0.5)"]
    base_mask = next(rel for name, _, rel, _ in rows if name.startswith("mask  per-gene"))
    for name, sec, rel, _ in rows:
        ref = {"operator": base_op, "mask": base_mask}.get(name.split()[0], base)
        print(f"{name:52s} {sec * 1e3:9.1f} {rel:8.2f} {rel / ref:11.2f}")
    ok = True
    print()
    for level in GROUP_LEVELS:
        for kind, ref in (("kernel", base), ("operator", base_op)):
            key = (f"kernel groups={level}" if kind == "kernel"
                   else f"operator granularity={level} (truncation 0.5)")
            value = ratio[key] / ref
            passed = value <= 1.5
            ok &= passed
            label = f"{kind} groups={level} <= 1.5x per-parameter"
            print(f"{label:52s} {value:6.2f}  {'PASS' if passed else 'MISS'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
