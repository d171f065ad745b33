"""Shared by the bench scripts: ``machine_report() -> str`` (machine and library
versions for every report) and ``timed(fn, device)`` (wall seconds of one call,
synchronising an accelerator before and after).

Used by every script in bench/ (they run as ``python bench/<name>.py``, so this
module is importable as ``_machine``).
"""

from __future__ import annotations

import os
import platform
import time


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def sync(device) -> None:
    """Wait for queued accelerator work (a no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Wall seconds of ``fn()``, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def machine_report() -> str:
    """One paragraph: OS, Python, CPU model and cores, torch threads, library versions, GPU."""
    import evotorch
    import numpy
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    lines = [
        f"platform: {platform.platform()}, Python {platform.python_version()}",
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores ({usable} usable), "
        f"torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, evotorch {evotorch.__version__}, numpy {numpy.__version__}",
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"CUDA {torch.version.cuda}: {', '.join(names)}")
    else:
        lines.append("CUDA: not available")
    return "\n".join(lines)


if __name__ == "__main__":
    print(machine_report())
