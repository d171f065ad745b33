"""Pretrain with adam on g2p, then fine-tune from that model with equal budgets: adam
continued on cross-entropy, pgpe / lowrank-es / ga on the metric (fitness="metric":
-WER of the training batch), and reinforce; plus a gradient-free searcher from scratch.

Run:  .venv/bin/python bench/finetune.py --threads 1                      # the docs' table
      .venv/bin/python bench/finetune.py --quick                          # a smoke test
      .venv/bin/python bench/finetune.py --methods pgpe,reinforce --seeds 0

Every run goes through ``evotorch_mqa_moe.workflow.run.run`` (the same code as the CLI)
into ``OUT/<method>/seed<k>``; the pretraining run is ``OUT/pretrain`` (seed 0, one model
for every fine-tuning run, which starts from its ``best_model.pt`` with ``init=``). A
folder that already holds a finished run is reused (delete it to run again).

Budgets are forward-equivalents (one forward of one individual on one task batch of 64
words = 1, a backward 2 more: one adam or reinforce step = 3). Reported per method
(mean and standard deviation over the seeds): test WER and PER of the final solution
(ES centre, GA best, the network), wall time of the steps (held-out evaluations
excluded), forward-equivalents; and the pretrained model's WER / PER. Each row ends
with the command of one of its runs. Machine and versions are printed first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from _machine import machine_report

from evotorch_mqa_moe.workflow.run import run
from evotorch_mqa_moe.workflow.settings import RunSettings

# method -> (searcher, fitness, popsize, stdev, searcher options, starts from the pretrained)
METHODS = {
    "adam": ("adam", "loss", None, None, {"lr": 1e-3}, True),
    "pgpe": ("pgpe", "metric", 200, 0.01, {}, True),
    "lowrank-es": ("lowrank-es", "metric", 200, 0.01, {}, True),
    "ga": ("ga", "metric", 50, 0.01, {}, True),
    "reinforce": ("reinforce", "metric", 8, None, {"lr": 1e-4}, True),
    "pgpe-scratch": ("pgpe", "loss", 200, None, {}, False),
}


def _key_values(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _command(args: argparse.Namespace, method: str, seed: int) -> str:
    parts = ["bench/finetune.py", f"--methods {method}", f"--seeds {seed}",
             f"--pretrain-evals {args.pretrain_evals}", f"--finetune-evals {args.finetune_evals}",
             f"--threads {args.threads}", f"--out {args.out}"]
    parts += [f"--task-option {t}" for t in args.task_option]
    parts += [f"--model {m}" for m in args.model]
    return " ".join(parts)


def _run(settings: RunSettings, folder: Path) -> dict:
    done = folder / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    return run(settings, folder, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-evals", type=int, default=60000,
                    help="adam pretraining budget (forward-equivalents; 3 per step)")
    ap.add_argument("--finetune-evals", type=int, default=10000,
                    help="budget of every fine-tuning (and from-scratch) run")
    ap.add_argument("--pretrain-lr", type=float, default=1e-2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task-option", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--out", type=Path, default=Path("runs/finetune"))
    ap.add_argument("--quick", action="store_true",
                    help="tiny budgets and test split (a smoke test, not a result)")
    args = ap.parse_args(argv)
    if args.quick:
        args.pretrain_evals, args.finetune_evals = 300, 600
        args.task_option = ["test_size=200", "valid_size=0", *args.task_option]
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    task_options = _key_values(args.task_option)
    model = _key_values(args.model)
    print(machine_report())
    big = 10**9  # held-out metrics only at the end (they are not part of the budget)
    pretrain = RunSettings(task="g2p", searcher="adam", max_evaluations=args.pretrain_evals,
                           seed=0, task_options=task_options, model=model,
                           searcher_options={"lr": args.pretrain_lr}, eval_every=big,
                           checkpoint_every=big)
    init = str(args.out / "pretrain" / "best_model.pt")
    if any(METHODS[m][5] for m in methods):  # some method starts from the pretrained model
        base = _run(pretrain, args.out / "pretrain")
        pre = base["final_metrics"]
        print(f"\npretrained: adam lr {args.pretrain_lr:g}, {base['evaluations']:,} "
              f"forward-equivalents, {base['wall_time']:.0f} s: test WER "
              f"{pre['word_error_rate']:.4f}, PER {pre['phoneme_error_rate']:.4f} "
              f"({base['parameters']:,} parameters)\n")
    else:
        base = pre = None
    print("| method | fitness | from | test WER | test PER | wall s | fwd-eq | command |")
    print("|---|---|---|---|---|---|---|---|")
    table = {}
    for method in methods:
        searcher, fitness, popsize, stdev, options, warm = METHODS[method]
        rows = []
        for seed in seeds:
            settings = RunSettings(
                task="g2p", searcher=searcher, max_evaluations=args.finetune_evals, seed=seed,
                popsize=popsize, stdev=stdev, task_options={**task_options, "fitness": fitness},
                model=model, searcher_options=dict(options), eval_every=big,
                checkpoint_every=big, init=init if warm else None)
            rows.append(_run(settings, args.out / method / f"seed{seed}"))
            sys.stdout.flush()

        def stat(values: list[float], digits: int = 4) -> str:
            if len(values) == 1:
                return f"{values[0]:.{digits}f}"
            return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

        wer = [r["final_metrics"]["word_error_rate"] for r in rows]
        per = [r["final_metrics"]["phoneme_error_rate"] for r in rows]
        wall = [r["wall_time"] for r in rows]
        evals = [r["evaluations"] for r in rows]
        table[method] = {"wer": wer, "per": per, "wall": wall, "evals": evals}
        print(f"| {method} | {fitness} | {'pretrained' if warm else 'scratch'} | {stat(wer)} | "
              f"{stat(per)} | {stat(wall, 0)} | {statistics.mean(evals):,.0f} | "
              f"`{_command(args, method, seeds[0])}` |")
        sys.stdout.flush()
    pretrained = None if pre is None else {
        "wer": pre["word_error_rate"], "per": pre["phoneme_error_rate"],
        "evaluations": base["evaluations"], "wall": base["wall_time"]}
    name = "finetune.json" if pre is not None else "finetune-scratch.json"
    (args.out / name).write_text(json.dumps(
        {"pretrained": pretrained, "methods": table, "seeds": seeds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
