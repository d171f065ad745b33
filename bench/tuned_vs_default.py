"""Tuned vs default settings on held-out seeds: does a `tune` study's best setting generalise?

Run (after ``evotorch-mqa-moe tune ... --first-seed 100 --out OUT``):
    .venv/bin/python bench/tuned_vs_default.py OUT/best.json [OUT2/best.json ...] \\
        --seeds 0,1,2 --out results/tuned-vs-default

For each ``best.json`` (the format ``tune`` writes and ``run --config`` reads), runs the
study's searcher on the study's task (task options, model, metric and evaluation budget
as recorded) twice per seed: once with the searcher's registry defaults and once with
the tuned popsize / stdev / options. Seeds must be ones the study never ran (the study
ran ``first_seed..first_seed+seeds-1``, recorded in ``best.json``): the script refuses
overlapping seeds, so the comparison is held out. Runs are plain ``run()`` calls, one
folder each under ``--out`` (a folder with a checkpoint resumes, as in ``compare``, so an
interrupted comparison continues and a finished run is reused). Prints and writes
``OUT/tuned_vs_default.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from _machine import machine_report
from loguru import logger

from evotorch_mqa_moe.workflow.run import run
from evotorch_mqa_moe.workflow.settings import RunSettings
from evotorch_mqa_moe.workflow.tune import metric_value


def _one(settings: RunSettings, folder: Path, metric: str) -> float:
    # as compare does: a folder with a checkpoint resumes (a finished run returns at once)
    results = run(settings, folder, resume=(folder / "checkpoint.pt").is_file())
    return metric_value(results["final_metrics"], metric, settings.task)


def compare_one(best_path: Path, seeds: list[int], out: Path) -> dict:
    best = json.loads(best_path.read_text())
    first = best.get("first_seed", 0)
    studied = set(range(first, first + best.get("seeds", 1)))
    if studied & set(seeds):
        sys.exit(f"tuned_vs_default.py: seeds {sorted(studied & set(seeds))} were used by the "
                 f"study in {best_path}; pick held-out seeds")
    task, searcher, metric = best["task"], best["searcher"], best["metric"]
    budget = int(best["budget_evals"])
    common = {"task": task, "searcher": searcher, "max_evaluations": budget,
              "task_options": best.get("task_options") or {}, "model": best.get("model") or {},
              "checkpoint_every": 10}
    tuned = {"popsize": best.get("popsize"), "stdev": best.get("stdev"),
             "searcher_options": best.get("searcher_options") or {}}
    key = f"{task}-{searcher}"
    rows = {"default": [], "tuned": []}
    for seed in seeds:
        for which, extra in (("default", {}), ("tuned", tuned)):
            settings = RunSettings(seed=seed, **common, **extra)
            value = _one(settings, out / key / which / f"seed{seed}", metric)
            rows[which].append(value)
            logger.info(f"{key} {which} seed {seed}: {metric} {value:.4g}")
    wins = sum(t > d for t, d in zip(rows["tuned"], rows["default"], strict=True))
    return {"task": task, "task_options": common["task_options"], "searcher": searcher,
            "metric": metric, "budget_evals": budget, "seeds": seeds, "study": str(best_path),
            "study_seeds": sorted(studied), "tuned_settings": tuned, **rows,
            "tuned_wins": wins}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("best", nargs="+", type=Path, help="best.json files written by `tune`")
    ap.add_argument("--seeds", default="0,1,2", help="held-out seeds, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("results/tuned-vs-default"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    logger.remove()
    logger.add(sys.stderr, level="INFO",
               filter=lambda r: not r["name"].startswith("evotorch_mqa_moe.run"))
    header = (f"bench/tuned_vs_default.py {' '.join(sys.argv[1:])}\n{machine_report()}\n"
              f"torch threads {args.threads}")
    print(header, flush=True)
    results = [compare_one(path, seeds, args.out) for path in args.best]
    lines = ["| task | metric | budget (evals) | default: mean (per seed) | "
             "tuned: mean (per seed) | tuned better on | tuned settings |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        def cell(values):
            return (f"{statistics.mean(values):.4g} ("
                    + ", ".join(f"{v:.3g}" for v in values) + ")")
        opts = {"popsize": r["tuned_settings"]["popsize"], "stdev": r["tuned_settings"]["stdev"],
                **r["tuned_settings"]["searcher_options"]}
        opts = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in opts.items())
        lines.append(f"| {r['task']} | {r['metric']} | {r['budget_evals']:,} | "
                     f"{cell(r['default'])} | {cell(r['tuned'])} | "
                     f"{r['tuned_wins']}/{len(r['seeds'])} seeds | {opts} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuned_vs_default.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "tuned_vs_default.md").write_text(f"```\n{header}\n```\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
