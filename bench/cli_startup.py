"""Start-up time of the command line: ``--help`` / ``list`` against ``import torch``.

Run:  .venv/bin/python bench/cli_startup.py [--rounds 5]

Each command runs in a fresh interpreter (``python -m evotorch_mqa_moe ...``), the
rounds interleaved so a busy machine slows all alike; the table gives the median and
the range of wall seconds. ``python -c pass`` is the interpreter's own start-up;
``python -c "import torch"`` is what any command that loaded torch would pay at least
(the CLI loaded torch and EvoTorch for every command before issue 12). A real ``run``
is shown too: it still loads both, once. ``sample`` (100 characters from a tiny
``language`` prose model, trained first for 1 step) loads torch but not EvoTorch; the
row above it, a script that only loads that ``best_model.pt``, is its floor.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_report

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "evotorch-mqa-moe --help": [sys.executable, "-m", "evotorch_mqa_moe", "--help"],
    "evotorch-mqa-moe run --help": [sys.executable, "-m", "evotorch_mqa_moe", "run", "--help"],
    "evotorch-mqa-moe list": [sys.executable, "-m", "evotorch_mqa_moe", "list"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    'python -c "import evotorch"': [sys.executable, "-c", "import evotorch"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        commands = dict(COMMANDS)
        commands["evotorch-mqa-moe run reverse (1 generation, tiny model)"] = [
            sys.executable, "-m", "evotorch_mqa_moe", "run", "reverse", "--generations", "1",
            "--popsize", "4", "--model", "embed_dim=8", "--model", "num_heads=2",
            "--model", "expert_dim=8", "--quiet", "--threads", "1", "--overwrite",
            "--out", str(Path(tmp) / "run")]
        sample_run = Path(tmp) / "prose"
        subprocess.run([sys.executable, "-m", "evotorch_mqa_moe", "run", "language",
                        "--task-option", "source=prose", "--searcher", "adam",
                        "--generations", "1", "--quiet", "--threads", "1",
                        "--out", str(sample_run)], check=True, capture_output=True)
        commands['python -c "load_model(best_model.pt)"'] = [
            sys.executable, "-c", "from evotorch_mqa_moe.workflow.model_file import load_model;"
            f"load_model({str(sample_run / 'best_model.pt')!r})"]
        commands["evotorch-mqa-moe sample RUN --tokens 100"] = [
            sys.executable, "-m", "evotorch_mqa_moe", "sample", str(sample_run),
            "--tokens", "100"]
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, argv in commands.items():
                start = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
    print(machine_report())
    print(f"\n| command | median s | min-max s ({args.rounds} runs) |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| `{name}` | {statistics.median(ts):.2f} | {min(ts):.2f}-{max(ts):.2f} |")


if __name__ == "__main__":
    main()
