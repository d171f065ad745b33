"""`tune`: Optuna studies in SQLite (determinism, resume, concurrent workers, failed trials),
the ``--config`` round trip of best.json into ``run``, one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

import evotorch_mqa_moe.workflow.tune as tune_mod
from evotorch_mqa_moe.searchers import get_spec
from evotorch_mqa_moe.workflow.cli import main
from evotorch_mqa_moe.workflow.tune import BEST_KEYS, load_config, suggest, tune

TINY = {"embed_dim": 8, "num_heads": 2, "expert_dim": 8}
TINY_ARGS = ["--model", "embed_dim=8", "--model", "num_heads=2", "--model", "expert_dim=8"]
SMALL_GA = {"stdev": ("log", 0.01, 0.3), "popsize": ("int", 6, 16),
            "truncation_fraction": ("float", 0.1, 0.5)}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    torch.set_num_threads(threads)


def _small(out: Path, trials: int, **kw):
    return tune("reverse", "ga", trials=trials, budget_evals=kw.pop("budget_evals", 120),
                out=out, model=TINY, space=kw.pop("space", SMALL_GA), eval_every=5, **kw)


def _trials(out: Path, name: str = "reverse-ga") -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials(deepcopy=False)


def test_suggest_follows_the_space_kinds():
    space = {"a": ("log", 1e-3, 1.0), "b": ("float", 0.1, 0.2), "c": ("int", 2, 10, 2),
             "d": ("cat", ["x", False])}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [suggest(study.ask(), space) for _ in range(200)]
    a = torch.tensor([s["a"] for s in seen]).log10()
    assert 1e-3 <= a.exp().min() and a.max() <= 0
    # log-uniform: about half the draws below the geometric middle (1e-1.5), uniform would
    # put ~3% there
    assert 0.35 < (a < -1.5).float().mean() < 0.65
    assert all(0.1 <= s["b"] <= 0.2 for s in seen)
    assert {s["c"] for s in seen} <= {2, 4, 6, 8, 10} and len({s["c"] for s in seen}) == 5
    assert {s["d"] for s in seen} == {"x", False}


def test_same_sampler_seed_gives_the_same_suggestions(tmp_path):
    _small(tmp_path / "a", 2, sampler_seed=7)
    _small(tmp_path / "b", 2, sampler_seed=7)
    _small(tmp_path / "c", 2, sampler_seed=8)
    pa, pb, pc = ([t.params for t in _trials(tmp_path / x)] for x in "abc")
    assert len(pa) == 2 and pa == pb
    assert pa != pc


def test_second_invocation_adds_trials_and_writes_outputs(tmp_path):
    best = _small(tmp_path, 2)
    best2 = _small(tmp_path, 1)
    trials = _trials(tmp_path)
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state.is_finished() for t in trials)
    for name in ("best.json", "trials.csv", "optimization_history.png"):
        assert (tmp_path / name).is_file(), name
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    # drawn when the values differ; all tied (no signal): not drawn (tune_outputs.all_tied)
    tied = len({t.value for t in completed}) == 1
    assert (tmp_path / "param_importances.png").is_file() == (len(completed) >= 2 and not tied)
    assert best is not None and best2 is not None
    assert set(BEST_KEYS) <= set(best2)
    assert best2["value"] == max(t.value for t in completed)
    assert set(best2["searcher_options"]) == {"truncation_fraction"}
    assert best2["model"] == TINY
    rows = (tmp_path / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    # checkpoints of finished trials are removed, the histories kept
    assert not list((tmp_path / "trials").rglob("*.pt"))
    assert len(list((tmp_path / "trials").rglob("history.csv"))) == 3


def test_ga_with_gene_group_granularity_completes_across_budget_pieces(tmp_path):
    # each piece after the first resumes from the checkpoint: the GA's compiled gene
    # groups must survive it
    _small(tmp_path, 2, space={"granularity": ("cat", ["row", "tensor"]),
                               "popsize": ("int", 6, 10)})
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2, [
        t.user_attrs for t in trials]


def test_failed_and_nan_trials_are_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    real_run = tune_mod.run

    def flaky(settings, out, resume=False, **kw):
        if Path(out).parent.name == "0":
            raise RuntimeError("boom in trial zero")
        results = real_run(settings, out, resume=resume, **kw)
        if Path(out).parent.name == "1":
            results["final_metrics"][results["target_metric"]] = float("nan")
        return results

    monkeypatch.setattr(tune_mod, "run", flaky)
    best = _small(tmp_path, 3)
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.COMPLETE]
    assert "boom in trial zero" in trials[0].user_attrs["fail_reason"]
    assert "nan" in trials[1].user_attrs["fail_reason"]
    assert best is not None and best["trial"] == 2
    assert "boom in trial zero" in (tmp_path / "trials.csv").read_text()


def test_config_round_trip_reproduces_the_trial(tmp_path):
    out = tmp_path / "tune"
    assert main(["tune", "reverse", "--searcher", "pgpe", "--trials", "2", "--budget-evals",
                 "150", "--out", str(out), "--threads", "1", "--quiet", *TINY_ARGS]) == 0
    best = json.loads((out / "best.json").read_text())
    assert set(best["searcher_options"]) | {"popsize", "stdev"} == set(
        get_spec("pgpe").search_space)  # the registry's space, all of it
    assert main(["run", "reverse", "--config", str(out / "best.json"), "--max-evals", "150",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    s = results["settings"]
    assert (s["searcher"], s["popsize"], s["stdev"]) == ("pgpe", best["popsize"], best["stdev"])
    assert s["searcher_options"] == best["searcher_options"] and s["model"] == TINY
    trial = json.loads((out / "trials" / "reverse-pgpe" / str(best["trial"]) / "seed0"
                        / "results.json").read_text())
    assert results["final_metrics"] == trial["final_metrics"]
    assert results["evaluations"] == trial["evaluations"]
    # explicit flags override the file
    assert main(["run", "reverse", "--config", str(out / "best.json"), "--max-evals", "20",
                 "--popsize", "8", "--stdev", "0.02", "--out", str(tmp_path / "run2"),
                 "--quiet"]) == 0
    s2 = json.loads((tmp_path / "run2" / "results.json").read_text())["settings"]
    assert (s2["popsize"], s2["stdev"]) == (8, 0.02)
    assert s2["searcher_options"] == best["searcher_options"]


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--trials", "0"], "--trials must be positive"),
    (["--trials", "1", "--searcher", "nope"], "unknown searcher 'nope'"),
    (["--trials", "1", "--storage", "sqlite:////no/such/dir/study.db"], "cannot open storage"),
    (["--trials", "1", "--storage", "nosuchdb://x"], "cannot open storage"),
])
def test_tune_bad_input_is_one_error_line(tmp_path, capsys, extra, message):
    argv = ["tune", "reverse", "--searcher", "ga", "--budget-evals", "50", "--out",
            str(tmp_path), "--quiet"]
    if "--searcher" in extra:
        i = argv.index("--searcher")
        del argv[i:i + 2]
    assert message in _error(capsys, argv + extra)
    assert not list(tmp_path.rglob("trials.csv"))


def test_unknown_metric_is_refused_before_any_trial(tmp_path, capsys):
    err = _error(capsys, ["tune", "reverse", "--searcher", "ga", "--trials", "3",
                          "--budget-evals", "30", "--metric", "nope", "--out", str(tmp_path),
                          "--quiet", *TINY_ARGS])
    assert "unknown metric 'nope'" in err and "token_accuracy" in err
    assert not (tmp_path / "study.db").exists()  # refused before the study opened


def test_another_metric_is_the_objective(tmp_path):
    best = _small(tmp_path, 1, metric="token_accuracy")
    trial = json.loads((tmp_path / "trials" / "reverse-ga" / "0" / "seed0"
                        / "results.json").read_text())
    assert best["metric"] == "token_accuracy"
    assert best["value"] == trial["final_metrics"]["token_accuracy"] > 0


@pytest.mark.parametrize("content, message", [
    ({"searcher": "ga", "bogus": 1}, "unknown keys ['bogus']"),
    ({"searcher": "ga", "popsize": -3}, "popsize must be"),
    ({"searcher": "ga", "stdev": "big"}, "stdev must be"),
    ({"searcher": "nope"}, "unknown searcher 'nope'"),
    ({"model": [1, 2]}, "model must be"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_config_is_one_error_line(tmp_path, capsys, content, message):
    path = tmp_path / "best.json"
    path.write_text(json.dumps(content))
    for command in (["run", "reverse", "--generations", "1"],
                    ["compare", "reverse", "--max-evals", "10"]):
        err = _error(capsys, [*command, "--config", str(path), "--out", str(tmp_path / "o")])
        assert message in err and str(path) in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="best.json"):
        load_config(path)


def test_config_file_that_is_not_json(tmp_path, capsys):
    path = tmp_path / "best.json"
    path.write_text("{not json")
    assert "not valid JSON" in _error(capsys, ["run", "reverse", "--config", str(path),
                                              "--generations", "1", "--out", str(tmp_path)])


@pytest.mark.slow
def test_two_concurrent_workers_share_one_sqlite_study(tmp_path):
    cmd = [sys.executable, "-m", "evotorch_mqa_moe", "tune", "reverse", "--searcher", "ga",
           "--trials", "3", "--budget-evals", "120", "--out", str(tmp_path), "--threads", "1",
           "--eval-every", "5", "--quiet", *TINY_ARGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    trials = _trials(tmp_path)
    assert sorted(t.number for t in trials) == list(range(6))  # each trial recorded once
    assert all(t.state.is_finished() for t in trials)
    assert len({t.datetime_start for t in trials}) == 6
    folders = sorted(p.name for p in (tmp_path / "trials" / "reverse-ga").iterdir())
    assert folders == sorted(str(i) for i in range(6))
    best = json.loads((tmp_path / "best.json").read_text())
    assert math.isfinite(best["value"])


def test_first_seed_moves_the_run_seeds(tmp_path):
    # held-out comparisons need a study that never saw their seeds
    best = _small(tmp_path, 1, seeds=2, first_seed=100)
    runs = sorted(p.name for p in (tmp_path / "trials" / "reverse-ga" / "0").iterdir())
    assert runs == ["seed100", "seed101"]
    assert best["first_seed"] == 100
    with pytest.raises(ValueError, match="first_seed"):
        _small(tmp_path, 1, first_seed=-1)


def test_neg_metric_maximises_the_negated_metric(tmp_path):
    best = _small(tmp_path, 1, metric="neg_loss")
    trial = json.loads((tmp_path / "trials" / "reverse-ga" / "0" / "seed0"
                        / "results.json").read_text())
    assert best["metric"] == "neg_loss"
    assert best["value"] == -trial["final_metrics"]["loss"] < 0


def test_a_fresh_study_starts_with_the_defaults_as_baseline(tmp_path):
    space = {"stdev": ("log", 0.01, 0.2), "mutation_probability": ("log", 0.01, 1.0),
             "popsize": ("int", 6, 300)}
    best = _small(tmp_path, 2, space=space)
    first = _trials(tmp_path)[0]
    assert first.user_attrs.get("baseline") is True
    default_popsize = get_spec("ga").default_popsize
    assert first.params == {"stdev": 0.05, "mutation_probability": 0.1,
                            "popsize": default_popsize}
    assert best["baseline_value"] == first.value
    # a second invocation adds trials, not another baseline
    _small(tmp_path, 1, space=space)
    assert sum(bool(t.user_attrs.get("baseline")) for t in _trials(tmp_path)) == 1


def test_no_baseline_when_a_default_is_outside_the_space():
    from evotorch_mqa_moe.searchers import get_spec
    from evotorch_mqa_moe.workflow.tune import baseline_params

    spec = get_spec("ga")
    n = spec.default_popsize
    assert baseline_params(spec, {"popsize": ("int", 6, 3 * n)}) == {"popsize": n}
    assert baseline_params(spec, {"popsize": ("int", 6, n - 1)}) is None  # n outside
    assert baseline_params(spec, {"granularity": ("cat", ["row"])}) is None
    assert baseline_params(get_spec("pgpe"), {"center_learning_rate": ("log", 0.01, 1)}) is None


# ---------------------------------------------------------------- issue 23: what tune survives
def test_reruns_explore_new_points_reproducibly(tmp_path):
    """Each trial's sampler seed comes from (sampler seed, trial number): a second
    invocation does not repeat the first one's points, and the same calls repeat exactly."""
    def params(out: Path) -> list[dict]:
        _small(out, 2, sampler_seed=3)
        _small(out, 2, sampler_seed=3)
        return [t.params for t in _trials(out)]

    first = params(tmp_path / "a")
    sampled = [json.dumps(p, sort_keys=True) for p in first[1:]]  # trial 0: the baseline
    assert len(sampled) == 3 and len(set(sampled)) == 3, first
    assert params(tmp_path / "b") == first


def test_a_killed_workers_running_trial_is_failed_with_a_reason(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study(study_name="reverse-ga", direction="maximize",
                                storage=f"sqlite:///{tmp_path / 'study.db'}")
    orphan = study.ask()  # RUNNING, as a SIGKILLed worker leaves it
    orphan.set_user_attr("worker_host", socket.gethostname())
    orphan.set_user_attr("worker_pid", dead.pid)
    _small(tmp_path, 1)
    trials = _trials(tmp_path)
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert f"pid {dead.pid}" in trials[0].user_attrs["fail_reason"]
    assert all(t.state.is_finished() for t in trials)
    assert f"pid {dead.pid}" in (tmp_path / "trials.csv").read_text()


def test_tied_trials_warn_and_skip_the_importance_plot(tmp_path, monkeypatch):
    """exact_accuracy is 0 for every trial at this budget: a warning names other metrics,
    no importance plot is drawn, and the plot that is drawn names task and metric."""
    from loguru import logger
    from matplotlib.figure import Figure

    titles: list[str] = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (
        titles.extend(ax.get_title() for ax in fig.axes), real_savefig(fig, *a, **k))[-1])
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        _small(tmp_path, 3)
    finally:
        logger.remove(sink)
    values = {t.value for t in _trials(tmp_path)}
    assert values == {0.0}
    assert any("no signal" in m and "--metric neg_loss" in m for m in messages), messages
    assert not (tmp_path / "param_importances.png").exists()
    assert (tmp_path / "optimization_history.png").is_file()
    assert any("reverse / ga: exact_accuracy" in t for t in titles), titles


def _tune_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "evotorch_mqa_moe", "tune", *args,
                           "--trials", "1", "--budget-evals", "30", "--quiet",
                           "--threads", "1"], capture_output=True, text=True, env=env,
                          timeout=180, cwd=ROOT)


def test_a_gradient_searcher_on_cartpole_is_refused_before_starting(tmp_path):
    proc = _tune_cli("cartpole", "--searcher", "adam", "--out", str(tmp_path / "t"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "adam needs a supervised task" in lines[0]
    assert not (tmp_path / "t").exists()


def test_tune_out_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("not a folder")
    proc = _tune_cli("reverse", "--searcher", "ga", "--out", str(target), *TINY_ARGS)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "is a file, not a folder" in lines[0] and str(target) in lines[0]
