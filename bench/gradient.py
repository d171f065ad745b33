"""Population gradient (forward + backward, every individual its own gradient) vs the forward.

Run:  .venv/bin/python bench/gradient.py [--popsize 64] [--rounds 5] [--threads 1]
      .venv/bin/python bench/gradient.py --chunks 1,2,4,8 --threads 1   # chunk sweep
GPU:  .venv/bin/python bench/gradient.py --device cuda

Config A (``preset("bench-a")``), P=64 by default, token rows as in bench/forward.py
(B=32, T=16), float32. Both passes are timed in interleaved rounds (forward, gradient,
forward, gradient, ...) and compared by their medians, so a busy machine slows both
alike; the ratio gradient / forward is the result (target <= 3.5x). The gradient
pass includes the loss (cross-entropy against random targets) and writes a (P, N)
gradient; the forward is ``population_forward`` under ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _machine import machine_report, timed

from evotorch_mqa_moe import num_parameters, population_forward, preset
from evotorch_mqa_moe.model import default_chunk_size, init_parameters
from evotorch_mqa_moe.problems._scoring import masked_cross_entropy
from evotorch_mqa_moe.searchers.gradients import gradient_chunk_size, population_loss_and_grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--popsize", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--preset", default="bench-a")
    ap.add_argument("--chunks", default="", help="comma-separated gradient chunk sizes to sweep")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = preset(args.preset, max_seq_len=max(args.seq, preset(args.preset).max_seq_len))
    dtype = getattr(torch, args.dtype)
    params = init_parameters(config, args.popsize, generator=torch.Generator().manual_seed(0),
                             dtype=dtype).to(args.device)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    tokens, targets = tokens.to(args.device), targets.to(args.device)
    rows = args.batch * args.seq

    def forward():
        with torch.no_grad():
            return population_forward(config, params, tokens)

    def gradient(chunk_size=None):
        return population_loss_and_grad(config, params, tokens, targets,
                                        loss=masked_cross_entropy, chunk_size=chunk_size)

    print(machine_report())
    print(f"config {args.preset}: {config}")
    fwd_chunk = default_chunk_size(config, rows, args.device, dtype)
    grad_chunk = gradient_chunk_size(config, rows, args.device, dtype)
    print(f"N = {num_parameters(config):,} parameters, P = {args.popsize}, B = {args.batch}, "
          f"T = {args.seq}, {args.dtype}, device {args.device}, {torch.get_num_threads()} "
          f"threads, forward chunk = {fwd_chunk}, gradient chunk = {grad_chunk}")
    forward(), gradient()  # warm-up
    times = {"forward": [], "gradient": []}
    for _ in range(args.rounds):
        times["forward"].append(timed(forward, args.device))
        times["gradient"].append(timed(gradient, args.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["gradient"] / med["forward"]
    print(f"\n{'pass':10s} {'median s':>9s} {'per individual ms':>18s} {'x forward':>10s}")
    for name in ("forward", "gradient"):
        print(f"{name:10s} {med[name]:9.3f} {1e3 * med[name] / args.popsize:18.2f} "
              f"{med[name] / med['forward']:10.2f}")
    print(f"\ngradient / forward = {ratio:.2f}x (target <= 3.5x: "
          f"{'met' if ratio <= 3.5 else 'missed'})")
    report = {"forward_s": med["forward"], "gradient_s": med["gradient"], "ratio": ratio,
              "forward_chunk": fwd_chunk, "gradient_chunk": grad_chunk}
    if args.chunks:
        print("\ngradient chunk-size sweep (x the forward's median):")
        sweep = {}
        for chunk in [int(c) for c in args.chunks.split(",")]:
            gradient(chunk)
            t = statistics.median(timed(lambda c=chunk: gradient(c), args.device)
                                  for _ in range(args.rounds))
            sweep[chunk] = t
            print(f"  chunk {chunk:4d}: {t:.3f} s  ({t / med['forward']:.2f}x)")
        report["sweep"] = sweep
    print("\nJSON " + json.dumps(report))


if __name__ == "__main__":
    main()
