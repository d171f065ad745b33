"""CartPole-v1 with the velocities hidden: a transformer policy reads the last 8
observations (cart position, pole angle) and must infer the velocities itself.

Uses :func:`evotorch_mqa_moe.run.run`, so the run checkpoints as it goes (Ctrl-C,
then ``--resume``, continues exactly), and writes ``history.csv``,
``results.json`` and ``best_model.pt`` into ``--out``.

    python examples/cartpole.py                     # PGPE, popsize 200, 40 generations
    python examples/cartpole.py --generations 5     # a quick look

The held-out score is the mean return over the task's 100 fixed test episodes (as in
the README). What PGPE and the other searchers reached on this task, and after how
many evaluations, is in the README's "Results" (measured with ``evotorch-mqa-moe
compare cartpole ...``, the command is shown there).
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
from loguru import logger

from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.workflow.checkpoint import load_model
from evotorch_mqa_moe.workflow.run import run
from evotorch_mqa_moe.workflow.settings import RunSettings

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--generations", type=int, default=40)
ap.add_argument("--popsize", type=int, default=200)
ap.add_argument("--out", type=Path, default=Path("runs/cartpole"))
ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
ap.add_argument("--overwrite", action="store_true", help="replace a finished run in OUT")
args = ap.parse_args()

logging.getLogger("evotorch").setLevel(logging.WARNING)
logger.remove()
logger.add(sys.stderr, level="INFO", format="{time:HH:mm:ss} {message}")

settings = RunSettings(task="cartpole", searcher="pgpe", generations=args.generations,
                       popsize=args.popsize, seed=0, eval_every=5, checkpoint_every=5)
results = run(settings, args.out, resume=args.resume, overwrite=args.overwrite)
task = make_task("cartpole")
print(f"held-out mean return over {task.test_episodes} fixed test episodes: "
      f"{results['final_metrics']['mean_return']:.1f} / 500 "
      f"({results['evaluations']:,} evaluations, {results['wall_time']:.0f} s)")

# the evolved policy is an ordinary nn.Module: play one episode with it by hand
policy = load_model(args.out / "best_model.pt").eval()
import gymnasium as gym  # noqa: E402  (cartpole's own dependency)

env = gym.make("CartPole-v1")
obs, _ = env.reset(seed=2024)
frame = torch.as_tensor(task.observe(obs), dtype=torch.float32)
window = frame.expand(task.window, -1).clone()  # (W, I), filled with the first observation
steps, done = 0, False
with torch.no_grad():
    while not done:
        action = int(policy(window[None]).argmax(-1))  # (1, W, I) -> logits (1, 2)
        obs, _, terminated, truncated, _ = env.step(action)
        done, steps = terminated or truncated, steps + 1
        frame = torch.as_tensor(task.observe(obs), dtype=torch.float32)
        window = torch.cat((window[1:], frame[None]))
print(f"one more episode played with best_model.pt: return {steps}")
