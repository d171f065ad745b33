"""Learnability of the example problems: Adam (backprop) on each task's default model.

Run:  .venv/bin/python bench/learnability.py --seeds 0,1,2        # every case of docs/problems.md
      .venv/bin/python bench/learnability.py --case addition-3 --seeds 0,1
      .venv/bin/python bench/learnability.py --lr-sweep 1e-3,3e-3,1e-2 --case sort --stop
      .venv/bin/python bench/learnability.py --case addition --searcher pgpe --evals 100000

Each case trains one ``MQAMoETransformer`` (the task's ``default_config()``, changed
by ``--model``) with :class:`~evotorch_mqa_moe.backprop.BackpropTrainer` (Adam, one
fresh batch of the task's ``batch_size`` per step, the problem's data stream and
initialisation for the given seed) and measures the task's held-out metrics on its
test set every ``--eval-every`` steps. Reported per run:

* **steps to threshold**: the first evaluated step at which the case's threshold on
  the held-out metric holds (``exact_accuracy >= 0.95`` for the sequence tasks,
  ``accuracy >= 0.95`` for ``majority``, ``bits_per_char <= entropy rate + 0.05``
  for ``language`` markov; ``text`` has no known limit, so no threshold), or
  ``-`` if it never held (``--stop`` ends a run there);
* the held-out metrics after the last step;
* seconds spent in steps (wall clock and CPU time of this process; held-out
  evaluations excluded). CPU time is the steadier figure on a shared machine.

``--searcher NAME`` runs a searcher of the registry (``make_searcher(NAME, problem,
popsize=...)``) instead, for ``--evals`` evaluations, scoring its
``current_solution()`` (ES centre, GA best): the check that a gradient-free searcher
has a chance on a task at the suite's budget.

This is a statement about the *task* (the default model can learn it, in how many
gradient steps), not a searcher benchmark (that is ``bench/search.py``): it tells
whether a task measures search or model capacity. Every learnability figure in
``docs/problems.md`` comes from this script; each row printed ends with the command
that reproduces it (one seed; runs are deterministic on one machine and version).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _machine import machine_report
from torch.nn.utils import parameters_to_vector

from evotorch_mqa_moe import num_parameters
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import make_searcher
from evotorch_mqa_moe.searchers.backprop import BackpropTrainer

THRESHOLD_SLACK_BPC = 0.05
"""``language`` markov counts as learned within this many bits/char of the entropy rate."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One learnability check: a task (with options), Adam's lr and a step budget."""

    task: str
    options: dict[str, Any]
    lr: float
    steps: int
    # (metric, ">=" or "<=", value) for the task, or None (report the final metrics only)
    threshold: Callable[[Any], tuple[str, str, float]] | None
    report: tuple[str, ...]  # metrics printed, the target first


def _exact(task) -> tuple[str, str, float]:
    return ("exact_accuracy", ">=", 0.95)


def _accuracy(task) -> tuple[str, str, float]:
    return ("accuracy", ">=", 0.95)


def _entropy_rate(task) -> tuple[str, str, float]:
    return ("bits_per_char", "<=", task.ceiling()["bits_per_char"] + THRESHOLD_SLACK_BPC)


SEQ = ("exact_accuracy", "token_accuracy")
LM = ("bits_per_char", "token_accuracy")
CASES: dict[str, Case] = {
    "reverse": Case("reverse", {}, 1e-2, 300, _exact, SEQ),
    "reverse-16": Case("reverse", {"seq_len": 16, "vocab_size": 16}, 1e-2, 300, _exact, SEQ),
    "sort": Case("sort", {}, 1e-2, 600, _exact, SEQ),
    "addition": Case("addition", {}, 1e-2, 600, _exact, SEQ),
    "addition-2": Case("addition", {"num_digits": 2}, 1e-2, 1000, _exact, SEQ),
    "addition-3": Case("addition", {"num_digits": 3}, 1e-2, 3000, _exact, SEQ),
    "majority": Case("majority", {}, 1e-2, 200, _accuracy, ("accuracy",)),
    "language": Case("language", {}, 1e-2, 1000, _entropy_rate, LM),
    "language-8": Case("language", {"vocab_size": 8, "concentration": 0.5}, 1e-2, 3000,
                       _entropy_rate, LM),
    "language-text": Case("language", {"source": "text"}, 1e-2, 1000, None, LM),
}


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: v}``, values read as Python literals where they parse."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _met(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def run_case(case: Case, *, searcher: str, lr: float, steps: int, evals: int, popsize: int,
             seed: int, eval_every: int, options: dict[str, Any], model: dict[str, Any],
             stop: bool) -> dict[str, Any]:
    """Train one network (``adam``) or search (any other registry name); the steps to the
    threshold, the final held-out metrics and the seconds spent in steps."""
    task = make_task(case.task, **{**case.options, **options})
    config = task.default_config()
    if model:
        config = config.replace(**model)
    problem = TransformerProblem(task, config, seed=seed)
    if searcher == "adam":
        trainer = BackpropTrainer(problem, lr=lr)

        def solution() -> torch.Tensor:
            return parameters_to_vector(trainer.model.parameters()).detach()

        def done(step: int) -> bool:
            return step >= steps
    else:
        trainer = make_searcher(searcher, problem, popsize=popsize)
        solution = trainer.current_solution

        def done(step: int) -> bool:
            return problem.evaluations >= evals
    threshold = case.threshold(task) if case.threshold else None
    reached = None
    wall = cpu = 0.0
    metrics: dict[str, float] = {}
    step = 0
    while True:
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.step()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        step += 1
        last = done(step)
        if step % eval_every == 0 or last:
            metrics = problem.metrics(solution())
            if threshold and reached is None and _met(metrics[threshold[0]], *threshold[1:]):
                reached = step
                last = last or stop
        if last:
            break
    result = {"params": num_parameters(config), "steps": step, "reached": reached,
              "evaluations": problem.evaluations, "threshold": threshold, "metrics": metrics,
              "wall": wall, "cpu": cpu}
    if case.task == "language" and "entropy_rate" in metrics:
        result["refs"] = {k: metrics[k] for k in ("entropy_rate", "bigram_bpc")}
    return result


def command(name: str, how: list[str], seeds: list[int], argv_extra: list[str]) -> str:
    return " ".join(["python bench/learnability.py", f"--case {name}", *how,
                     f"--seeds {','.join(map(str, seeds))}", *argv_extra])


def _fmt_threshold(threshold: tuple[str, str, float] | None) -> str:
    return "-" if threshold is None else f"{threshold[0]} {threshold[1]} {threshold[2]:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--case", action="append", choices=list(CASES),
                    help="case to run (repeatable); default: all")
    ap.add_argument("--seeds", default="0", help="comma-separated problem seeds")
    ap.add_argument("--searcher", default="adam",
                    help="adam (backprop), or a searcher of the registry run for --evals")
    ap.add_argument("--lr", type=float, default=None, help="Adam's lr (default: the case's)")
    ap.add_argument("--lr-sweep", default="", help="comma-separated lrs: run every case at each")
    ap.add_argument("--steps", type=int, default=None, help="Adam steps (default: the case's)")
    ap.add_argument("--evals", type=int, default=100_000,
                    help="evaluation budget of a searcher other than adam")
    ap.add_argument("--popsize", type=int, default=200, help="popsize of a searcher")
    ap.add_argument("--eval-every", type=int, default=50,
                    help="held-out evaluation period in steps (generations)")
    ap.add_argument("--stop", action="store_true", help="stop a run once its threshold holds")
    ap.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="override a task option of the chosen cases")
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help="override a TransformerConfig field of the default model")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    if args.searcher != "adam" and args.lr_sweep:
        raise SystemExit("--lr-sweep applies to --searcher adam only")
    torch.set_num_threads(args.threads)
    logging.getLogger("evotorch").setLevel(logging.WARNING)  # one INFO line per problem
    seeds = [int(s) for s in args.seeds.split(",")]
    options = parse_assignments(args.task_option)
    model = parse_assignments(args.model)
    extra = [f"--task-option {o}" for o in args.task_option]
    extra += [f"--model {m}" for m in args.model]
    extra += [f"--eval-every {args.eval_every}"] if args.eval_every != 50 else []
    extra += ["--stop"] if args.stop else []
    extra += [f"--threads {args.threads}"] if args.threads != 1 else []
    print(machine_report())
    print()
    names = args.case or list(CASES)
    sweep = [float(x) for x in args.lr_sweep.split(",") if x]
    header = ("| case | task options | params | searcher | seed | steps | evaluations | "
              "threshold | steps to threshold | final metrics | seconds in steps (wall / CPU) "
              "| command |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    summary: list[tuple[str, str, list[dict[str, Any]]]] = []
    for name in names:
        case = CASES[name]
        steps = args.steps or case.steps
        if args.searcher == "adam":
            lrs = sweep or [args.lr if args.lr is not None else case.lr]
            settings = [(f"adam lr {lr:g}", lr, ["--searcher adam", f"--lr {lr:g}",
                                                 f"--steps {steps}"]) for lr in lrs]
        else:
            settings = [(f"{args.searcher} popsize {args.popsize}", math.nan,
                         [f"--searcher {args.searcher}", f"--popsize {args.popsize}",
                          f"--evals {args.evals}"])]
        for label, lr, how in settings:
            runs = []
            for seed in seeds:
                r = run_case(case, searcher=args.searcher, lr=lr, steps=steps,
                             evals=args.evals, popsize=args.popsize, seed=seed,
                             eval_every=args.eval_every, options=options, model=model,
                             stop=args.stop)
                runs.append(r)
                shown = ", ".join(f"{k} {r['metrics'][k]:.4g}" for k in case.report)
                if "refs" in r:
                    shown += (f" (entropy rate {r['refs']['entropy_rate']:.3f}, bigram "
                              f"{r['refs']['bigram_bpc']:.3f})")
                opts = {**case.options, **options}
                print(f"| {name} | {opts or '-'} | {r['params']:,} | {label} | {seed} | "
                      f"{r['steps']} | {r['evaluations'] or '-'} | "
                      f"{_fmt_threshold(r['threshold'])} | {r['reached'] or '-'} | {shown} | "
                      f"{r['wall']:.1f} / {r['cpu']:.1f} | "
                      f"`{command(name, how, [seed], extra)}` |", flush=True)
            summary.append((name, label, runs))
    if len(seeds) > 1 or sweep:
        print("\nsummary (median over seeds; a run that missed the threshold counts as "
              "infinitely many steps):")
        for name, label, runs in summary:
            reached = statistics.median(r["reached"] or math.inf for r in runs)
            target = CASES[name].report[0]
            finals = [r["metrics"][target] for r in runs]
            print(f"  {name:14s} {label:18s} steps to threshold median {reached:g} "
                  f"(each: {[r['reached'] for r in runs]}), final {target} median "
                  f"{statistics.median(finals):.4g} [{min(finals):.4g}-{max(finals):.4g}]",
                  flush=True)


if __name__ == "__main__":
    main()
