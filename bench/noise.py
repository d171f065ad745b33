"""Ways to make ES noise that can be regenerated: a counter-based hash per number vs a
reseeded ``torch.Generator`` per antithetic pair, against one plain ``torch.randn``.

Run:  .venv/bin/python bench/noise.py [--rounds 5] [--pairs 2000] [--threads 1]

Each method makes ``pairs`` x 5,696 standard normals (one pair of config A's rank-1
directions: what ``lowrank-es`` regenerates per pair): ``randn`` (one call, stored
noise: cannot regenerate a slice), ``seeded per pair`` (``manual_seed(derive_key(seed,
k))`` + ``randn`` per pair, what ``noise="seeded"`` does) and ``PCG hash`` (the
vectorised counter-based ``counter_rng.normals``: PCG-hash words + Box-Muller).
Interleaved rounds, medians, ns per number and the ratio to ``randn``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _machine import machine_report, timed

from evotorch_mqa_moe.evolution.counter_rng import derive_key, normals

PAIR_SIZE = 5_696  # config A, rank 1: vectors + r (R + C) of every matrix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_report())
    pairs, gen = args.pairs, torch.Generator()
    keys = torch.tensor([derive_key(0, k) for k in range(pairs)])

    def plain():
        return torch.randn(pairs, PAIR_SIZE, generator=gen)

    def seeded():
        rows = []
        for k in range(pairs):
            gen.manual_seed(derive_key(0, k))
            rows.append(torch.randn(PAIR_SIZE, generator=gen))
        return torch.stack(rows)

    def hashed():
        return normals(keys, PAIR_SIZE)

    methods = {"randn (stored)": plain, "seeded per pair": seeded, "PCG hash": hashed}
    times = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(timed(fn, "cpu"))
    base = statistics.median(times["randn (stored)"])
    print(f"\n{pairs} pairs x {PAIR_SIZE} normals, {args.rounds} rounds, "
          f"{args.threads} thread(s)")
    print("| method | ns per number | / randn |\n|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t / (pairs * PAIR_SIZE) * 1e9:.1f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
