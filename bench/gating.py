"""Linear vs attention gating on ``multitask``: held-out accuracy and routing per operation.

Run:  .venv/bin/python bench/gating.py --seeds 0,1,2 --steps 400 --png results/gating.png
      .venv/bin/python bench/gating.py --searcher pgpe --popsize 200 --steps 300

Each run trains the ``multitask`` default model with
:class:`~evotorch_mqa_moe.backprop.BackpropTrainer` (Adam, a fresh batch per step,
the problem's data stream and initialisation for the seed), or searches with a
registry searcher (``--searcher pgpe``: its ``current_solution()`` is scored), once with
``gating="linear"`` and once with ``gating="attention"``, at nearly equal
parameter counts: attention gating adds ``D * 2hd + 2hd`` parameters per layer, so
the linear model gets wider experts (``--linear-expert-dim``) to make up for them.
Reported per run: held-out ``exact_accuracy`` and ``token_accuracy`` overall and
per operation, and the expert load per operation (mean gate weight of each expert
over the input tokens of the test examples naming that operation, per layer),
with ``separation`` = the mean total-variation distance between the operations'
load vectors (0: every operation uses the experts alike; 1: disjoint experts).
``--png`` draws the load of the first seed as heat maps (needs matplotlib).
One torch thread (``torch.set_num_threads(1)``); a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch.nn.utils import vector_to_parameters

from evotorch_mqa_moe import MQAMoETransformer, num_parameters
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.problems._scoring import accuracies
from evotorch_mqa_moe.problems.multitask import OPERATIONS
from evotorch_mqa_moe.searchers import make_searcher
from evotorch_mqa_moe.searchers.backprop import BackpropTrainer


def routing_and_outputs(model, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (B, T, V) and gate weights (layers, B, T, E) of ``model`` on ``inputs``."""
    with torch.no_grad():
        return model(inputs), model.routing(inputs)


def run(gating: str, seed: int, args: argparse.Namespace) -> dict:
    task = make_task("multitask", vocab_size=args.vocab_size, seq_len=args.seq_len,
                     test_size=args.test_size)
    config = task.default_config().replace(gating=gating)
    if gating == "linear":
        config = config.replace(expert_dim=args.linear_expert_dim)
    problem = TransformerProblem(task, config, seed=seed)
    if args.searcher == "adam":
        trainer = BackpropTrainer(problem, lr=args.lr)
    else:
        trainer = make_searcher(args.searcher, problem, popsize=args.popsize)
    start = time.process_time()
    for _ in range(args.steps):
        trainer.step()
    cpu = time.process_time() - start
    model = MQAMoETransformer(config)
    vector_to_parameters(trainer.current_solution().detach().cpu(), model.parameters())
    inputs, targets = task.test_set()
    outputs, gates = routing_and_outputs(model, inputs)
    ops = inputs[:, 0] - task.vocab_size  # (B,) operation index
    metrics = {k: float(v) for k, v in accuracies(outputs[None], targets).items()}
    per_op, load = {}, []
    for i, op in enumerate(OPERATIONS):
        rows = ops == i
        acc = accuracies(outputs[None, rows], targets[rows])
        per_op[op] = float(acc["exact_accuracy"])
        load.append(gates[:, rows, 1:].mean(dim=(1, 2)))  # (layers, E) over input tokens
    load = torch.stack(load, dim=1)  # (layers, ops, E)
    pairs = list(itertools.combinations(range(len(OPERATIONS)), 2))
    separation = [float(sum(0.5 * (layer[a] - layer[b]).abs().sum() for a, b in pairs)
                        / len(pairs)) for layer in load]
    return {"gating": gating, "seed": seed, "params": num_parameters(config), "cpu_s": cpu,
            "loss": float(task.loss(outputs[None], targets)), **metrics, "per_op": per_op,
            "load": load, "separation": separation}


def draw(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results[0]["load"].shape[0]
    fig, axes = plt.subplots(len(results), layers, figsize=(3.2 * layers, 2.4 * len(results)),
                             squeeze=False)
    for row, r in enumerate(results):
        for layer in range(layers):
            ax = axes[row][layer]
            ax.imshow(r["load"][layer].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_yticks(range(len(OPERATIONS)), OPERATIONS)
            ax.set_xticks(range(r["load"].shape[-1]))
            ax.set_xlabel("expert")
            ax.set_title(f"{r['gating']} seed {r['seed']} layer {layer}\n"
                         f"exact {r['exact_accuracy']:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=400,
                        help="Adam steps, or generations of --searcher")
    parser.add_argument("--searcher", default="adam",
                        help="adam, or a searcher of the registry (e.g. pgpe)")
    parser.add_argument("--popsize", type=int, default=200, help="popsize of a searcher")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--vocab-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--test-size", type=int, default=1024)
    parser.add_argument("--linear-expert-dim", type=int, default=18,
                        help="expert width of the linear-gating model (default model: 16)")
    parser.add_argument("--gatings", default="linear,attention")
    parser.add_argument("--png", default=None, help="heat maps of the first seed's load")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        for gating in args.gatings.split(","):
            r = run(gating, seed, args)
            results.append(r)
            per_op = " ".join(f"{op} {v:.3f}" for op, v in r["per_op"].items())
            sep = " ".join(f"{s:.2f}" for s in r["separation"])
            print(f"{gating:9s} seed {seed} params {r['params']:5d} exact "
                  f"{r['exact_accuracy']:.3f} token {r['token_accuracy']:.3f} "
                  f"[{per_op}] separation/layer [{sep}] test loss {r['loss']:.3f} "
                  f"cpu {r['cpu_s']:.0f}s", flush=True)
            for layer, load in enumerate(r["load"]):
                rows = "; ".join(f"{op} " + " ".join(f"{w:.2f}" for w in load[i].tolist())
                                 for i, op in enumerate(OPERATIONS))
                print(f"    layer {layer} load: {rows}")
    print("\nmean over seeds:")
    for gating in args.gatings.split(","):
        rs = [r for r in results if r["gating"] == gating]
        mean = sum(r["exact_accuracy"] for r in rs) / len(rs)
        ops = {op: sum(r["per_op"][op] for r in rs) / len(rs) for op in OPERATIONS}
        sep = sum(sum(r["separation"]) / len(r["separation"]) for r in rs) / len(rs)
        print(f"  {gating:9s} exact {mean:.3f} (" + ", ".join(f"{r['exact_accuracy']:.3f}"
              for r in rs) + ") " + " ".join(f"{op} {v:.3f}" for op, v in ops.items())
              + f" separation {sep:.2f}")
    if args.png:
        draw([r for r in results if r["seed"] == seeds[0]], args.png)


if __name__ == "__main__":
    main()
