"""``lowrank-ga`` (compact genomes) against ``ga`` (dense) at equal evaluations.

Run:  .venv/bin/python bench/lowrank_ga_vs_ga.py [--seeds 3] [--jobs 2] [--out DIR]
      .venv/bin/python bench/lowrank_ga_vs_ga.py --variant "k5=--searcher-option \
          recentre_every=5"

Case: ``reverse`` (default options: 8 tokens, vocabulary 8, 3,482 parameters) at 20k
forward-equivalents, seeds 0..K-1, every run a real ``evotorch-mqa-moe run``
(``--threads 1``; ``--jobs`` at once). Variants are extra ``lowrank-ga`` flags under a
name (the ``lowrank-ga`` row is the shipped defaults). The table gives the held-out
``exact_accuracy`` per seed, the mean, and the mean minus ``ga``'s.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _machine import machine_report
from lowrank_es_vs_pgpe import run_one

TASK, BUDGET = ["reverse"], 20_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="another lowrank-ga row: NAME=extra flags (repeatable)")
    args = ap.parse_args()
    rows = {"ga": ["--searcher", "ga"], "lowrank-ga": ["--searcher", "lowrank-ga"]}
    for item in args.variant:
        name, _, flags = item.partition("=")
        rows[name] = ["--searcher", "lowrank-ga", *shlex.split(flags)]
    print(machine_report())
    root = args.out or Path(tempfile.mkdtemp(prefix="lga-vs-ga-"))
    jobs = [(row, seed) for row in rows for seed in range(args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(run_one, root / f"{job[0]}-s{job[1]}", TASK, BUDGET,
                                    job[1], rows[job[0]]) for job in jobs}
        scores = {job: f.result() for job, f in futures.items()}
    print(f"\nreverse ({BUDGET:,} forward-equivalents): held-out exact_accuracy, seeds "
          f"0..{args.seeds - 1} (runs in {root})")
    print("| searcher | per seed | mean | mean - ga |\n|---|---|---|---|")
    base = statistics.mean(scores[("ga", s)] for s in range(args.seeds))
    for row in rows:
        values = [scores[(row, s)] for s in range(args.seeds)]
        mean = statistics.mean(values)
        print(f"| {row} | {' '.join(f'{v:.3f}' for v in values)} | {mean:.3f} | "
              f"{mean - base:+.3f} |")


if __name__ == "__main__":
    main()
