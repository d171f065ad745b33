"""Bring your own task and plug it into any EvoTorch searcher.

A task is a small class: how to draw a batch, a loss (fitness = -loss), a fixed
held-out set and its metrics, and a default model size. ``TransformerProblem``
turns it into an EvoTorch ``NEProblem`` that evaluates the whole population in
one vectorised pass, so a stock EvoTorch searcher (here SNES) works unchanged;
``make_searcher`` gives our tuned defaults (here PGPE with ClipUp).

    python examples/custom_task.py                    # 100 generations of SNES and of PGPE
    python examples/custom_task.py --generations 20   # a quick look
"""

import argparse
import logging

import torch
import torch.nn.functional as F
from evotorch.algorithms import SNES

from evotorch_mqa_moe import SupervisedTask, TransformerConfig
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.searchers import make_searcher


class RotateTask(SupervisedTask):
    """Random tokens (B, L) in; at position t the target is the previous token x[t-1]
    (x[L-1] at t=0), so every position must attend to its neighbour."""

    name = "rotate"
    target_metric = "exact_accuracy"

    def __init__(self, vocab_size: int = 6, seq_len: int = 6, batch_size: int = 64):
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        gen = torch.Generator().manual_seed(12345)  # a fixed held-out set
        self._test = self.sample(512, gen)

    def default_config(self) -> TransformerConfig:
        return TransformerConfig(vocab_size=self.vocab_size, embed_dim=16, num_layers=1,
                                 num_heads=2, num_kv_heads=1, expert_dim=32, num_experts=2,
                                 max_seq_len=self.seq_len, positional="learned")

    def sample(self, batch_size: int, generator: torch.Generator):
        x = torch.randint(self.vocab_size, (batch_size, self.seq_len), generator=generator)
        return x, x.roll(1, dims=-1)

    def loss(self, outputs, targets):  # logits (P, B, L, V), targets (B, L) -> (P,)
        P = outputs.shape[0]
        ce = F.cross_entropy(outputs.flatten(0, 2), targets.expand(P, -1, -1).flatten(),
                             reduction="none")
        return ce.view(P, -1).mean(dim=1)

    def test_set(self):
        return self._test

    def score(self, outputs, targets):  # -> each (P,)
        right = outputs.argmax(dim=-1) == targets  # (P, B, L)
        return {"token_accuracy": right.float().mean(dim=(1, 2)),
                "exact_accuracy": right.all(dim=-1).float().mean(dim=1)}


def evolve(searcher, problem, generations: int, label: str) -> float:
    for gen in range(1, generations + 1):
        searcher.step()
        if gen % 25 == 0 or gen == generations:
            m = problem.metrics(searcher.status["center"])
            print(f"{label} gen {gen:4d}  token acc {m['token_accuracy']:.3f}  "
                  f"exact {m['exact_accuracy']:.3f}")
    return problem.metrics(searcher.status["center"])["exact_accuracy"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--popsize", type=int, default=100)
    args = ap.parse_args()
    logging.getLogger("evotorch").setLevel(logging.WARNING)

    task = RotateTask()
    # 1. any stock EvoTorch searcher: start it from the model's own initialisation
    problem = TransformerProblem(task, seed=0)
    snes = SNES(problem, stdev_init=0.05, center_init=problem.init_center(),
                popsize=args.popsize)
    snes_exact = evolve(snes, problem, args.generations, "SNES (stock EvoTorch)")
    # 2. our factory's defaults (fresh problem, so both start from the same seed)
    problem = TransformerProblem(task, seed=0)
    pgpe = make_searcher("pgpe", problem, popsize=args.popsize)
    pgpe_exact = evolve(pgpe, problem, args.generations, "PGPE (make_searcher)")
    print(f"{problem.solution_length:,} parameters; final exact accuracy: "
          f"SNES {snes_exact:.3f}, PGPE {pgpe_exact:.3f}")
