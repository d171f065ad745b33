"""What a run survives (issue 23): crashes and runs that never end, checkpoints that must be
refused (naming the field, one line, exit 2), a checksum that finds a flipped bit,
temporary files of killed writers, a full disk, Ctrl-C while starting.

The command-line cases run ``python -m evotorch_mqa_moe`` in a subprocess, as a user does.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evotorch_mqa_moe.workflow.checkpoint import checksum
from evotorch_mqa_moe.workflow.run import RunSettings, run

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 8, "num_heads": 2, "expert_dim": 8}
TINY_ARGS = [a for k, v in TINY.items() for a in ("--model", f"{k}={v}")]


def _settings(searcher: str = "pgpe", generations: int = 2) -> RunSettings:
    return RunSettings(task="reverse", searcher=searcher, generations=generations, popsize=8,
                       model=dict(TINY), eval_every=1, checkpoint_every=2)


def _cli(*args: str, preexec_fn=None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "evotorch_mqa_moe", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT,
                          preexec_fn=preexec_fn)


def _run_args(out: Path, generations: int = 2, *extra: str) -> list[str]:
    return ["run", "reverse", "--searcher", "pgpe", "--popsize", "8", "--generations",
            str(generations), "--eval-every", "1", "--checkpoint-every", "2", "--quiet",
            "--threads", "1", "--out", str(out), *TINY_ARGS, *extra]


def _one_line(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith("evotorch-mqa-moe: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Path]:
    """Finished 2-generation runs of pgpe and adam (checkpoints at generation 2)."""
    torch.set_num_threads(1)
    runs = {}
    for searcher in ("pgpe", "adam"):
        out = tmp_path_factory.mktemp(searcher) / "run"
        run(_settings(searcher), out)
        runs[searcher] = out
    return runs


# ------------------------------------------------------------------- broken checkpoints
def _node(tree: dict, dotted: str) -> tuple[dict, str]:
    """The dict holding the last key of ``dotted`` (EvoTorch's ``__object__`` wrappers
    are stepped through) and that key."""
    *keys, last = dotted.split(".")
    for key in keys:
        tree = tree[key]
        while isinstance(tree, dict) and "__object__" in tree:
            tree = tree["__object__"]
    return tree, last


def _set(ckpt: dict, dotted: str, make) -> None:
    node, key = _node(ckpt["searcher"], dotted)
    node[key] = make(node[key])


ALGO = "algorithm"
SIGMA = f"{ALGO}._distribution._Distribution__parameters.sigma"
MU = f"{ALGO}._distribution._Distribution__parameters.mu"


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def _flip_bit(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(torch.int32).view(-1)[3] ^= 1 << 4
    return t


# kind: (searcher, edit of the loaded checkpoint, re-checksum?, what the message names)
EDITS = {
    "sigma-nan": ("pgpe", lambda c: _set(c, SIGMA, _nan_like), True, "sigma holds non-finite"),
    "negative-evaluations": ("pgpe", lambda c: _set(c, f"{ALGO}._problem.evaluations",
                                                    lambda v: -500), True,
                             "evaluations is negative"),
    "short-history": ("pgpe", lambda c: c.update(history=c["history"][:1]), True,
                      "taken 2 steps but the history holds 1"),
    "fitness-nan": ("pgpe", lambda c: _set(c, f"{ALGO}._population._evdata", _nan_like), True,
                    "_evdata holds non-finite"),
    "negative-steps": ("pgpe", lambda c: _set(c, f"{ALGO}._steps_count", lambda v: -3), True,
                       "_steps_count is negative"),
    "history-generation": ("pgpe", lambda c: c["history"][0].update(generation=-1), True,
                           "history row 1 is generation -1"),
    "popsize-field": ("pgpe", lambda c: _set(c, f"{ALGO}._popsize", lambda v: 16), True,
                      "_popsize is 16"),
    "elapsed-nan": ("pgpe", lambda c: c.update(elapsed=float("nan")), True, "'elapsed'"),
    "string-number": ("pgpe", lambda c: _set(c, f"{ALGO}._center_learning_rate",
                                             lambda v: "0.2"), True,
                      "_center_learning_rate is a string"),
    "injected-method": ("pgpe", lambda c: c["searcher"]["algorithm"].update(step="print"),
                        True, "field .step that would replace"),
    "lr-nan": ("adam", lambda c: c["searcher"]["optimizer"]["param_groups"][0].update(
        lr=float("nan")), True, "lr is nan"),
    "flipped-bit": ("pgpe", lambda c: _set(c, MU, _flip_bit), False, "fails its checksum"),
}
FILES = {"text-symlink": "not a torch.save zip archive",
         "pickle-protocol-5": "not a torch.save zip archive"}


def _break(kind: str, folder: Path) -> None:
    path = folder / "checkpoint.pt"
    if kind == "text-symlink":
        (folder / "notes.txt").write_text("generation,evaluations\n1,8\n")
        path.unlink()
        path.symlink_to(folder / "notes.txt")
        return
    if kind == "pickle-protocol-5":
        path.write_bytes(pickle.dumps({"version": 2}, protocol=5))
        return
    ckpt = torch.load(path, weights_only=True)
    _, edit, recompute, _ = EDITS[kind]
    edit(ckpt)
    if recompute:  # a consistent file (its checksum fits): the value checks must find it
        ckpt["checksum"] = checksum(ckpt)
    torch.save(ckpt, path)


def _copy(finished: dict[str, Path], searcher: str, dst: Path) -> Path:
    shutil.copytree(finished[searcher], dst)
    return dst


@pytest.mark.parametrize("kind", [*EDITS, *FILES])
def test_bad_checkpoint_is_refused_naming_the_field(finished, tmp_path, kind):
    searcher = EDITS[kind][0] if kind in EDITS else "pgpe"
    out = _copy(finished, searcher, tmp_path / "run")
    _break(kind, out)
    with pytest.raises(ValueError) as info:
        run(_settings(searcher, 4), out, resume=True)
    msg = str(info.value)
    assert (EDITS[kind][3] if kind in EDITS else FILES[kind]) in msg, msg
    assert str(out / "checkpoint.pt") in msg and "\n" not in msg


def test_every_searcher_resumes_its_own_checkpoint(tmp_path):
    """The value checks refuse nothing that a searcher itself writes."""
    from evotorch_mqa_moe.searchers import SEARCHERS

    for name, spec in SEARCHERS.items():
        settings = RunSettings(task="reverse", searcher=name, generations=2,
                               popsize=max(8, spec.min_popsize), model=dict(TINY),
                               eval_every=2, checkpoint_every=1)
        run(settings, tmp_path / name)
        resumed = run(RunSettings(**{**settings.__dict__, "generations": 3}), tmp_path / name,
                      resume=True)
        assert resumed["generations"] == 3, name


@pytest.mark.parametrize("kind", ["flipped-bit", "sigma-nan", "elapsed-nan",
                                  "pickle-protocol-5"])
def test_bad_checkpoint_cli_one_line_exit_2(finished, tmp_path, kind):
    out = _copy(finished, "pgpe", tmp_path / "run")
    _break(kind, out)
    line = _one_line(_cli(*_run_args(out, 4, "--resume")))
    assert str(out / "checkpoint.pt") in line
    assert "Warning" not in line  # torch's pickle-protocol warning is not printed


def test_a_checkpoint_records_a_checksum_of_its_contents(finished):
    ckpt = torch.load(finished["pgpe"] / "checkpoint.pt", weights_only=True)
    assert ckpt["checksum"] == checksum(ckpt)
    changed = copy.deepcopy(ckpt)
    _set(changed, MU, _flip_bit)
    assert checksum(changed) != ckpt["checksum"]


# ------------------------------------------------------------- temporary files, disk full
def test_temporaries_of_killed_writers_are_removed_on_the_next_start(finished, tmp_path):
    out = _copy(finished, "pgpe", tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = [out / f"checkpoint.pt.{dead.pid}.tmp", out / f"history.csv.{dead.pid}.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    live = out / f"checkpoint.pt.{os.getppid()}.tmp"  # a running process: not ours to remove
    live.write_bytes(b"being written")
    run(_settings("pgpe", 3), out, resume=True)
    assert not any(p.exists() for p in stale)
    assert live.exists()


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(finished, tmp_path):
    out = _copy(finished, "pgpe", tmp_path / "run")
    before = (out / "checkpoint.pt").read_bytes()
    limit = len(before) // 2  # every checkpoint write fails, the small files still fit
    proc = _cli(*_run_args(out, 4, "--resume"), preexec_fn=_file_size_limit(limit))
    line = _one_line(proc, status=1)
    assert "could not write" in line and "checkpoint.pt" in line
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob("*.tmp"))


# --------------------------------------------------------------- start-up, runaway limits
INTERRUPT_AT_IMPORT = """
import importlib.abc, os, signal, sys
class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
from evotorch_mqa_moe.workflow.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module", ["torch", "evotorch", "evotorch_mqa_moe.problems"])
def test_ctrl_c_while_starting_is_one_line_exit_130(tmp_path, module):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, module,
                           *_run_args(tmp_path / "run")], capture_output=True, text=True,
                          env=env, timeout=180, cwd=ROOT)
    line = _one_line(proc, status=130)
    assert "interrupted" in line


def test_threads_beyond_the_cores_are_refused(tmp_path):
    line = _one_line(_cli(*_run_args(tmp_path / "run", 2), "--threads", "100000"))
    assert "--threads" in line and "100000" in line
    assert not (tmp_path / "run").exists()


def test_a_nan_elapsed_checkpoint_does_not_run_forever(finished, tmp_path):
    """``elapsed = NaN`` never reaches ``--max-seconds``: it is refused instead."""
    out = _copy(finished, "pgpe", tmp_path / "run")
    _break("elapsed-nan", out)
    settings = RunSettings(**{**_settings().__dict__, "generations": None, "max_seconds": 3.0})
    with pytest.raises(ValueError, match="'elapsed' must be a finite number"):
        run(settings, out, resume=True)
    assert math.isnan(torch.load(out / "checkpoint.pt", weights_only=True)["elapsed"])


# ----------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("extra, names", [
    (["--stdev", "1e300"], ["stdev", "1e+300"]),
    (["--searcher-option", "center_learning_rate=NaN"], ["center_learning_rate", "finite"]),
    (["--searcher-option", "center_learning_rate=abc"], ["center_learning_rate", "'abc'"]),
    (["--seed", str(2**70)], ["seed", str(2**70)]),
    (["--resume", "--overwrite"], ["resume and overwrite"]),
])
def test_bad_run_values_are_one_line_exit_2(finished, tmp_path, extra, names):
    if "--resume" in extra:  # a folder holding a run: neither resumed nor rewritten
        out = _copy(finished, "pgpe", tmp_path / "run")
        before = (out / "checkpoint.pt").read_bytes()
    else:
        out, before = tmp_path / "fresh", None
    line = _one_line(_cli(*_run_args(out, 4), *extra))
    assert all(n in line for n in names), line
    if before is not None:
        assert (out / "checkpoint.pt").read_bytes() == before
    else:
        assert not (out / "checkpoint.pt").exists()


def test_the_largest_seed_runs(tmp_path):
    settings = RunSettings(**{**_settings("ga", 1).__dict__, "seed": 2**63 - 1})
    assert run(settings, tmp_path / "run")["generations"] == 1


def _problem(**kw):
    from evotorch_mqa_moe.model import TransformerConfig  # noqa: F401 - the task's own config
    from evotorch_mqa_moe.problem import TransformerProblem
    from evotorch_mqa_moe.problems import make_task

    task = make_task("reverse")
    return TransformerProblem(task, task.default_config().replace(**TINY), seed=0, **kw)


@pytest.mark.parametrize("kw, name", [({"device": "bogus"}, "device 'bogus'"),
                                      ({"chunk_size": 0}, "chunk_size"),
                                      ({"chunk_size": -3}, "chunk_size"),
                                      ({"memory_budget": 0}, "memory_budget")])
def test_problem_refuses_bad_arguments_when_built(kw, name):
    with pytest.raises(ValueError, match=name):
        _problem(**kw)


def test_make_net_refuses_a_wrong_length():
    problem = _problem()
    with pytest.raises(ValueError, match=f"length {problem.solution_length}, got shape"):
        problem.make_net(torch.zeros(problem.solution_length + 1))
    assert problem.make_net(torch.zeros(problem.solution_length)) is not None


def test_metrics_of_a_nan_solution_are_nan():
    problem = _problem()
    good = torch.zeros(problem.solution_length)
    bad = good.clone()
    bad[5] = float("nan")
    single = problem.metrics(bad)
    assert single and all(math.isnan(v) for v in single.values())
    both = problem.metrics(torch.stack([good, bad]))
    assert all(not math.isnan(v[0]) and math.isnan(v[1]) for v in both.values())


def test_mutation_and_selection_refuse_bad_numbers():
    from evotorch_mqa_moe.evolution.functional import gaussian_mutation, truncation_pairs

    values = torch.zeros(4, 6)
    for stdev in (float("inf"), float("nan"), torch.tensor([1.0, float("inf")] * 3)):
        with pytest.raises(ValueError, match="stdev"):
            gaussian_mutation(values, stdev=stdev)
    assert torch.isfinite(gaussian_mutation(values, stdev=1e3)).all()
    with pytest.raises(ValueError, match="num_pairs must be a non-negative integer, got -1"):
        truncation_pairs(torch.arange(4.0), -1, maximize=True)


def test_a_ga_whose_population_is_all_nan_refuses_to_step():
    from evotorch_mqa_moe.searchers import make_searcher

    problem = _problem()
    searcher = make_searcher("ga", problem, popsize=8)
    searcher.step()
    population = searcher.algorithm.population
    population.access_values()[:] = float("nan")
    with pytest.raises(ValueError, match="every one of the 8 individuals"):
        searcher.step()
