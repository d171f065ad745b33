"""Population forward pass: ours vs. a module loop vs. vmap(functional_call), and torch.mm peak.

Run:  .venv/bin/python bench/forward.py [--popsize 256] [--rounds 5] [--device cpu]
GPU:  .venv/bin/python bench/forward.py --device cuda [--dtype bfloat16]
      .venv/bin/python bench/forward.py --device cuda --preset seed --popsize 64

Config A (the model issue): P=256, embed 64, 4 heads, 1 KV head, 4 experts of 128,
dense gate, 2 layers, T=16, B=32, float32. The methods are timed in interleaved
rounds (A B C D, A B C D, ...) and compared by their medians, so a noisy, shared
machine slows all of them alike; the printed ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from _machine import machine_report, timed
from torch.func import functional_call, vmap
from torch.nn.utils import vector_to_parameters

from evotorch_mqa_moe import MQAMoETransformer, num_parameters, population_forward, preset
from evotorch_mqa_moe.model import default_chunk_size, init_parameters, parameter_layout


def forward_flops(config, batch: int, seq: int) -> float:
    """Multiply-adds x 2 of one individual's pass (matmuls only)."""
    c, M = config, batch * seq
    qkv = M * c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    scores = batch * c.num_heads * seq * seq * c.head_dim * 2  # QK^T and AV
    out = M * c.num_heads * c.head_dim * c.embed_dim
    gate = M * c.embed_dim * c.num_experts
    experts = 2 * M * c.embed_dim * c.num_experts * c.expert_dim
    head = M * c.embed_dim * c.output_dim
    return 2.0 * (c.num_layers * (qkv + scores + out + gate + experts) + head)



def make_methods(config, params, tokens, device, chunk_size=None):
    model = MQAMoETransformer(config, device=device, dtype=params.dtype)
    names = [n for n, _ in parameter_layout(config)]
    shapes = dict(parameter_layout(config))

    def ours():
        with torch.no_grad():
            return population_forward(config, params, tokens, chunk_size=chunk_size)

    def loop():  # what EvoTorch's stock NEProblem does: load each individual, run it
        with torch.no_grad():
            return torch.stack([
                (vector_to_parameters(row, model.parameters()), model(tokens))[1] for row in params
            ])

    stacked, offset = {}, 0
    for name in names:
        size = torch.Size(shapes[name]).numel()
        stacked[name] = params[:, offset : offset + size].reshape(-1, *shapes[name])
        offset += size

    def one(weights, x):
        return functional_call(model, weights, (x,))

    batched = vmap(one, in_dims=(0, None))

    def vmapped():
        with torch.no_grad():
            return batched(stacked, tokens)

    return {"ours": ours, "module loop": loop, "vmap(functional_call)": vmapped}


def mm_peak(device, dtype, size=2048, reps=5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(reps))
    return 2 * size**3 / best


def peak_memory_child(method: str, args) -> int:
    """Peak resident memory added by one pass of ``method``, measured in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", method, "--popsize", str(args.popsize),
         "--threads", str(torch.get_num_threads()), "--seq", str(args.seq),
         "--preset", args.preset,
         "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def setup(args):
    config = preset(args.preset, max_seq_len=max(args.seq, preset(args.preset).max_seq_len))
    dtype = getattr(torch, args.dtype)
    params = init_parameters(config, args.popsize, generator=torch.Generator().manual_seed(0),
                             dtype=dtype).to(args.device)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq),
                           generator=torch.Generator().manual_seed(1)).to(args.device)
    return config, params, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--popsize", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--preset", default="bench-a", help="bench-a (config A) or seed (GPU scale)")
    ap.add_argument("--chunks", default="", help="comma-separated chunk sizes to sweep too")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config, params, tokens = setup(args)
    methods = make_methods(config, params, tokens, args.device)
    if args.memory_of:
        fn = methods[args.memory_of]
        if torch.device(args.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            print(torch.cuda.max_memory_allocated() - base)
        else:
            # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _rss_kib("VmHWM")
            fn()
            print((_rss_kib("VmHWM") - base) * 1024)
        return

    print(machine_report())
    print(f"config {args.preset}: {config}")
    print(f"N = {num_parameters(config):,} parameters, P = {args.popsize}, "
          f"B = {args.batch}, T = {args.seq}, {args.dtype}, device {args.device}, "
          f"{torch.get_num_threads()} threads, "
          f"default chunk = {default_chunk_size(config, args.batch * args.seq, args.device)}")
    ref = methods["ours"]()
    for name, fn in methods.items():  # warm-up + agreement check
        err = (fn().float() - ref.float()).abs().max().item()
        print(f"  {name:24s} max |diff| vs ours = {err:.2e}")
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(timed(fn, args.device))
    flops = forward_flops(config, args.batch, args.seq) * args.popsize
    peak = mm_peak(args.device, params.dtype)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\ntorch.mm 2048^3 peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'method':24s} {'median s':>9s} {'GFLOP/s':>8s} {'% of mm':>8s} {'ours faster':>11s}"
          f" {'peak mem MiB':>12s}")
    report = {}
    for name in methods:
        mem = peak_memory_child(name, args) / 2**20
        rate = flops / med[name]
        print(f"{name:24s} {med[name]:9.3f} {rate / 1e9:8.1f} {100 * rate / peak:7.0f}% "
              f"{med[name] / med['ours']:10.2f}x {mem:12.0f}")
        report[name] = {"median_s": med[name], "gflops": rate / 1e9, "peak_mem_mib": mem}
    if args.chunks:
        print("\nchunk-size sweep (ours):")
        for chunk in [int(c) for c in args.chunks.split(",")]:
            fn = make_methods(config, params, tokens, args.device, chunk_size=chunk)["ours"]
            fn()
            t = statistics.median(timed(fn, args.device) for _ in range(args.rounds))
            print(f"  chunk {chunk:4d}: {t:.3f} s  ({100 * flops / t / peak:.0f}% of mm)")
    print("\nJSON " + json.dumps(report))


if __name__ == "__main__":
    main()
