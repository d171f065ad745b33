"""Incremental decoding with the key/value cache vs recomputing the whole prefix, and
what multi-query attention saves: MQA (K=1) vs GQA (K=2) vs MHA (K=H) at equal width.

Run:  .venv/bin/python bench/generate.py [--rounds 5] [--device cpu] [--quick]
GPU:  .venv/bin/python bench/generate.py --device cuda

Model: embed 128, 8 query heads (head_dim 16), 2 layers, 4 experts of 128, character
vocabulary (97), max_seq_len 256; only num_kv_heads changes. B = 8 prompts.

1. **Decode step at context T** (T = 64, 128, 256; P = 1 and 64): the time to choose
   the next token of every (individual, prompt) when T - 1 tokens are already there,
   with the cache (one token row per sequence) and by recomputation (the whole
   T-token sequence), as tokens per second. The methods run in interleaved rounds
   (A B C ..., A B C ...) and are compared by their medians: the ratios are the
   result on a shared, noisy machine.
2. **Cache memory**, read off the cache tensors after filling T = 256 positions.
3. **Whole generations**: a 16-token prompt continued to 256 tokens, cached vs
   recomputed (P = 1), and cached for P = 64.
4. bf16 rows (decode step, P = 64, T = 256) where the device runs bf16.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _machine import machine_report, timed

from evotorch_mqa_moe.model import (
    KVCache,
    TransformerConfig,
    init_parameters,
    population_generate,
    transformer_forward,
)
from evotorch_mqa_moe.model.layout import _weight_views

HEADS = 8
BATCH = 8


def config_for(kv_heads: int, max_len: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=97, embed_dim=128, num_heads=HEADS, num_kv_heads=kv_heads,
                             num_layers=2, expert_dim=128, num_experts=4, max_seq_len=max_len,
                             causal=True, positional="learned")


def step_methods(config, params, T, device):
    """Two callables choosing token T of every sequence: cached and recomputed."""
    weights = _weight_views(config, params)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (params.shape[0], BATCH, T), generator=gen)
    tokens = tokens.to(device)
    cache = KVCache(config, T)
    with torch.no_grad():
        transformer_forward(config, weights, tokens[..., : T - 1], cache=cache)

    def cached():
        cache.length = T - 1  # the same step again: rewrites position T - 1 in place
        with torch.no_grad():
            return transformer_forward(config, weights, tokens[..., T - 1 :], cache=cache)

    def recompute():
        with torch.no_grad():
            return transformer_forward(config, weights, tokens)[..., -1, :]

    return cached, recompute, cache


def median_times(methods: dict, rounds: int, device) -> dict[str, float]:
    times = {name: [] for name in methods}
    for fn in methods.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="T = 256 and P = 64 only, 3 rounds")
    args = ap.parse_args()
    device = torch.device(args.device)
    rounds = 3 if args.quick else args.rounds
    print(machine_report())
    kinds = {"MQA K=1": 1, "GQA K=2": 2, f"MHA K={HEADS}": HEADS}
    lengths = (256,) if args.quick else (64, 128, 256)
    pops = (64,) if args.quick else (1, 64)

    print("\n1. decode step at context T: tokens/s (P x B new tokens per step), medians of "
          f"{rounds} interleaved rounds")
    print(f"{'P':>3} {'T':>4} {'attention':<9} {'cached tok/s':>13} {'recompute tok/s':>16} "
          f"{'cache speed-up':>15} {'vs MHA cached':>14}")
    for P in pops:
        for T in lengths:
            methods, caches = {}, {}
            for name, K in kinds.items():
                config = config_for(K, 256)
                params = init_parameters(config, P, generator=torch.Generator().manual_seed(0))
                cached, recompute, cache = step_methods(config, params.to(device), T, device)
                methods[(name, "cached")], methods[(name, "recompute")] = cached, recompute
                caches[name] = cache
            med = median_times(methods, rounds, device)
            mha = med[(f"MHA K={HEADS}", "cached")]
            for name in kinds:
                c, r = med[(name, "cached")], med[(name, "recompute")]
                n = P * BATCH
                print(f"{P:>3} {T:>4} {name:<9} {n / c:>13,.0f} {n / r:>16,.0f} "
                      f"{r / c:>14.1f}x {mha / c:>13.2f}x")

    print("\n2. cache memory at T = 256, B = 8, float32, measured from the cache tensors")
    print(f"{'P':>3} {'attention':<9} {'bytes':>14} {'/ MHA':>7}")
    for P in pops:
        sizes = {}
        for name, K in kinds.items():
            config = config_for(K, 256)
            params = init_parameters(config, P, generator=torch.Generator().manual_seed(0))
            cache = KVCache(config, 256)
            tokens = torch.zeros(P, BATCH, 256, dtype=torch.long, device=device)
            with torch.no_grad():
                transformer_forward(config, _weight_views(config, params.to(device)), tokens,
                                    cache=cache)
            sizes[name] = cache.nbytes()
        mha = sizes[f"MHA K={HEADS}"]
        for name in kinds:
            print(f"{P:>3} {name:<9} {sizes[name]:>14,} {sizes[name] / mha:>7.3f}")

    if not args.quick:
        print("\n3. whole generations: 16-token prompts continued to 256 tokens (240 new), "
              "greedy; wall seconds (one run each)")
        prompts = torch.randint(0, 97, (BATCH, 16), generator=torch.Generator().manual_seed(1))
        prompts = prompts.to(device)
        for name, K in kinds.items():
            config = config_for(K, 256)
            for P, cache_too in ((1, True), (64, False)):
                params = init_parameters(config, P, generator=torch.Generator().manual_seed(0))
                params = params.to(device)

                def run(use_cache, params=params, config=config):
                    return population_generate(config, params, prompts, 240, greedy=True,
                                               use_cache=use_cache)

                t_cached = timed(lambda run=run: run(True), device)
                line = (f"P={P:>2} {name:<9} cached {t_cached:7.2f} s "
                        f"({P * BATCH * 240 / t_cached:,.0f} tok/s)")
                if cache_too:
                    t_full = timed(lambda run=run: run(False), device)
                    line += (f", recomputed {t_full:7.2f} s: cache {t_full / t_cached:.1f}x "
                             "faster")
                print(line)

    print("\n4. bf16 decode step, P = 64, T = 256 (tokens/s)")
    methods = {}
    for name, K in kinds.items():
        config = config_for(K, 256)
        params = init_parameters(config, 64, generator=torch.Generator().manual_seed(0))
        for dtype in (torch.float32, torch.bfloat16):
            try:
                cached, _, _ = step_methods(config, params.to(device, dtype), 256, device)
                cached()
            except RuntimeError as exc:  # a device without bf16 kernels
                print(f"{name} {dtype}: not run ({str(exc).splitlines()[0]})")
                continue
            methods[(name, str(dtype).split(".")[-1])] = cached
    med = median_times(methods, rounds, device)
    for (name, dtype), t in med.items():
        print(f"{name:<9} {dtype:<9} {64 * BATCH / t:>10,.0f} tok/s")


if __name__ == "__main__":
    main()
