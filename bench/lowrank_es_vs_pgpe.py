"""``lowrank-es`` against ``pgpe`` at equal evaluations, on the task family of issue 22.

Run:  .venv/bin/python bench/lowrank_es_vs_pgpe.py [--seeds 3] [--jobs 2] [--out DIR]
      .venv/bin/python bench/lowrank_es_vs_pgpe.py --variant "les-adam=--searcher-option \
          optimizer=adam --searcher-option lr=0.01 --stdev 0.02"

Cases: ``reverse seq_len=16 vocab_size=16`` at 100k forward-equivalents and ``sort``
(default options) at 60k, seeds 0..K-1, every run a real ``evotorch-mqa-moe run``
(``--threads 1``; ``--jobs`` of them at once). Variants are extra ``lowrank-es`` flags
under a name (the default ``lowrank-es`` row is the shipped defaults). The table gives
the held-out ``exact_accuracy`` per seed, the mean, and the mean minus pgpe's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _machine import machine_report

CASES = {
    "reverse-16": (["reverse", "--task-option", "seq_len=16", "--task-option", "vocab_size=16"],
                   100_000),
    "sort": (["sort"], 60_000),
}


def run_one(out: Path, task: list[str], budget: int, seed: int, flags: list[str]) -> float:
    argv = [sys.executable, "-m", "evotorch_mqa_moe", "run", *task, "--max-evals", str(budget),
            "--seed", str(seed), "--threads", "1", "--eval-every", "50",
            "--checkpoint-every", "1000", "--quiet", "--overwrite", "--out", str(out), *flags]
    subprocess.run(argv, check=True, capture_output=True)
    return json.loads((out / "results.json").read_text())["final_metrics"]["exact_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="another lowrank-es row: NAME=extra flags (repeatable)")
    args = ap.parse_args()
    rows = {"pgpe": ["--searcher", "pgpe"], "lowrank-es": ["--searcher", "lowrank-es"]}
    for item in args.variant:
        name, _, flags = item.partition("=")
        rows[name] = ["--searcher", "lowrank-es", *shlex.split(flags)]
    print(machine_report())
    root = args.out or Path(tempfile.mkdtemp(prefix="les-vs-pgpe-"))
    jobs = [(case, row, seed) for case in CASES for row in rows for seed in range(args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(run_one, root / f"{job[0]}-{job[1]}-s{job[2]}",
                                    CASES[job[0]][0], CASES[job[0]][1], job[2], rows[job[1]])
                   for job in jobs}
        scores = {job: f.result() for job, f in futures.items()}
    print(f"\nheld-out exact_accuracy, seeds 0..{args.seeds - 1} (runs in {root})")
    print("| case | searcher | per seed | mean | mean - pgpe |\n|---|---|---|---|---|")
    for case, (_, budget) in CASES.items():
        base = statistics.mean(scores[(case, "pgpe", s)] for s in range(args.seeds))
        for row in rows:
            values = [scores[(case, row, s)] for s in range(args.seeds)]
            mean = statistics.mean(values)
            print(f"| {case} ({budget:,}) | {row} | {' '.join(f'{v:.3f}' for v in values)} | "
                  f"{mean:.3f} | {mean - base:+.3f} |")


if __name__ == "__main__":
    main()
