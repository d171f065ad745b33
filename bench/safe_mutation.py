"""Safe mutation: the cost of one sensitivity refresh against one generation's evaluation.

Run:  .venv/bin/python bench/safe_mutation.py --threads 1 [--rounds 5] [--methods rms,sum,abs]

Config A (`preset("bench-a")`: embed 64, 4 heads, 1 KV head, 4 experts of 128, dense
gate, 2 layers; 156,632 parameters) on the reverse task with 16 tokens of vocabulary
16, so a generation's evaluation is P=64 individuals x B=32 sequences x T=16 tokens
(the B*T rows of bench/forward.py), float32:

* **generation**: ``task.fitness`` of the whole population (fresh batch, vectorised
  forward, loss): what a GA spends per generation (its operators are far cheaper);
* **refresh <method>**: one :meth:`SafeMutationScale.refresh` with the given settings
  (input batch, sensitivities of the measured individuals, multipliers), the work
  the class does once every ``--every`` generations.

Methods are timed in interleaved rounds (generation, refresh rms, refresh sum, ...)
and compared by their medians, so a noisy, shared machine slows all of them alike.
Printed: each refresh as a multiple of a generation and the amortised overhead
``refresh / (every * generation)`` (the issue's target: <= 10% at config A).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from _machine import machine_report, timed
from loguru import logger

from evotorch_mqa_moe import TransformerProblem, preset
from evotorch_mqa_moe.evolution.safe_mutation import SafeMutationScale
from evotorch_mqa_moe.evolution.sensitivity import METHODS
from evotorch_mqa_moe.problems.reverse import ReverseTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--popsize", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="sequences per fitness evaluation")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--methods", default="rms,sum", help=f"comma-separated, of {METHODS}")
    ap.add_argument("--every", type=int, default=None, help="refresh interval (default: the "
                    "class default)")
    ap.add_argument("--individuals", type=int, default=None, help="num_individuals")
    ap.add_argument("--sens-batch", type=int, default=None, help="batch_size of a refresh")
    ap.add_argument("--projections", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logger.disable("evotorch_mqa_moe")  # one debug line per refresh otherwise
    methods = [m for m in args.methods.split(",") if m]

    config = preset("bench-a", max_seq_len=max(args.seq, preset("bench-a").max_seq_len))
    task = ReverseTask(vocab_size=config.vocab_size, seq_len=args.seq, batch_size=args.batch)
    problem = TransformerProblem(task, config, seed=0, device=args.device)
    values = problem.init_population(args.popsize)
    settings = {k: v for k, v in dict(every=args.every, num_individuals=args.individuals,
                                      batch_size=args.sens_batch,
                                      projections=args.projections).items() if v is not None}
    scales = {m: SafeMutationScale(problem, method=m, seed=0, **settings) for m in methods}
    data = torch.Generator().manual_seed(1)

    def generation():
        with torch.no_grad():
            return task.fitness(problem.population_model(values), data)

    fns = {"generation": generation}
    for m, safe in scales.items():
        fns[f"refresh {m}"] = (lambda s=safe: s.refresh(values))

    print(machine_report())
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    print("command: python bench/safe_mutation.py " + " ".join(sys.argv[1:]))
    any_scale = next(iter(scales.values()))
    print(f"config A: {config}")
    print(f"N = {problem.solution_length:,} parameters, P = {args.popsize}, B = {args.batch}, "
          f"T = {args.seq}, float32, device {args.device}, {torch.get_num_threads()} threads")
    print(f"safe mutation: {any_scale!r}")
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, args.device))
    med = {name: statistics.median(t) for name, t in times.items()}
    every = any_scale.every
    gen = med["generation"]
    print(f"\n{'work':16s} {'median s':>9s} {'x generation':>13s} "
          f"{'overhead at every=' + str(every):>20s}")
    report = {"every": every, "generation_s": gen}
    for name, t in med.items():
        overhead = "" if name == "generation" else f"{100 * t / (every * gen):19.1f}%"
        print(f"{name:16s} {t:9.3f} {t / gen:13.2f} {overhead}")
        report[name] = {"median_s": t, "x_generation": t / gen}
    print("\nJSON " + json.dumps(report))


if __name__ == "__main__":
    main()
