"""compare(): runs, results.csv, summary.md, plots, resume, targets, validation."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from evotorch_mqa_moe.cli import main
from evotorch_mqa_moe.compare import (
    RESULT_COLUMNS,
    compare,
    default_target,
    summarize,
    time_to_target,
)
from evotorch_mqa_moe.problems import make_task

TINY = {"embed_dim": 8, "num_heads": 2, "expert_dim": 8}
PLOTS = ["best_fitness_vs_evaluations.png", "best_fitness_vs_wall_time.png",
         "exact_accuracy_vs_evaluations.png", "exact_accuracy_vs_wall_time.png"]


def _compare(out, searchers=("pgpe", "adam"), budget=24, **kw):
    return compare("reverse", list(searchers), seeds=kw.pop("seeds", 1), budget_evals=budget,
                   out=out, popsize=8, model=TINY, eval_every=1, command="pytest", **kw)


def test_compare_writes_csv_summary_plots_and_resumes(tmp_path):
    table = _compare(tmp_path, target=0.0)
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv.columns) == RESULT_COLUMNS
    assert list(csv["searcher"]) == ["pgpe", "adam"] and list(csv["seed"]) == [0, 0]
    assert (csv["evaluations"] == 24).all() and (csv["popsize"] == 8).all()
    assert (csv["target_metric"] == "exact_accuracy").all()
    # target 0 is reached at the first held-out evaluation (generation 1 = 8 evaluations)
    assert (csv["evals_to_target"] == 8).all() and (csv["time_to_target"] > 0).all()
    pd.testing.assert_frame_equal(table.reset_index(drop=True), csv, check_dtype=False)
    summary = (tmp_path / "summary.md").read_text()
    for text in ("| pgpe | 1 | 8 |", "| adam | 1 | 8 |", "1/1", "Command: `pytest`",
                 "torch", "EvoTorch", "CPUs", "Date:"):
        assert text in summary, text
    for name in PLOTS:
        path = tmp_path / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for s in ("pgpe", "adam"):
        assert (tmp_path / s / "seed0" / "results.json").is_file()

    # calling again resumes from the checkpoints: same results, nothing re-run
    again = _compare(tmp_path, target=0.0)
    pd.testing.assert_frame_equal(again, table)
    # a larger budget extends the finished runs
    more = _compare(tmp_path, budget=32, target=0.0)
    assert (more["evaluations"] == 32).all()
    history = pd.read_csv(tmp_path / "pgpe" / "seed0" / "history.csv")
    assert list(history["generation"]) == [1, 2, 3, 4]


def test_compare_two_seeds_default_target_never_reached(tmp_path):
    table = _compare(tmp_path, searchers=("snes",), seeds=2, budget=16)
    assert list(table["seed"]) == [0, 1]
    assert table["evals_to_target"].isna().all() and table["time_to_target"].isna().all()
    summary = (tmp_path / "summary.md").read_text()
    assert "target 0.9" in summary and "0/2" in summary


def test_compare_adam_popsize_follows_the_others(tmp_path):
    """Without popsize, adam counts steps x the largest default population compared."""
    table = compare("reverse", ["adam"], seeds=1, budget_evals=400, out=tmp_path,
                    model=TINY, eval_every=5)
    assert table["popsize"].tolist() == [200]
    assert table["evaluations"].tolist() == [400]  # 2 Adam steps of one batch each


def test_compare_validates_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown searcher 'nope'"):
        _compare(tmp_path, searchers=("pgpe", "nope"))
    with pytest.raises(ValueError, match="unknown task"):
        compare("nope", ["pgpe"], budget_evals=8, out=tmp_path)
    with pytest.raises(ValueError, match="too small for cmaes"):
        compare("reverse", ["cmaes"], budget_evals=8, out=tmp_path, popsize=2)
    with pytest.raises(ValueError, match="seeds"):
        _compare(tmp_path, seeds=0)
    with pytest.raises(ValueError, match="budget_evals"):
        _compare(tmp_path, budget=0)
    with pytest.raises(ValueError, match="adam needs a supervised task"):
        compare("cartpole", ["pgpe", "adam"], budget_evals=8, out=tmp_path)
    with pytest.raises(TypeError):
        compare("reverse", "pgpe", budget_evals=8, out=tmp_path)
    with pytest.raises(ValueError, match="target"):
        _compare(tmp_path, target=float("nan"))
    assert not list(tmp_path.iterdir())  # nothing ran


def test_default_targets():
    assert default_target(make_task("reverse")) == pytest.approx(8 ** -8 + 0.9 * (1 - 8 ** -8))
    majority = make_task("majority")
    chance = majority.chance()["accuracy"]
    assert default_target(majority) == pytest.approx(chance + 0.9 * (1 - chance))
    markov = make_task("language")
    bits, rate = markov.chance()["bits_per_char"], markov.ceiling()["bits_per_char"]
    if rate is not None:  # neg_bits_per_char: the negated bounds
        assert default_target(markov) == pytest.approx(-bits + 0.9 * (bits - rate))
    assert default_target(make_task("cartpole")) == pytest.approx(450.0)
    assert default_target(make_task("cartpole", max_steps=200)) == pytest.approx(180.0)


def test_time_to_target_first_heldout_hit():
    history = pd.DataFrame({"evaluations": [10, 20, 30, 40], "wall_time": [1.0, 2.0, 3.0, 4.0],
                            "acc": [math.nan, 0.5, math.nan, 0.95]})
    assert time_to_target(history, "acc", 0.9) == (40.0, 4.0)
    assert time_to_target(history, "acc", 0.4) == (20.0, 2.0)
    assert all(math.isnan(v) for v in time_to_target(history, "acc", 0.99))
    assert all(math.isnan(v) for v in time_to_target(history, "acc", None))
    assert all(math.isnan(v) for v in time_to_target(history, "other", 0.1))


def test_summarize_median_range_and_reached():
    table = pd.DataFrame({
        "task": "t", "searcher": ["a", "a", "a", "b"], "seed": [0, 1, 2, 0],
        "target_metric": "m", "final_metric": [0.2, 0.8, 0.5, 0.1],
        "evaluations": 100, "wall_time": [1.0, 2.0, 3.0, 4.0],
        "evals_to_target": [math.nan, 60.0, 80.0, math.nan],
        "time_to_target": [math.nan, 1.5, 2.5, math.nan], "parameters": 10, "popsize": 8})
    text = summarize(table, metric="m", target=0.4, budget_evals=100, command="cmd")
    row_a = next(line for line in text.splitlines() if line.startswith("| a |"))
    assert "0.5 [0.2-0.8]" in row_a and "2/3" in row_a and "| 70 |" in row_a
    assert "| 2 |" in row_a  # median time to target over the seeds that reached it
    row_b = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert "0/1" in row_b
    no_target = summarize(table, metric="m", target=None, budget_evals=100)
    assert "no target" in no_target


def test_cli_compare_writes_files(tmp_path, capsys):
    argv = ["compare", "reverse", "--searchers", "pgpe,ga", "--seeds", "1", "--budget-evals",
            "16", "--popsize", "8", "--eval-every", "1", "--quiet", "--out", str(tmp_path)]
    for key, value in TINY.items():
        argv += ["--model", f"{key}={value}"]
    assert main(argv) == 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == 2
    assert "Command: `" in (tmp_path / "summary.md").read_text()
    assert all((tmp_path / name).is_file() for name in PLOTS)
