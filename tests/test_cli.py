"""The command line: `run` for every searcher, exact resume after a real interruption,
one-line errors for bad arguments (in-process via ``main`` and as a real process)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evotorch_mqa_moe.searchers import SEARCHERS
from evotorch_mqa_moe.workflow.checkpoint import checksum, load_model
from evotorch_mqa_moe.workflow.cli import main

TINY = ["--model", "embed_dim=8", "--model", "num_heads=2", "--model", "expert_dim=8"]
ROOT = Path(__file__).resolve().parents[1]


def _run_args(out: Path, searcher: str = "pgpe", generations: int = 2, *extra: str) -> list[str]:
    return ["run", "reverse", "--searcher", searcher, "--popsize", "8", "--generations",
            str(generations), "--eval-every", "1", "--checkpoint-every", "2", "--quiet",
            "--out", str(out), *TINY, *extra]


def _tensors(tree, prefix=""):
    """Flatten a checkpoint's nested dicts/lists into {path: tensor or number}."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def _assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same final state (history up to wall time, searcher, model)."""
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    strip = [{k: v for k, v in row.items() if k != "wall_time"} for row in ca["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "wall_time"}
                     for row in cb["history"]]
    la, lb = dict(_tensors(ca["searcher"])), dict(_tensors(cb["searcher"]))
    assert la.keys() == lb.keys()
    centre_or_population = 0
    for key, va in la.items():
        vb = lb[key]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), key
            centre_or_population += any(s in key for s in (".mu", "_population", ".model."))
        elif isinstance(va, float) and math.isnan(va):
            assert isinstance(vb, float) and math.isnan(vb), key
        else:
            assert va == vb, key
    assert centre_or_population > 0  # the comparison did see the search distribution
    ma, mb = load_model(a / "best_model.pt"), load_model(b / "best_model.pt")
    for (ka, ta), (kb, tb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb), ka
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["final_metrics"] == rb["final_metrics"]
    assert ra["best_fitness"] == rb["best_fitness"]


# ----------------------------------------------------------------------------- run
@pytest.mark.parametrize("searcher", list(SEARCHERS))
def test_run_every_searcher_writes_all_files(tmp_path, searcher, capsys):
    out = tmp_path / searcher
    assert main(_run_args(out, searcher)) == 0
    assert f"reverse / {searcher}: exact_accuracy" in capsys.readouterr().out
    for name in ("checkpoint.pt", "history.csv", "results.json", "best_model.pt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["searcher"] == searcher and results["generations"] == 2
    assert results["stopped_by"] == "generations"
    assert set(results["final_metrics"]) >= {"exact_accuracy", "token_accuracy", "loss"}
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(ckpt["history"]) == 2
    blob = torch.load(out / "best_model.pt", weights_only=True)
    assert blob["task"] == "reverse"
    model = load_model(out / "best_model.pt")
    assert sum(p.numel() for p in model.parameters()) == results["parameters"]
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["generation", "evaluations", "wall_time", "best_fitness",
                          "mean_fitness", "best_so_far"]
    assert "exact_accuracy" in header


def _history(out: Path):
    import pandas as pd

    return pd.read_csv(out / "history.csv")


def test_best_so_far_is_the_running_maximum(tmp_path):
    """history.csv's best_so_far is the running maximum of best_fitness, adam included."""
    out = tmp_path / "adam"
    assert main(_run_args(out, "adam", 12)) == 0
    h = _history(out)
    assert (h["best_so_far"] == h["best_fitness"].cummax()).all()
    assert (h["best_so_far"].diff().dropna() >= 0).all()


# ------------------------------------------------------------------------ budgets
def _budget_args(out: Path, searcher: str, *budget: str) -> list[str]:
    return ["run", "reverse", "--searcher", searcher, "--popsize", "8", "--eval-every", "5",
            "--checkpoint-every", "5", "--out", str(out), *TINY, *budget]


@pytest.mark.parametrize(("searcher", "evals", "generations"),
                         [("pgpe", 200, 25), ("adam", 30, 10)])
def test_max_evals_alone_is_the_limit(tmp_path, searcher, evals, generations, capsys):
    """--max-evals without --generations runs to the evaluation budget (no hidden 100)."""
    out = tmp_path / searcher
    assert main(_budget_args(out, searcher, "--max-evals", str(evals), "--quiet")) == 0
    results = json.loads((out / "results.json").read_text())
    # pgpe: 8 forward-equivalents per generation; adam: 3 per step
    assert results["evaluations"] == evals and results["generations"] == generations
    assert results["stopped_by"] == "max_evaluations"
    assert f"{evals:,} forward-equivalents" in capsys.readouterr().out


def test_several_limits_the_log_says_which_ended_the_run(tmp_path, capsys):
    out = tmp_path / "gens"
    assert main(_budget_args(out, "pgpe", "--generations", "3", "--max-evals", "800")) == 0
    assert "stopped by generations: 3 generations >= 3" in capsys.readouterr().err
    out = tmp_path / "evals"
    assert main(_budget_args(out, "pgpe", "--generations", "300", "--max-evals", "24",
                             "--max-seconds", "3600")) == 0
    assert "stopped by max_evaluations: 24 forward-equivalents >= 24" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["generations"] == 3


def test_max_seconds_stops(tmp_path, capsys):
    """A tiny time budget ends the run after its first generation, whatever else is given."""
    out = tmp_path / "t"
    assert main(_budget_args(out, "pgpe", "--max-seconds", "1e-9", "--generations",
                             "100000", "--max-evals", "10000000")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["generations"] == 1 and results["stopped_by"] == "max_seconds"
    assert "stopped by max_seconds" in capsys.readouterr().err


class _Settings(Exception):
    pass


@pytest.mark.parametrize(("budget", "expected"), [
    ([], {"generations": 100, "max_evaluations": None, "max_seconds": None}),
    (["--max-evals", "60000"], {"generations": None, "max_evaluations": 60000}),
    (["--max-seconds", "30"], {"generations": None, "max_seconds": 30.0}),
    (["--generations", "7", "--max-seconds", "30"], {"generations": 7, "max_seconds": 30.0}),
])
def test_generations_default_only_without_another_limit(tmp_path, monkeypatch, budget, expected):
    """The settings `run` receives: 100 generations only when no limit at all is given."""
    import evotorch_mqa_moe.workflow.run as run_module

    def fake_run(settings, out, resume=False, overwrite=False, **kwargs):
        raise _Settings(settings)

    monkeypatch.setattr(run_module, "run", fake_run)
    with pytest.raises(_Settings) as caught:
        main(_budget_args(tmp_path / "x", "pgpe", *budget))
    settings = caught.value.args[0]
    assert {k: getattr(settings, k) for k in expected} == expected


def test_searcher_option_and_lr_reach_the_searcher(tmp_path):
    out = tmp_path / "o"
    assert main(_budget_args(out, "adam", "--generations", "1", "--lr", "0.01", "--quiet")) == 0
    assert json.loads((out / "results.json").read_text())["settings"]["searcher_options"] == {
        "lr": 0.01}
    out = tmp_path / "p"
    assert main(_budget_args(out, "pgpe", "--generations", "1", "--searcher-option",
                             "center_learning_rate=0.1", "--quiet")) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["settings"]["searcher_options"] == {"center_learning_rate": 0.1}


@pytest.mark.parametrize("searcher", ["pgpe", "ga", "adam"])
def test_resume_after_keyboard_interrupt_equals_uninterrupted(tmp_path, searcher, monkeypatch):
    """KeyboardInterrupt raised inside a step (as a second Ctrl-C would): exit 130, the
    last periodic checkpoint (generation 2) is kept, then --resume."""
    import evotorch_mqa_moe.workflow.run as run_module

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_run_args(full, searcher, 6)) == 0

    real_build, calls = run_module._build, {"n": 0}

    def build(settings):
        task, config, problem, searcher_obj = real_build(settings)
        real_step = searcher_obj.step

        def step():
            calls["n"] += 1
            if calls["n"] == 4:  # inside generation 4; the last checkpoint is generation 2
                raise KeyboardInterrupt
            real_step()

        searcher_obj.step = step
        return task, config, problem, searcher_obj

    monkeypatch.setattr(run_module, "_build", build)
    assert main(_run_args(cut, searcher, 6)) == 130
    assert not (cut / "results.json").exists()
    assert len(torch.load(cut / "checkpoint.pt", weights_only=True)["history"]) == 2
    monkeypatch.setattr(run_module, "_build", real_build)
    assert main(_run_args(cut, searcher, 6, "--resume")) == 0
    _assert_same_run(full, cut)


# the signal lands during a generation (step or held-out metrics): the run stops
# at the end of that generation
MID_GENERATION = pytest.param(signal.SIGINT, 0.3, id="SIGINT-mid-generation")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "delay"), [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.0),
                                            MID_GENERATION])
def test_real_signal_then_resume_equals_uninterrupted(tmp_path, sig, delay):
    """A real process gets SIGINT/SIGTERM once its first checkpoint exists (+ ``delay``
    seconds); --resume then ends exactly where an uninterrupted run of as many
    generations ends."""
    cut, full = tmp_path / "cut", tmp_path / "full"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "evotorch_mqa_moe",
                             *_run_args(cut, "pgpe", 100_000)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (cut / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    stopped = len(torch.load(cut / "checkpoint.pt", weights_only=True)["history"])
    assert stopped >= 2
    total = stopped + 3
    assert main(_run_args(cut, "pgpe", total, "--resume")) == 0
    assert main(_run_args(full, "pgpe", total)) == 0
    _assert_same_run(full, cut)


# ----------------------------------------------------------------------- bad arguments
def _error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1, err
    assert err[0].startswith("evotorch-mqa-moe: error: ")
    assert "Traceback" not in err[0]
    return err[0]


def test_unknown_task(tmp_path, capsys):
    msg = _error(["run", "nosuchtask", "--out", str(tmp_path)], capsys)
    assert "nosuchtask" in msg and "reverse" in msg


def test_unknown_searcher_run_and_compare(tmp_path, capsys):
    msg = _error(_run_args(tmp_path, "nosuch"), capsys)
    assert "nosuch" in msg and "pgpe" in msg
    msg = _error(["compare", "reverse", "--searchers", "pgpe,nosuch", "--max-evals", "8",
                  "--out", str(tmp_path)], capsys)
    assert "'nosuch'" in msg


@pytest.mark.parametrize("searcher", ["pgpe", "cmaes", "ga"])
def test_popsize_too_small(tmp_path, capsys, searcher):
    msg = _error(["run", "reverse", "--searcher", searcher, "--popsize", "2", "--out",
                  str(tmp_path)], capsys)
    assert "--popsize 2" in msg and searcher in msg
    msg = _error(["compare", "reverse", "--searchers", f"adam,{searcher}", "--popsize", "2",
                  "--max-evals", "8", "--out", str(tmp_path)], capsys)
    assert searcher in msg


def test_missing_checkpoint(tmp_path, capsys):
    msg = _error(_run_args(tmp_path / "empty", "pgpe", 2, "--resume"), capsys)
    assert "checkpoint" in msg and "empty" in msg


def test_checkpoint_from_other_task_or_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(out)) == 0
    capsys.readouterr()
    msg = _error(["run", "sort", "--searcher", "pgpe", "--popsize", "8", "--generations", "3",
                  "--out", str(out), *TINY, "--resume"], capsys)
    assert "other settings" in msg and "task" in msg
    msg = _error(_run_args(out, "snes", 3, "--resume"), capsys)  # another searcher
    assert "other settings" in msg
    changed = [a.replace("embed_dim=8", "embed_dim=16") for a in _run_args(out, "pgpe", 3)]
    msg = _error([*changed, "--resume"], capsys)  # another model config
    assert "other settings" in msg


@pytest.mark.parametrize(("raw", "value"), [
    ("False", False), ("false", False), ("True", True), ("None", None), ("null", None),
    ("elites", "elites"), ("0.5", 0.5), ("3", 3), ("'elites'", "'elites'")])
def test_option_values_are_json_or_python_constants(raw, value):
    from evotorch_mqa_moe.workflow.cli import _key_values

    parsed = _key_values([f"re_evaluate={raw}"], "--searcher-option")["re_evaluate"]
    assert parsed == value and type(parsed) is type(value)


def test_bad_key_value_and_task_option(tmp_path, capsys):
    msg = _error(["run", "reverse", "--task-option", "seq_len", "--out", str(tmp_path)], capsys)
    assert "NAME=VALUE" in msg
    msg = _error(["run", "reverse", "--task-option", "nosuch=1", "--out", str(tmp_path)], capsys)
    assert "nosuch" in msg


def test_compare_bad_seeds_and_adam_on_cartpole(tmp_path, capsys):
    msg = _error(["compare", "reverse", "--searchers", "pgpe", "--seeds", "0",
                  "--max-evals", "8", "--out", str(tmp_path)], capsys)
    assert "--seeds" in msg
    msg = _error(["compare", "cartpole", "--searchers", "pgpe,adam", "--max-evals", "8",
                  "--out", str(tmp_path)], capsys)
    assert "adam" in msg and "cartpole" in msg
    msg = _error(["run", "cartpole", "--searcher", "adam", "--generations", "1",
                  "--out", str(tmp_path)], capsys)
    assert "adam needs a supervised task" in msg and "cartpole" in msg


@pytest.mark.parametrize(("argv", "match"), [
    (["run", "reverse", "--max-evals", "0"], "--max-evals"),
    (["run", "reverse", "--max-seconds", "-1"], "--max-seconds"),
    (["run", "reverse", "--max-seconds", "inf"], "--max-seconds"),
    (["compare", "reverse", "--searchers", "pgpe"], "budget"),
    (["compare", "reverse", "--searchers", "pgpe", "--max-seconds", "nan"], "--max-seconds"),
])
def test_bad_budgets(tmp_path, capsys, argv, match):
    assert match in _error([*argv, "--out", str(tmp_path / "x")], capsys)


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "reverse" in out and "cartpole" in out
    for name, spec in SEARCHERS.items():
        assert name in out and spec.description in out


def test_subprocess_bad_argument_one_line():
    """A real process: non-zero exit, one stderr line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "evotorch_mqa_moe", "run", "nosuchtask",
                           "--out", "unused-out"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown task 'nosuchtask'" in lines[0], proc.stderr
    assert not (ROOT / "unused-out").exists()


# ------------------------------------------------- broken checkpoints, resume, run folders
def _tensor_paths(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensor_paths(v, f"{path}/{k}")
    elif isinstance(tree, torch.Tensor):
        yield path, tree


def _replace_tensor(ckpt: dict, suffix: str, make) -> None:
    where, tensor = next((p, t) for p, t in _tensor_paths(ckpt["searcher"]) if p.endswith(suffix))
    node = ckpt["searcher"]
    keys = where.strip("/").split("/")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = make(tensor)


def _break(kind: str, path: Path) -> None:
    good = torch.load(path, weights_only=True)
    if kind == "random-bytes":
        path.write_bytes(bytes(range(256)) * 16)
    elif kind == "plain-pickle":
        import pickle

        path.write_bytes(pickle.dumps({"a": {1, 2}}))
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2], path)
    elif kind == "missing-keys":
        torch.save({k: v for k, v in good.items() if k != "searcher"}, path)
    elif kind == "population-shape":
        _replace_tensor(good, "_population/__object__/_data",
                        lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]))
        good["checksum"] = checksum(good)
        torch.save(good, path)
    elif kind == "centre-nan":
        _replace_tensor(good, "parameters/mu", lambda t: torch.full_like(t, float("nan")))
        good["checksum"] = checksum(good)
        torch.save(good, path)
    else:
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def pgpe_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(_run_args(out)) == 0
    return out


@pytest.mark.parametrize("kind", ["random-bytes", "plain-pickle", "truncated", "empty", "list",
                                  "missing-keys", "population-shape", "centre-nan"])
def test_broken_checkpoint_one_line_exit_2(pgpe_run, tmp_path, capsys, kind):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pgpe_run, out)
    _break(kind, out / "checkpoint.pt")
    capsys.readouterr()
    msg = _error(_run_args(out, "pgpe", 3, "--resume"), capsys)
    assert "checkpoint" in msg, msg


def test_broken_checkpoint_subprocess_no_traceback(pgpe_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pgpe_run, out)
    _break("random-bytes", out / "checkpoint.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "evotorch_mqa_moe",
                           *_run_args(out, "pgpe", 3, "--resume"), "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a torch.save zip archive" in lines[0], proc.stderr
    assert str(out / "checkpoint.pt") in lines[0]


def test_resume_with_fewer_generations_than_the_checkpoint(pgpe_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pgpe_run, out)
    capsys.readouterr()
    msg = _error(_run_args(out, "pgpe", 1, "--resume"), capsys)
    assert "generation 2" in msg and "--generations 1" in msg


def test_model_mismatch_names_the_field(pgpe_run, capsys):
    capsys.readouterr()
    changed = [a.replace("embed_dim=8", "embed_dim=16") for a in _run_args(pgpe_run, "pgpe", 3)]
    msg = _error([*changed, "--resume"], capsys)
    assert "model.embed_dim: checkpoint 8, this run 16" in msg
    assert "{'model': {}}" not in msg


def test_run_into_a_run_folder_needs_overwrite(pgpe_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pgpe_run, out)
    before = (out / "history.csv").read_text()
    capsys.readouterr()
    msg = _error(_run_args(out, "pgpe", 1), capsys)
    assert "--overwrite" in msg and "--resume" in msg
    assert (out / "history.csv").read_text() == before
    assert main(_run_args(out, "pgpe", 1, "--overwrite")) == 0
    assert len(torch.load(out / "checkpoint.pt", weights_only=True)["history"]) == 1


def test_compare_still_resumes_its_runs(tmp_path):
    argv = ["compare", "reverse", "--searchers", "pgpe", "--seeds", "1", "--popsize", "8",
            "--max-evals", "16", "--eval-every", "1", "--out", str(tmp_path / "c"), *TINY,
            "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 0  # the finished run is resumed (re-read), not refused
    assert main([a if a != "16" else "32" for a in argv]) == 0  # a larger budget resumes
    ckpt = torch.load(tmp_path / "c" / "pgpe" / "seed0" / "checkpoint.pt", weights_only=True)
    assert ckpt["history"][-1]["evaluations"] >= 32


def test_interrupt_before_any_checkpoint_does_not_claim_one(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C (KeyboardInterrupt inside a step) before the first checkpoint:
    the last line must not say a checkpoint was saved."""
    import evotorch_mqa_moe.workflow.run as run_module

    real_build = run_module._build

    def build(settings):
        task, config, problem, searcher_obj = real_build(settings)

        def step():
            raise KeyboardInterrupt

        searcher_obj.step = step
        return task, config, problem, searcher_obj

    monkeypatch.setattr(run_module, "_build", build)
    assert main(_run_args(tmp_path / "cut", "pgpe", 6)) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint saved" not in last and "nothing saved" in last, last
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


def test_interrupt_mid_generation_names_the_kept_checkpoint(tmp_path, monkeypatch, capsys):
    import evotorch_mqa_moe.workflow.run as run_module

    real_build, calls = run_module._build, {"n": 0}

    def build(settings):
        task, config, problem, searcher_obj = real_build(settings)
        real_step = searcher_obj.step

        def step():
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            real_step()

        searcher_obj.step = step
        return task, config, problem, searcher_obj

    monkeypatch.setattr(run_module, "_build", build)
    assert main(_run_args(tmp_path / "cut", "pgpe", 6)) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint saved" not in last and "last periodic checkpoint" in last, last


# ----------------------------------------------------------- more bad arguments
def test_unknown_model_field_lists_the_valid_ones(tmp_path, capsys):
    msg = _error(["run", "reverse", "--model", "embed_dimm=32", "--out", str(tmp_path / "x")],
                 capsys)
    assert "embed_dimm" in msg and "embed_dim," in msg and "num_heads" in msg


@pytest.mark.parametrize("device", ["meta", "nosuchdevice", "cuda:99"])
def test_unusable_device(tmp_path, capsys, device):
    msg = _error(["run", "reverse", "--device", device, "--generations", "1",
                  "--out", str(tmp_path / "x"), *TINY], capsys)
    assert repr(device) in msg


def test_out_is_a_file_or_under_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in _error(_run_args(afile), capsys)
    assert "cannot create output folder" in _error(_run_args(afile / "sub"), capsys)


def test_huge_popsize_refused_with_the_memory_it_needs(tmp_path, capsys):
    argv = [a if a != "8" else "1000000000" for a in _run_args(tmp_path / "x")]
    msg = _error(argv, capsys)
    assert "1,000,000,000" in msg and "GiB" in msg


def test_failed_checkpoint_write_one_line_no_tmp(tmp_path, monkeypatch, capsys):
    import evotorch_mqa_moe.workflow.run as run_module

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module.torch, "save", full_disk)
    out = tmp_path / "run"
    msg = _error(_run_args(out), capsys)
    assert "checkpoint.pt" in msg and "No space left" in msg
    assert not list(out.glob("*.tmp"))


def test_help_shows_defaults_and_every_run_option_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10)" in text and "(default: 0)" in text and "(default: cpu)" in text
    from evotorch_mqa_moe.workflow.cli import _parser

    run_parser = next(a for a in _parser()._actions if a.dest == "command").choices["run"]
    for action in run_parser._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize("command", ["run", "compare", "tune"])
def test_help_names_the_default_of_popsize_and_threads(command):
    # both default to None, which argparse's formatter hides: the help text must say it
    from evotorch_mqa_moe.workflow.cli import _HelpFormatter, _parser

    parser = next(a for a in _parser()._actions if a.dest == "command").choices[command]
    shown = {opt: _HelpFormatter("x")._get_help_string(a)
             for a in parser._actions for opt in a.option_strings}
    for option in ("--popsize", "--threads"):
        if option in shown:
            assert "default" in shown[option], (command, option, shown[option])
    assert "--threads" in shown


def test_list_prints_full_cmaes_max_value(capsys):
    from evotorch_mqa_moe.searchers import FULL_CMAES_MAX

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "FULL_CMAES_MAX" not in out and f"{FULL_CMAES_MAX}" in out
