"""The benchmarks of bench/gpu_check.sh: one JSON and one markdown table in a folder.

Run:  .venv/bin/python bench/gpu_check.py OUT [--device cuda] [--tiny] [--tests-log FILE]

For config A and the seed preset, in float32 and bfloat16 (skipped, with the reason,
where the device has no bf16), on ``--device``:

* ``forward``: the dense population pass (P=64) and the low-rank pass (P=1024; mode
  ``auto`` and ``factors``) against the shared-GEMM floor (one network over the same
  P*B*T rows, in pieces of the pass's chunk): seconds, GFLOP/s, % of a 2048^3 ``torch.mm``
  in the same dtype, peak accelerator memory;
* ``operators``: one GA variation step on the dense (P=64, N) population (truncation
  pairs, uniform cross-over, Gaussian mutation with p=0.1), as a multiple of a clone;
* ``evaluate``: one generation (after a warm-up one) of ``ga`` (dense, P=64) and of
  ``lowrank-es`` (P=1024) through :class:`TransformerProblem` (config A on ``reverse``,
  the seed preset on ``language``), seconds and forward-equivalents per second;
* ``bf16``: bf16 against float32 on one low-rank population (output error, fitness
  agreement), from bench/lowrank.py.

Every measurement is wrapped: a failure is recorded (``"error"``) and the rest still
runs, so one run always gives a complete report. ``--tiny`` shrinks every size (a CPU
smoke test of the script; tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from _machine import machine_report, sync, timed
from lowrank import bf16_accuracy, forward_flops, mm_peak, pass_methods

from evotorch_mqa_moe import population_forward, preset
from evotorch_mqa_moe.evolution.crossover import uniform_cross_over
from evotorch_mqa_moe.evolution.mutation import gaussian_mutation_
from evotorch_mqa_moe.evolution.selection import truncation_pairs
from evotorch_mqa_moe.model import init_parameters, preset_overrides, resolve_dtype
from evotorch_mqa_moe.problem import TransformerProblem
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.searchers import make_searcher

# (preset, dense P, low-rank P, batch B, sequence T) at full size and --tiny
SIZES = {
    False: {"bench-a": (64, 1024, 32, 16), "seed": (64, 1024, 4, 32)},
    True: {"bench-a": (8, 16, 4, 16), "seed": (4, 8, 2, 8)},
}


def config_for(name: str, tiny: bool, seq: int):
    """The preset (``--tiny``: the seed preset's shape at a CPU-friendly width)."""
    config = preset(name)
    if tiny and name == "seed":
        config = config.replace(vocab_size=64, embed_dim=32, num_heads=4, expert_dim=64,
                                num_layers=2)
    return config.replace(max_seq_len=max(seq, config.max_seq_len))


def _median_time(fn, device, rounds: int) -> float:
    fn()
    return statistics.median(timed(fn, device) for _ in range(rounds))


def _peak_gib(fn, device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def guarded(rows: list, record: dict, fn) -> None:
    """Run ``fn() -> dict``; append ``record`` updated with its result or its error."""
    start = time.perf_counter()
    try:
        record.update(fn())
    except Exception as exc:  # noqa: BLE001 - a one-shot report keeps going
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        record["traceback"] = traceback.format_exc(limit=-4)
        print(f"  ERROR in {record}: {record['error']}")
    record["wall_s"] = round(time.perf_counter() - start, 2)
    rows.append(record)
    if torch.device(record.get("device", "cpu")).type == "cuda":
        torch.cuda.empty_cache()


def bench_forward(name, dtype, args, rows, peak) -> None:
    P_dense, P_low, B, T = SIZES[args.tiny][name]
    config = config_for(name, args.tiny, T)
    flops_one = forward_flops(config, B, T)
    base = {"section": "forward", "preset": name, "dtype": str(dtype)[6:], "device": args.device}

    def dense():
        values = init_parameters(config, P_dense, device=args.device,
                                 generator=torch.Generator(args.device).manual_seed(0)).to(dtype)
        tokens = torch.randint(0, config.vocab_size, (B, T)).to(args.device)
        with torch.no_grad():
            fn = lambda: population_forward(config, values, tokens)  # noqa: E731
            t = _median_time(fn, args.device, args.rounds)
            mem = _peak_gib(fn, args.device)
        rate = flops_one * P_dense / t
        return {"P": P_dense, "seconds": t, "gflops": rate / 1e9, "pct_mm": 100 * rate / peak,
                "peak_gib": mem}

    guarded(rows, {**base, "method": "dense population"}, dense)
    methods, times = {}, {}

    def build():
        methods.update(pass_methods(config, P_low, B, T, args.device, dtype, dense=False))
        return {"P": P_low}

    guarded(rows, {**base, "method": "build low-rank population"}, build)
    order = ["floor: 1 network, P*B*T rows", "lowrank (auto)", "lowrank (factors)"]
    for method in order:
        if method not in methods:
            continue
        fn = methods[method]

        def one(fn=fn, method=method):
            with torch.no_grad():
                t = _median_time(fn, args.device, args.rounds)
                mem = _peak_gib(fn, args.device)
            times[method] = t
            rate = flops_one * P_low / t
            out = {"P": P_low, "seconds": t, "gflops": rate / 1e9, "pct_mm": 100 * rate / peak,
                   "peak_gib": mem}
            floor = times.get(order[0])
            if floor and method != order[0]:
                out["vs_floor"] = t / floor
            return out

        guarded(rows, {**base, "method": method}, one)
    methods.clear()


def bench_operators(name, dtype, args, rows) -> None:
    P, _, _, T = SIZES[args.tiny][name]
    config = config_for(name, args.tiny, T)
    base = {"section": "operators", "preset": name, "dtype": str(dtype)[6:],
            "device": args.device, "method": "GA variation step (x clone)"}

    def step():
        values = init_parameters(config, P, device=args.device,
                                 generator=torch.Generator(args.device).manual_seed(0)).to(dtype)
        fitness = torch.randn(P, device=args.device)
        gen = torch.Generator(device=args.device).manual_seed(0)

        def variation():
            first, second = truncation_pairs(fitness, P // 2, fraction=0.2, maximize=True,
                                             generator=gen)
            kids = torch.cat(uniform_cross_over(values[first], values[second], generator=gen))
            gaussian_mutation_(kids, stdev=0.05, mutation_probability=0.1, generator=gen)
            return kids

        t = _median_time(variation, args.device, args.rounds)
        clone = _median_time(values.clone, args.device, args.rounds)
        mem = _peak_gib(variation, args.device)
        return {"P": P, "N": values.shape[1], "seconds": t, "x_clone": t / clone,
                "peak_gib": mem}

    guarded(rows, dict(base), step)


def bench_evaluate(name, dtype, args, rows) -> None:
    P_dense, P_low, B, T = SIZES[args.tiny][name]
    if name == "bench-a":
        task = make_task("reverse", vocab_size=16, seq_len=T, batch_size=B)
        config = preset("bench-a", max_seq_len=T)
    else:
        task = make_task("language", seq_len=T, batch_size=B, test_size=16)
        config = task.default_config().replace(**preset_overrides("seed"))
        if args.tiny:
            config = config.replace(embed_dim=32, num_heads=4, expert_dim=64, num_layers=2)
    for searcher, P in (("ga", P_dense), ("lowrank-es", P_low)):
        record = {"section": "evaluate", "preset": name, "dtype": str(dtype)[6:],
                  "device": args.device, "method": f"{searcher} generation ({task.name})"}

        def gen(searcher=searcher, P=P):
            problem = TransformerProblem(task, config, seed=0, device=args.device,
                                         compute_dtype=dtype)
            s = make_searcher(searcher, problem, popsize=P)
            s.step()  # warm-up (and the GA's first evaluation of its initial population)
            before, n = s.evaluations, max(1, args.rounds - 1)
            t = _median_time(s.step, args.device, n)  # 1 + n steps
            per = (s.evaluations - before) / (1 + n)
            mem = _peak_gib(s.step, args.device)
            return {"P": P, "N": problem.solution_length, "seconds": t,
                    "evals_per_s": per / t, "peak_gib": mem}

        guarded(rows, record, gen)


def bench_bf16(name, args, rows) -> None:
    _, _, B, T = SIZES[args.tiny][name]
    record = {"section": "bf16", "preset": name, "dtype": "bfloat16 vs float32",
              "device": args.device, "method": "low-rank pass, P=64 (seed: 16)"}
    P = (16 if name == "seed" else 64) if not args.tiny else 8
    guarded(rows, record, lambda: {"P": P, **bf16_accuracy(name, P, B, T, args.device)})


def parse_tests(log: Path | None) -> dict:
    """``{"summary": last pytest line, "passed": n, "failed": n, ...}`` from a pytest log."""
    if log is None or not log.is_file():
        return {"summary": "not run"}
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)),
                   lines[-1] if lines else "empty log")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|"
                                               r"deselected|xfailed)", summary)}
    return {"summary": summary.strip("= "), **counts}


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [f"# gpu_check on {report['device']} ({'tiny' if report['tiny'] else 'full'})", "",
             "```", report["machine"], "```", ""]
    for label, t in report["tests"].items():
        lines.append(f"- tests ({label}): {t.get('summary')}")
    lines += ["", "torch.mm peak: " + ", ".join(
        f"{k} {1000 * v:,.0f} GFLOP/s" if v else f"{k} n/a"
        for k, v in report["mm_tflops"].items()) + f"; TF32 matmul {report['tf32_matmul']}", ""]
    lines += ["| section | preset | dtype | method | P | s | GFLOP/s | % mm | vs floor | "
              "x clone | evals/s | peak GiB | note |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        if r.get("method") == "build low-rank population" and "error" not in r:
            continue
        note = r.get("error", "")
        if r["section"] == "bf16" and "error" not in r:
            note = (f"max rel out err {r['max_rel_output_error']:.2e}, max dF "
                    f"{r['max_abs_fitness_diff']:.2e} (spread {r['fitness_spread']:.2e}), "
                    f"spearman {r['spearman_fitness']:.4f}")
        lines.append("| " + " | ".join([
            r["section"], r["preset"], r["dtype"], r.get("method", ""), str(r.get("P", "")),
            _fmt(r.get("seconds"), ".4f"), _fmt(r.get("gflops"), ".0f"),
            _fmt(r.get("pct_mm"), ".0f"), _fmt(r.get("vs_floor"), ".2f"),
            _fmt(r.get("x_clone"), ".1f"), _fmt(r.get("evals_per_s"), ",.0f"),
            _fmt(r.get("peak_gib"), ".2f"), note.replace("|", "/")]) + " |")
    lines += ["", f"total {report['seconds']:.0f} s", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="every size shrunk (CPU smoke test)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tests-log", action="append", default=[], metavar="LABEL=FILE",
                    help="pytest logs to summarise (repeatable)")
    args = ap.parse_args()
    from evotorch_mqa_moe._internal.evotorch_compat import quiet_evotorch_loggers

    quiet_evotorch_loggers()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.rounds = 1
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dtypes, skipped = [], {}
    for d in ("float32", "bfloat16"):
        try:
            dtypes.append(resolve_dtype(d, args.device))
        except ValueError as exc:
            skipped[d] = str(exc)
    rows: list[dict] = []
    peaks = {}
    for dtype in dtypes:
        try:
            peaks[str(dtype)[6:]] = mm_peak(args.device, dtype, size=512 if args.tiny else 4096)
        except Exception:  # noqa: BLE001
            peaks[str(dtype)[6:]] = None
    for d, why in skipped.items():
        rows.append({"section": "all", "preset": "-", "dtype": d, "device": args.device,
                     "error": f"skipped: {why}"})
    for name in ("bench-a", "seed"):
        for dtype in dtypes:
            print(f"{name} {dtype}: forward, operators, evaluate", flush=True)
            peak = peaks[str(dtype)[6:]] or float("nan")
            bench_forward(name, dtype, args, rows, peak)
            bench_operators(name, dtype, args, rows)
            bench_evaluate(name, dtype, args, rows)
        if torch.bfloat16 in dtypes:
            bench_bf16(name, args, rows)
    tests = {}
    for item in args.tests_log:
        label, _, path = item.partition("=")
        tests[label] = parse_tests(Path(path))
    report = {"device": args.device, "tiny": args.tiny, "machine": machine_report(),
              "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
              "mm_tflops": {k: (v / 1e12 if v else None) for k, v in peaks.items()},
              "tests": tests, "rows": rows, "seconds": time.perf_counter() - start}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    errors = [r for r in rows if "error" in r and not r["error"].startswith("skipped")]
    print(markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}; "
          f"{len(errors)} benchmark error(s)")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
