"""`run` options of issue 12, through the real CLI in a subprocess where it matters:
the progress bar (a terminal only, not with --quiet), the unit of the progress log
lines, and Ray actors (--actors, --gpus-per-actor, --ray-address)."""

import json
import os
import pty
import subprocess
import sys
import threading

import pandas as pd
import pytest

from evotorch_mqa_moe.workflow.cli import main
from evotorch_mqa_moe.workflow.settings import RunSettings

TINY_ARGS = ["--model", "embed_dim=8", "--model", "num_heads=2", "--model", "expert_dim=8"]


def _run_cli(args, *, tty: bool):
    """(exit status, stderr text) of the CLI; stderr is a pseudo-terminal when ``tty``."""
    argv = [sys.executable, "-m", "evotorch_mqa_moe", *args]
    env = {**os.environ, "COLUMNS": "120"}
    if not tty:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        return done.returncode, done.stderr
    master, slave = pty.openpty()
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    status = proc.wait(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    return status, b"".join(chunks).decode(errors="replace")


def _args(out, *extra):
    return ["run", "reverse", "--searcher", "pgpe", "--popsize", "4", *TINY_ARGS,
            "--generations", "12", "--out", str(out), *extra]


def test_progress_bar_on_a_terminal_with_the_log_lines_above_it(tmp_path):
    status, err = _run_cli(_args(tmp_path / "r"), tty=True)
    assert status == 0, err[-2000:]
    assert "reverse/pgpe: 100%|" in err  # the bar reached the budget
    assert "<00:00" in err or "<0" in err  # the ETA column ([elapsed<remaining])
    assert "gen 12, 48 fwd-eq" in err  # its postfix
    assert "gen 10 | 40 forward-equivalents" in err  # the log lines stay


def test_no_progress_bar_when_quiet_or_not_a_terminal(tmp_path):
    status, err = _run_cli(_args(tmp_path / "q", "--quiet"), tty=True)
    assert status == 0 and "%|" not in err and "gen 10" not in err
    status, err = _run_cli(_args(tmp_path / "p"), tty=False)
    assert status == 0 and "%|" not in err
    # log lines carry the progress there, in the budget's unit
    assert "gen 10 | 40 forward-equivalents | best" in err and "fwd-eq/s" in err
    assert "evals/s" not in err


# ----------------------------------------------------------------------------- Ray actors


@pytest.mark.parametrize("argv,message", [
    (["--gpus-per-actor", "1"], "num_gpus_per_actor need Ray actors: give num_actors >= 2"),
    (["--ray-address", "auto"], "ray_address need Ray actors"),
    (["--actors", "1"], "num_actors must be 0 .* or >= 2 .*got 1"),
    (["--actors", "-2"], "num_actors must be a non-negative integer, got -2"),
    (["--actors", "2", "--gpus-per-actor", "-1"], "num_gpus_per_actor must be a non-negative"),
])
def test_actor_options_are_checked_before_anything_runs(tmp_path, capsys, argv, message):
    import re

    assert main(_args(tmp_path / "r", *argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_actors_need_a_cpu_main_process_and_are_not_part_of_the_identity():
    with pytest.raises(ValueError, match="main process must use device 'cpu', got 'cuda'"):
        RunSettings("reverse", generations=1, device="cuda", num_actors=2)
    with_actors = RunSettings("reverse", generations=1, num_actors=4, ray_address="auto")
    assert with_actors.identity() == RunSettings("reverse", generations=1).identity()


@pytest.mark.slow
def test_cli_actors_give_the_same_run_as_without(tmp_path):
    # one Ray start (slow); GA (evaluates through the problem) and the same seed
    runs = {}
    for label, extra in (("local", []), ("actors", ["--actors", "2"])):
        out = tmp_path / label
        args = ["run", "reverse", "--searcher", "ga", "--popsize", "8", *TINY_ARGS,
                "--generations", "3", "--eval-every", "3", "--seed", "5", "--quiet",
                "--threads", "1", "--out", str(out), *extra]
        done = subprocess.run([sys.executable, "-m", "evotorch_mqa_moe", *args],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[label] = (pd.read_csv(out / "history.csv"),
                       json.loads((out / "results.json").read_text()))
    (local, local_results), (remote, remote_results) = runs["local"], runs["actors"]
    assert remote_results["ray_actors_used"] and not local_results["ray_actors_used"]
    assert remote_results["settings"]["num_actors"] == 2
    columns = ["evaluations", "best_fitness", "mean_fitness", "best_so_far", "exact_accuracy"]
    pd.testing.assert_frame_equal(local[columns], remote[columns], atol=1e-6, rtol=0)


def test_log_lines_bounds_the_progress_lines_of_cheap_generations(tmp_path):
    # adam's generation is one network (3 forward-equivalents): one log line per
    # eval_every steps floods a compare; log_lines=5 gives about 5 over the budget
    from loguru import logger

    from evotorch_mqa_moe.workflow.run import run

    settings = RunSettings(task="reverse", searcher="adam", max_evaluations=300,
                           eval_every=1, model={"embed_dim": 8, "num_heads": 2,
                                                "expert_dim": 8})
    counts = {}
    for log_lines in (None, 5):
        lines = []
        sink = logger.add(lines.append, level="INFO", format="{message}")
        try:
            results = run(settings, tmp_path / str(log_lines), log_lines=log_lines)
        finally:
            logger.remove(sink)
        counts[log_lines] = sum(str(line).startswith("gen ") for line in lines)
        assert results["total_time"] >= results["wall_time"] > 0
    assert counts[None] == 100  # one per step
    assert counts[5] in (5, 6)  # at 0, 1/5, ..., 4/5 of the budget, and the last step
