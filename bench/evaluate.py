"""GA generations/s: our vectorised TransformerProblem vs. EvoTorch's stock NEProblem.

Run:  .venv/bin/python bench/evaluate.py [--rounds 3] [--ours-gens 3] [--threads 2]

Config A (the model issue): P=256, embed 64, 4 heads, 1 KV head, 4 experts of 128,
dense gate, 2 layers, T=16, B=32, float32, on the ``reverse`` task with vocab 16,
length 16 and batch 32 (fitness = -cross-entropy on one batch per generation).

* ours:  ``TransformerProblem`` + ``make_searcher("ga", problem, popsize=P)``: the
  whole population goes through ``population_forward`` in one call.
* stock: ``evotorch.neuroevolution.NEProblem("max", network=..., network_eval_func=f)``
  with no override (EvoTorch loads each solution into one module and calls ``f``),
  and the same GA (``seed_genetic_algorithm(stock, popsize=P)``). ``f`` draws the
  generation's batch from the same data stream as ours (common random numbers) and
  runs the module under ``torch.no_grad()`` (EvoTorch does not do this for you).

Checks first: (1) both problems give the same fitness to the same solutions on the
same batch; (2) both GAs, started from the same population and generator state,
make the same first generation. Then generations are timed in interleaved rounds
(``ours-gens`` of ours, one of stock, repeat), so a noisy, shared machine slows both
alike, and medians per generation are compared. For our GA the time spent inside
``problem.evaluate`` is measured per step; the rest (cross-over, mutation,
selection, EvoTorch bookkeeping) is reported as the share outside evaluation.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch
from _machine import machine_report
from evotorch import SolutionBatch
from evotorch.neuroevolution import NEProblem

from evotorch_mqa_moe import MQAMoETransformer, num_parameters, preset
from evotorch_mqa_moe.evolution.ga import seed_genetic_algorithm
from evotorch_mqa_moe.model import default_chunk_size, init_parameters
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import make_searcher


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class EvalTimer:
    """Wraps ``problem.evaluate`` and sums the seconds spent inside it."""

    def __init__(self, problem, device: str):
        self.seconds = 0.0
        self.device = device
        self._evaluate = problem.evaluate
        problem.evaluate = self  # instance attribute shadows the method

    def __call__(self, batch):
        sync(self.device)
        start = time.perf_counter()
        try:
            return self._evaluate(batch)
        finally:
            sync(self.device)
            self.seconds += time.perf_counter() - start


class Timed:
    """Wraps a callable (e.g. the GA's cross-over operator), sums its seconds, and
    passes attribute access through (``last_parent_indices``, ...)."""

    def __init__(self, fn, device: str):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            sync(self.device)
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.fn, name)


def build(args):
    task = make_task("reverse", vocab_size=args.vocab, seq_len=args.seq,
                     batch_size=args.batch)
    config = preset("bench-a", vocab_size=args.vocab, max_seq_len=args.seq)
    ours = TransformerProblem(task, config, seed=args.seed, device=args.device,
                              data_refresh="generation")

    epoch = {"value": 0}

    def eval_func(net: MQAMoETransformer) -> torch.Tensor:
        # What a user writes for the stock NEProblem: sample this generation's batch
        # (the same stream as ours), run the one network, return -loss.
        inputs, targets = task.sample(task.batch_size, ours.data_generator(epoch["value"]))
        device = next(net.parameters()).device
        with torch.no_grad():
            logits = net(inputs.to(device))
        return -task.loss(logits.unsqueeze(0), targets.to(device))[0]

    def next_epoch() -> None:
        epoch["value"] += 1

    stock = NEProblem("max", network=lambda: MQAMoETransformer(config),
                      network_eval_func=eval_func, seed=args.seed, device=args.device)
    return task, config, ours, stock, epoch, next_epoch


def check_fitness(args, config, ours, stock) -> float:
    """Max |fitness difference| of the two problems on the same solutions and batch."""
    values = init_parameters(config, args.popsize, generator=torch.Generator().manual_seed(7),
                             device=args.device)
    evals = []
    for problem in (ours, stock):
        batch = SolutionBatch(problem, popsize=args.popsize, empty=True)
        batch.set_values(values.clone())
        problem.evaluate(batch)  # ours: data epoch 0; stock: epoch counter 0
        evals.append(batch.evals[:, 0].as_subclass(torch.Tensor).clone())
    spread = float(evals[0].max() - evals[0].min())
    print(f"fitness check: {args.popsize} solutions, one fixed batch: "
          f"max |ours - stock| = {(evals[0] - evals[1]).abs().max().item():.2e} "
          f"(fitness range {evals[0].min().item():.4f} .. {evals[0].max().item():.4f}, "
          f"spread {spread:.4f})")
    return (evals[0] - evals[1]).abs().max().item()


def make_gas(args, config, ours, stock, next_epoch):
    ga_ours = make_searcher("ga", ours, popsize=args.popsize)
    ga_stock = seed_genetic_algorithm(stock, popsize=args.popsize)  # make_searcher's defaults
    stock.data_refresh = "generation"  # only informative; the hook below does the work
    ga_stock.before_step_hook.append(next_epoch)
    # Same start: the same initialised networks (the stock problem would otherwise
    # start at EvoTorch's +-1e-5 bounds) and the same generator state for the operators.
    start = init_parameters(config, args.popsize, generator=torch.Generator().manual_seed(11),
                            device=args.device)
    for ga, problem in ((ga_ours, ours), (ga_stock, stock)):
        ga.population.set_values(start.clone())
        problem.manual_seed(args.seed + 1)
    return ga_ours, ga_stock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--popsize", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ours-gens", type=int, default=3, help="our generations per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", type=int, default=0,
                    help="also cProfile this many of our generations and print the top")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(machine_report())
    task, config, ours, stock, epoch, next_epoch = build(args)
    print(f"task: {task!r}\nconfig A: {config}\nN = {num_parameters(config):,} parameters, "
          f"P = {args.popsize}, B = {args.batch}, T = {args.seq}, float32, {args.device}, "
          f"torch threads {torch.get_num_threads()}, "
          f"default chunk = {default_chunk_size(config, args.batch * args.seq, args.device)}")
    fit_diff = check_fitness(args, config, ours, stock)

    ga_ours, ga_stock = make_gas(args, config, ours, stock, next_epoch)
    timer = EvalTimer(ours, args.device)
    # Split the time outside evaluation (SeedGeneticAlgorithm calls these two).
    ga_ours._cross_over.make_children = cross_timer = Timed(ga_ours._cross_over.make_children,
                                                            args.device)
    ga_ours._mutation.mutate_values = mut_timer = Timed(ga_ours._mutation.mutate_values,
                                                        args.device)
    ga_ours.step()  # warm-up, and the first generation of both GAs must agree
    ga_stock.step()
    pop_diff = (ga_ours.population.values - ga_stock.population.values).abs().max().item()
    eval_diff = (ga_ours.population.evals - ga_stock.population.evals).abs().max().item()
    print(f"first generation from the same start: max |population diff| = {pop_diff:.2e}, "
          f"max |fitness diff| = {eval_diff:.2e}, data epoch ours {ours._data_epoch} / "
          f"stock {epoch['value']}")

    ours_steps, ours_eval, ours_cross, ours_mut, stock_steps = [], [], [], [], []
    for _ in range(args.rounds):
        for _ in range(args.ours_gens):
            timer.seconds = cross_timer.seconds = mut_timer.seconds = 0.0
            sync(args.device)
            start = time.perf_counter()
            ga_ours.step()
            sync(args.device)
            ours_steps.append(time.perf_counter() - start)
            ours_eval.append(timer.seconds)
            ours_cross.append(cross_timer.seconds)
            ours_mut.append(mut_timer.seconds)
        sync(args.device)
        start = time.perf_counter()
        ga_stock.step()
        sync(args.device)
        stock_steps.append(time.perf_counter() - start)

    t_ours, t_stock = statistics.median(ours_steps), statistics.median(stock_steps)
    outside = [1 - e / s for e, s in zip(ours_eval, ours_steps, strict=True)]
    share = statistics.median(outside)
    ratio = t_stock / t_ours
    print(f"\n{'GA over':26s} {'gens':>5s} {'median s/gen':>12s} {'gens/s':>8s} "
          f"{'min s':>7s} {'max s':>7s}")
    for name, steps in (("TransformerProblem (ours)", ours_steps),
                        ("stock NEProblem", stock_steps)):
        med = statistics.median(steps)
        print(f"{name:26s} {len(steps):5d} {med:12.3f} {1 / med:8.2f} "
              f"{min(steps):7.3f} {max(steps):7.3f}")
    print(f"\nours faster: {ratio:.1f}x  (target >= 5x: {'met' if ratio >= 5 else 'MISSED'})")
    print(f"ours, per generation: evaluate {statistics.median(ours_eval):.3f} s of "
          f"{t_ours:.3f} s; share outside evaluation: median {100 * share:.1f}% "
          f"(min {100 * min(outside):.1f}%, max {100 * max(outside):.1f}%)  "
          f"(target <= 10%: {'met' if share <= 0.10 else 'MISSED'})")
    cross, mut = statistics.median(ours_cross), statistics.median(ours_mut)
    rest = statistics.median(s - e - c - m for s, e, c, m
                             in zip(ours_steps, ours_eval, ours_cross, ours_mut, strict=True))
    print(f"  outside evaluation, median s/gen: cross-over {cross:.3f} "
          f"({100 * cross / t_ours:.1f}%), mutation {mut:.3f} ({100 * mut / t_ours:.1f}%), "
          f"rest (elites, SolutionBatch cat/alloc, hooks) {rest:.3f} "
          f"({100 * rest / t_ours:.1f}%)")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.profile):
            ga_ours.step()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(f"\ncProfile of {args.profile} generations of ours (top 15 by own time):")
        print(out.getvalue())

    report = {"ours_s_per_gen": t_ours, "stock_s_per_gen": t_stock, "ratio": ratio,
              "ours_outside_eval_share": share,
              "ours_cross_over_s": cross, "ours_mutation_s": mut, "ours_rest_s": rest,
              "fitness_max_abs_diff": fit_diff,
              "first_gen_pop_max_abs_diff": pop_diff, "threads": torch.get_num_threads()}
    print("\nJSON " + json.dumps(report))


if __name__ == "__main__":
    main()
