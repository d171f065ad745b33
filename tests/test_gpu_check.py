"""bench/gpu_check.sh --cpu: the one-shot GPU check, shrunk to the CPU, end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_writes_a_complete_report(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--cpu"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["tiny"]
    assert all("error" not in row for row in report["rows"]), report["rows"]
    seen = {(r["section"], r["preset"], r["dtype"]) for r in report["rows"]}
    for preset in ("bench-a", "seed"):
        for dtype in ("float32", "bfloat16"):
            for section in ("forward", "operators", "evaluate"):
                assert (section, preset, dtype) in seen, (section, preset, dtype)
        assert ("bf16", preset, "bfloat16 vs float32") in seen
    methods = {r["method"] for r in report["rows"] if r["section"] == "forward"}
    assert {"dense population", "lowrank (auto)", "lowrank (factors)",
            "floor: 1 network, P*B*T rows"} <= methods
    assert report["tests"]["device-aware"].get("passed", 0) > 0
    assert report["tests"]["device-aware"].get("failed", 0) == 0
    assert report["tests"]["rest"].get("passed", 0) > 0
    table = (out / "gpu_check.md").read_text()
    assert "| forward | seed | bfloat16 | lowrank (auto) |" in table
