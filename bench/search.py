"""The search-quality suite: standard tasks x searchers x seeds at equal evaluation budgets.

Run:
    .venv/bin/python bench/search.py --out results/search            # standard table
    .venv/bin/python bench/search.py --quick --out results/search-quick
    .venv/bin/python bench/search.py --tasks reverse16,sort --searchers ga,pgpe --seeds 3
    .venv/bin/python bench/search.py --max-seconds 60 --tasks reverse16,sort,addition,language \
        --searchers lamarck,pbt,ga,pgpe,adam --out results/hybrid      # equal wall time

Every (task, searcher, seed) run goes through :func:`evotorch_mqa_moe.compare.compare`
(the same machinery as ``evotorch-mqa-moe compare``: one folder per run, resumable,
``results.csv``, ``summary.md`` and plots per task), so an interrupted suite continues
where it stopped when called again with the same arguments. Tasks run in parallel
worker processes (``--workers``, default 2 = this machine's cores), each with one
torch thread, so wall times within one task are comparable.

The final table (``OUT/search.md``, also printed) has per task and searcher the
median [min-max] over seeds of the held-out target metric at the end of the budget,
how many seeds reached the task's threshold (90% of the way from chance to ceiling,
or the value given below), and the median evaluations and wall time to reach it.
Budgets are in evaluations (forward-equivalents: a backward counts as 2 forwards,
so ``adam`` gets a third of the steps an evaluation budget would suggest), or, with
``--max-seconds S``, S seconds of wall time per run (the evaluation budget is then
not a limit; the table reports the evaluations each searcher spent). Wall-time budgets
are only as fair as the machine is quiet: run them with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _machine import machine_report

# name -> (task, task options, evaluation budget, threshold for "reached" or None = default)
STANDARD: dict[str, tuple[str, dict[str, Any], int, float | None]] = {
    "reverse16": ("reverse", {"seq_len": 16, "vocab_size": 16}, 100_000, 0.9),
    "sort": ("sort", {}, 60_000, None),
    "addition": ("addition", {}, 100_000, None),
    "language": ("language", {"source": "markov"}, 40_000, None),
    "cartpole": ("cartpole", {}, 20_000, None),
}
SEARCHERS = ["ga", "ga-seed", "pgpe", "cmaes", "snes", "adam"]
NOT_GRADIENT_FREE = {"adam", "lamarck", "baldwin", "pbt"}
QUICK_FACTOR = 0.2  # --quick: a fifth of each budget, one seed


def _run_task(key: str, task: str, options: dict[str, Any], budget: int, threshold,
              searchers: list[str], seeds: int, out: str, eval_every: int,
              max_seconds: float | None = None) -> str:

    import torch
    from loguru import logger

    from evotorch_mqa_moe._internal.evotorch_compat import quiet_evotorch_loggers

    torch.set_num_threads(1)
    logger.remove()
    logger.add(Path(out) / f"{key}.log", level="INFO")
    quiet_evotorch_loggers()
    from evotorch_mqa_moe.problems import make_task
    from evotorch_mqa_moe.workflow.compare import compare

    usable = list(searchers)
    if not callable(getattr(make_task(task, **options), "loss", None)):
        usable = [s for s in usable if s not in NOT_GRADIENT_FREE]
    limit = f"--max-seconds {max_seconds:g}" if max_seconds else f"--budget-evals {budget}"
    command = (f"bench/search.py task {key}: compare {task} {options} "
               f"--searchers {','.join(usable)} --seeds {seeds} {limit}")
    compare(task, usable, seeds=seeds, max_evals=None if max_seconds else budget,
            max_seconds=max_seconds, out=Path(out) / key, task_options=options,
            target=threshold, eval_every=eval_every, command=command)
    return key


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def table(out: Path, keys: list[str], scale: float = 1.0,
          max_seconds: float | None = None) -> str:
    """The suite's markdown table from each task's ``results.csv`` (budgets x ``scale``,
    or ``max_seconds`` of wall time per run)."""
    import pandas as pd

    lines = ["| task | budget | searcher | final metric: median [min-max] | "
             "reached threshold | median evals to threshold | median time to threshold (s) | "
             "median evaluations spent | median wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        path = out / key / "results.csv"
        if not path.is_file():
            continue
        t = pd.read_csv(path)
        budget = (f"{max_seconds:g} s" if max_seconds
                  else f"{max(1, int(STANDARD[key][2] * scale)):,} evals")
        for name, g in t.groupby("searcher", sort=False):
            f = g["final_metric"]
            hit = g["evals_to_target"].notna()
            metric = g["target_metric"].iloc[0]
            to_target = (f"{int(g.loc[hit, 'evals_to_target'].median()):,}" if hit.any()
                         else "-")
            lines.append(
                f"| {key} ({metric}) | {budget} | {name} | {_fmt(f.median())} "
                f"[{_fmt(f.min())}-{_fmt(f.max())}] | {int(hit.sum())}/{len(g)} | "
                f"{to_target} | "
                f"{_fmt(g.loc[hit, 'time_to_target'].median()) if hit.any() else '-'} | "
                f"{_fmt(g['evaluations'].median(), 6)} | {_fmt(g['wall_time'].median())} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/search"))
    ap.add_argument("--tasks", default=",".join(STANDARD),
                    help=f"comma-separated keys of {list(STANDARD)}")
    ap.add_argument("--searchers", default=",".join(SEARCHERS))
    ap.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--budget-scale", type=float, default=None,
                    help=f"multiply every budget (default 1; --quick: {QUICK_FACTOR})")
    ap.add_argument("--quick", action="store_true", help="a fifth of the budgets, one seed")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="equal wall time per run instead of equal evaluations")
    ap.add_argument("--workers", type=int, default=2, help="tasks run in parallel")
    ap.add_argument("--eval-every", type=int, default=10)
    args = ap.parse_args()
    keys = [k.strip() for k in args.tasks.split(",") if k.strip()]
    unknown = [k for k in keys if k not in STANDARD]
    if unknown:
        sys.exit(f"search.py: unknown task key(s) {unknown}; known: {list(STANDARD)}")
    searchers = [s.strip() for s in args.searchers.split(",") if s.strip()]
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    scale = args.budget_scale if args.budget_scale is not None else (
        QUICK_FACTOR if args.quick else 1.0)
    if seeds < 1 or scale <= 0 or args.workers < 1 or (
            args.max_seconds is not None and not 0 < args.max_seconds < math.inf):
        sys.exit("search.py: --seeds, --budget-scale, --max-seconds and --workers must be "
                 "positive")
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"bench/search.py {' '.join(sys.argv[1:])}\n{machine_report()}\n"
              f"seeds {seeds}, "
              + (f"{args.max_seconds:g} s per run" if args.max_seconds
                 else f"budget scale {scale}") + f", workers {args.workers}")
    print(header, flush=True)
    start = time.perf_counter()
    jobs = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for key in keys:
            task, options, budget, threshold = STANDARD[key]
            jobs.append(pool.submit(_run_task, key, task, options, max(1, int(budget * scale)),
                                    threshold, searchers, seeds, str(args.out), args.eval_every,
                                    args.max_seconds))
        for job in jobs:
            print(f"done: {job.result()} ({time.perf_counter() - start:.0f} s)", flush=True)
    result = table(args.out, keys, scale, args.max_seconds)
    report = (f"# Search-quality suite\n\n```\n{header}\n```\n\n{result}\n\n"
              f"Total wall time: {time.perf_counter() - start:.0f} s "
              f"({args.workers} workers, 1 torch thread each).\n")
    (args.out / "search.md").write_text(report)
    print(report)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
