"""One run of a hybrid searcher (or adam) for a fixed budget: the measurements behind the
defaults in docs/searchers.md ("Hybrid searchers").

Run:  .venv/bin/python bench/hybrid_defaults.py sort pbt '{"popsize": 8, "interval": 5}' 6000 0
      .venv/bin/python bench/hybrid_defaults.py reverse lamarck '{"k": 5, "lr": 0.01}' 6000 0
      .venv/bin/python bench/hybrid_defaults.py sort adam '{"lr": 0.003}' 3000 0

Arguments: task (``reverse`` runs with ``seq_len=16 vocab_size=16``, other tasks with
their defaults), searcher (``lamarck``, ``baldwin``, ``pbt`` or ``adam``), builder options
as JSON, budget in forward-equivalents, seed. One torch thread. Prints, after 1/4, 1/2
and all of the budget: (forward-equivalents, seconds, held-out token accuracy, held-out
exact accuracy) of ``current_solution()``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import torch
from loguru import logger

from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers.backprop import BackpropTrainer
from evotorch_mqa_moe.searchers.lamarck import build_baldwin, build_lamarck
from evotorch_mqa_moe.searchers.pbt import build_pbt

BUILDERS = {"lamarck": build_lamarck, "baldwin": build_baldwin, "pbt": build_pbt,
            "adam": lambda problem, **options: BackpropTrainer(problem, **options)}


def main() -> None:
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    task_name, name, options, budget, seed = sys.argv[1:]
    options, budget, seed = json.loads(options), int(budget), int(seed)
    torch.set_num_threads(1)
    logger.remove()
    logging.getLogger("evotorch").setLevel(logging.WARNING)
    task_options = {"seq_len": 16, "vocab_size": 16} if task_name == "reverse" else {}
    problem = TransformerProblem(make_task(task_name, **task_options), seed=seed)
    searcher = BUILDERS[name](problem, **options)
    start, marks, out = time.perf_counter(), [budget // 4, budget // 2, budget], []
    while marks:
        searcher.step()
        if searcher.evaluations >= marks[0]:
            m = problem.metrics(searcher.current_solution())
            out.append((searcher.evaluations, round(time.perf_counter() - start, 1),
                        round(m["token_accuracy"], 3), round(m["exact_accuracy"], 3)))
            marks.pop(0)
    print(task_name, name, json.dumps(options), "seed", seed, "->", out, flush=True)


if __name__ == "__main__":
    main()
